"""The DPO trainer: the policy loaded for training, LoRA on it, the pairs rendered, TRL's `DPOTrainer`
with the projector's own learning rate (`CSRDPOTrainer`), and the checks of what trains.

The reference model is the policy with the adapters off (no second copy).
"""

from __future__ import annotations

import logging

import torch

from csr.config import ConfigError, CSRConfig
from csr.train.data import check_token_budget, render_pair

log = logging.getLogger(__name__)


def _trainer_class():
    from transformers.trainer_optimizer import is_optimizer_factory
    from trl import DPOTrainer

    class CSRDPOTrainer(DPOTrainer):
        """DPOTrainer whose optimizer gives the projector its own learning rate (train_projector)."""

        def create_optimizer(self, model=None):
            args = self.args
            if self.optimizer is not None or not getattr(args, "train_projector", False):
                return super().create_optimizer(model)
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            marker = f".{args.projector_module}."
            groups: dict[tuple[float, float], list] = {}
            for name, p in opt_model.named_parameters():
                if not p.requires_grad:
                    continue
                lr = args.projector_learning_rate if marker in f".{name}" else args.learning_rate
                wd = args.weight_decay if name in decay else 0.0
                groups.setdefault((lr, wd), []).append(p)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, opt_model)
            if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
                raise ConfigError(f"train.optim={args.optim!r} builds its own parameter groups, so "
                                  f"train.projector_learning_rate cannot apply; use an AdamW-style optimizer.")
            self.optimizer = optimizer_cls(
                [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                **optimizer_kwargs)
            return self.optimizer

    return CSRDPOTrainer


def load_policy_for_training(policy_path: str, args, cfg: CSRConfig):
    """The policy in the training dtype, on the CPU (the Trainer places it)."""
    from transformers import AutoModelForImageTextToText

    from csr.models import DTYPES, check_model_class, model_file_errors

    check_model_class(policy_path, trust_remote_code=cfg.model.trust_remote_code,
                      allow_pickle=cfg.model.allow_pickle_weights)
    with model_file_errors(policy_path):
        return AutoModelForImageTextToText.from_pretrained(
            policy_path, dtype=DTYPES[args.resolved_model_dtype()],
            trust_remote_code=cfg.model.trust_remote_code, use_safetensors=not cfg.model.allow_pickle_weights)


def build_trainer(cfg: CSRConfig, policy_path: str, train_dataset, args, *, model=None, processor=None):
    """Policy + processor + LoRA, wrapped in the DPO trainer. The reference is the adapters-off model.

    `model` and `processor`, when given, are used instead of loading `policy_path` (the benchmarks
    build random-init models in memory rather than write 14 GB to disk and read it back).
    """
    from transformers import set_seed

    from csr.models import class_of, load_processor

    set_seed(args.seed)  # LoRA's init happens inside the trainer's constructor, before it seeds
    if model is None:
        model = load_policy_for_training(policy_path, args, cfg)
    if processor is None:
        processor = load_processor(policy_path, cfg.model.trust_remote_code, chat_template=cfg.model.chat_template)
    else:
        from csr.models import set_chat_template

        set_chat_template(processor, cfg.model.chat_template, getattr(model.config, "model_type", None))
    spec = class_of(model)
    if args.projector_module == "auto":
        args.projector_module = spec.projector
    from csr.faults import train_callback

    if isinstance(train_dataset[0]["prompt"], list):  # conversational: render it here (see render_pair)
        columns = [c for c in ("prompt", "chosen", "rejected", "chosen_ends_with_eos", "rejected_ends_with_eos")
                   if c in train_dataset.column_names]
        train_dataset = train_dataset.map(lambda *values: render_pair(dict(zip(columns, values)), processor),
                                          input_columns=columns, remove_columns=columns[3:],
                                          desc="render pairs")
    tok = getattr(processor, "tokenizer", processor)
    from csr.models import tokenizer_adds_bos

    need = check_token_budget(train_dataset, processor, args.max_length, cfg.model.image_aspect,
                              bos=int(tokenizer_adds_bos(tok)))
    log.info("longest pair: %d tokens (train.max_length=%s)", need, args.max_length)
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_dataset,
                               processing_class=processor, peft_config=args.lora_config(),
                               callbacks=[train_callback()])
    from csr.models import PadImages, PrependBOS, tokenizer_adds_bos

    if cfg.model.image_aspect != "processor":  # the images as generation saw them (model.image_aspect)
        trainer.data_collator = PadImages(trainer.data_collator, processor, cfg.model.image_aspect)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer_adds_bos(tokenizer):  # train on the sequence start that generation sees (see PrependBOS)
        trainer.data_collator = PrependBOS(trainer.data_collator, tokenizer.bos_token_id)
    lora = lora_module_names(trainer.model)
    vision = [n for n in lora if f".{spec.vision_tower}." in f".{n}."]
    log.info("%s: LoRA on %d modules (%d in the vision tower)", spec.architecture, len(lora), len(vision))
    if vision:
        log.warning("train.lora_target_modules puts LoRA on the vision tower (e.g. %s); the paper "
                    "adapts the language model only.", vision[0])
    if args.train_projector:
        marker = f".{args.projector_module}."
        if not any(marker in f".{n}" and p.requires_grad for n, p in trainer.model.named_parameters()):
            raise ConfigError(f"train.train_projector is on but the model has no module named "
                              f"'{args.projector_module}'; set train.projector_module.")
    return trainer


def lora_module_names(model) -> list[str]:
    """Qualified names of the modules that carry LoRA weights."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def frozen_fingerprint(model) -> dict[str, tuple[float, float]] | None:
    """(sum, sum of |x|) in float64 of every frozen parameter; None when they are sharded (ZeRO-3).

    Cheap enough for a 7B model, and exact: an untouched tensor gives identical numbers.
    """
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                continue
            if hasattr(p, "ds_id") or p.numel() == 0:
                return None
            out[name] = (float(p.sum(dtype=torch.float64)), float(p.abs().sum(dtype=torch.float64)))
    return out


def changed_parameters(before: dict, after: dict) -> list[str]:
    return sorted(name for name, value in before.items() if after.get(name) != value)
