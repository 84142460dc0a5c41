"""Stage 4: LoRA DPO on a round's preference pairs, with TRL's `DPOTrainer`.

Input: `<pairs_dir>/pairs.jsonl` (TRL's conversational format, one pair per line, images by absolute
path) and the pairs stage's `DONE.json`. Output, in `<out_dir>`:

    adapter/               the LoRA adapter (PEFT save_pretrained, safetensors) + the processor
    train_args.json        the resolved TrainConfig
    checkpoint-N/          resume points while training (deleted when done unless keep_checkpoints)
    DONE.json              summary: steps, losses, reward margins / accuracies (written last)

The reference model is the round's starting model without a second copy: PEFT's adapters-off
forward. LoRA sits on the language model's linear layers only. With `train_projector`, the
projector trains as a PEFT `modules_to_save` copy; the adapters-off forward then still uses the
original projector, so the reference does not drift. The stage checks that after training: every
frozen weight (vision tower, LM, original projector) must be bit-identical to its start.

Launch on several GPUs with `accelerate launch --config_file recipes/accelerate_configs/zero2.yaml
-m csr.train.stage ...` or point `train.deepspeed` at a DeepSpeed JSON (`recipes/deepspeed/`).

This module runs the stage (skip when done, resume, save, check, summarise) and holds its command
line. The parts: `csr.train.args` (the TrainConfig, DeepSpeed config resolution), `csr.train.data`
(reading, checking and rendering the pairs), `csr.train.trainer` (the policy, LoRA and the DPO
trainer).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from csr.config import ConfigError, CSRConfig, load_config
from csr.io import atomic_write_json, mark_done
from csr.train.args import build_train_args
from csr.train.data import TrainInputError, pairs_dataset, read_pairs
from csr.train.trainer import build_trainer, changed_parameters, frozen_fingerprint, lora_module_names

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def summarize_log_history(history: list[dict]) -> dict:
    """Steps, losses and DPO reward statistics from `Trainer.state.log_history`."""
    steps = [h for h in history if "loss" in h]
    last = steps[-1] if steps else {}
    final = next((h for h in reversed(history) if "train_loss" in h), {})

    def mean(key):
        vals = [h[key] for h in steps if key in h]
        return sum(vals) / len(vals) if vals else None

    return {
        "final_loss": last.get("loss"),
        "train_loss": final.get("train_loss"),
        "train_runtime_s": final.get("train_runtime"),
        "final_rewards_margins": last.get("rewards/margins"),
        "final_rewards_accuracies": last.get("rewards/accuracies"),
        "final_rewards_chosen": last.get("rewards/chosen"),
        "final_rewards_rejected": last.get("rewards/rejected"),
        "mean_rewards_margins": mean("rewards/margins"),
        "mean_rewards_accuracies": mean("rewards/accuracies"),
        "logged_steps": len(steps),
    }


def resume_tensorboard(trainer, checkpoint_step: int) -> None:
    """On a resume, TensorBoard hides what the killed run logged after its checkpoint (`purge_step`):
    the resumed run logs those steps again, and each point must be written once."""
    from transformers.integrations import TensorBoardCallback

    old = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if old is None:
        return

    class _PurgingTensorBoard(TensorBoardCallback):
        def _init_summary_writer(self, args):
            if self._SummaryWriter is not None:
                self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=checkpoint_step + 1)

    trainer.remove_callback(old)
    trainer.add_callback(_PurgingTensorBoard())


def _save_adapter(trainer, out_dir: Path) -> Path:
    """Save the adapter to a temp folder, then rename it into place (main process)."""
    final = out_dir / ADAPTER_DIR
    tmp = out_dir / f".{ADAPTER_DIR}.tmp"
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # every rank: gathers ZeRO-3 shards; rank 0 writes
    if trainer.is_world_process_zero():
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the args are in train_args.json
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    trainer.accelerator.wait_for_everyone()
    return final


def run_train(cfg: CSRConfig, policy_path: str, pairs_dir: Path, out_dir: Path) -> dict:
    """Train a LoRA adapter with DPO on `pairs_dir`'s pairs; returns the stage summary.

    Skips (returning the stored summary) when `out_dir` is already done; resumes from the last
    `checkpoint-N` in `out_dir` when an earlier run was interrupted.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from csr.runstate import StageGuard

    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    guard = StageGuard(out_dir, "train", cfg, inputs=(pairs_dir, policy_path))
    done = guard.finished()  # a checkpoint made with another recipe is refused, not resumed
    if done is not None:
        return done
    args = build_train_args(cfg, out_dir)  # config errors first, before reading data or loading models
    records = read_pairs(pairs_dir)
    dataset = pairs_dataset(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RANK", "0") == "0":
        guard.start()
    resume = get_last_checkpoint(str(out_dir))
    if resume:
        log.info("train: resuming from %s", resume)

    trainer = build_trainer(cfg, policy_path, dataset, args)
    if resume:
        resume_tensorboard(trainer, int(Path(resume).name.split("-")[-1]))
    frozen_before = frozen_fingerprint(trainer.model)
    result = trainer.train(resume_from_checkpoint=resume)
    adapter = _save_adapter(trainer, out_dir)

    frozen_after = frozen_fingerprint(trainer.model)
    drifted = changed_parameters(frozen_before, frozen_after) if frozen_before and frozen_after else []
    if drifted:  # the reference (adapters off) must stay the round's starting model
        raise RuntimeError(f"train: {len(drifted)} frozen parameters changed during training (e.g. "
                           f"{drifted[:3]}), so the adapters-off reference drifted. The adapter is in "
                           f"{adapter}; the stage is not marked done.")

    summary = {
        "stage": "train",
        "policy": str(policy_path),
        "pairs": str(pairs_dir),
        "adapter": str(adapter),
        "num_pairs": len(records),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "resumed_from": resume,
        "world_size": args.world_size,
        "deepspeed_zero_stage": args.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "reference_unchanged": None if frozen_before is None or frozen_after is None else True,
        "train_projector": args.train_projector,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "modules": len(lora_module_names(trainer.model))},
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "loss_type": list(args.loss_type),
        "train_loss_reported": result.training_loss,
        **summarize_log_history(trainer.state.log_history),
    }
    summary = guard.record(summary)
    if trainer.is_world_process_zero():
        atomic_write_json(out_dir / "train_args.json", json.loads(args.to_json_string()))
        mark_done(out_dir, summary)
        if not args.keep_checkpoints:
            for ckpt in out_dir.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    log.info("train: %d steps, final loss %s, reward margin %s, accuracy %s -> %s", summary["steps"],
             summary["final_loss"], summary["final_rewards_margins"], summary["final_rewards_accuracies"], adapter)
    return summary


def main(argv: list[str] | None = None) -> int:
    from csr.io import StageInputMissing
    from csr.models import ModelLoadError

    p = argparse.ArgumentParser(prog="csr train", description="Stage 4: LoRA DPO on a round's preference pairs.",
                                epilog="Multi-GPU: accelerate launch --config_file "
                                       "recipes/accelerate_configs/zero2.yaml -m csr.train.stage --config ...")
    p.add_argument("--config", help="recipe YAML (defaults are the paper's)")
    p.add_argument("--policy", help="model folder or hub id to train (default: model.model_name_or_path)")
    p.add_argument("--pairs", required=True, help="the pairs stage's folder (pairs.jsonl + DONE.json)")
    p.add_argument("--out", required=True, help="output folder (adapter/, DONE.json)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.beta=0.2")
    a = p.parse_args(argv)
    from csr.runstate import lock_if_main_process

    try:
        cfg = load_config(a.config, a.overrides)
        with lock_if_main_process(a.out):
            summary = run_train(cfg, a.policy or cfg.model.model_name_or_path, Path(a.pairs), Path(a.out))
    except (ConfigError, TrainInputError, StageInputMissing, ModelLoadError) as e:
        print(f"csr train: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # one copy under a distributed launcher
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # `accelerate launch -m csr.train.stage ...`
    from csr.cli import setup_logging

    setup_logging()
    sys.exit(main())
