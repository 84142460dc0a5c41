"""Stages 4 and 5 of a CSR round: LoRA DPO on the preference pairs, then merging the LoRA.

- `csr.train_config.TrainConfig` (below the stages, so `csr.config` can check a recipe without
  importing this package): the recipe's `train:` section (every `trl.DPOConfig` field plus the
  LoRA / projector fields), with the paper's defaults.
- `csr.train.stage.run_train`: DPO with TRL's `DPOTrainer`; the reference is the round's
  starting model (the same weights with the adapters off). Its parts: `csr.train.args` (the run's
  TrainConfig, DeepSpeed configs), `csr.train.data` (the pairs), `csr.train.trainer` (the trainer).
- `csr.train.merge.merge_lora`: fold the adapter into a plain model folder, the next round's policy.

Nothing is imported here so that importing one module of the package stays light.
"""
