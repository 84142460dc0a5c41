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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from csr.config import ConfigError, CSRConfig, load_config
from csr.io import atomic_write_json, iter_jsonl, mark_done, require_done

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
PAIR_KEYS = ("prompt", "chosen", "rejected", "images")
ADAPTER_DIR = "adapter"
SHIPPED_DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"


class TrainInputError(ValueError):
    """The pairs cannot be trained on; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------
# Pure helpers: configuration
# ---------------------------------------------------------------------------------------------


def shipped_deepspeed_configs() -> list[Path]:
    """The DeepSpeed JSON configs that ship with the repository (empty for a wheel install)."""
    return sorted(SHIPPED_DEEPSPEED_DIR.glob("*.json")) if SHIPPED_DEEPSPEED_DIR.is_dir() else []


def resolve_deepspeed(value):
    """`train.deepspeed` as TrainingArguments takes it: a dict, a JSON string, or an existing file.

    A bare name of a shipped config ('zero2' or 'zero2.json') is accepted too. A path that does
    not exist is refused here, before any model loads, with the shipped configs listed.
    """
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.deepspeed: inline JSON is not valid ({e.msg}).") from None
    path = Path(text).expanduser()
    if path.is_file():
        return str(path)
    for shipped in shipped_deepspeed_configs():
        if text in (shipped.name, shipped.stem):
            return str(shipped)
    listing = "\n".join(f"  {p}" for p in shipped_deepspeed_configs()) or "  (none found beside this install)"
    raise ConfigError(f"train.deepspeed={text!r}: no such file. Pass a DeepSpeed JSON path, an inline "
                      f"JSON object, or one of the shipped configs (by path or name):\n{listing}")


def _deepspeed_dict(value) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return json.loads(Path(value).read_text())
    return None


def build_train_args(cfg: CSRConfig, out_dir: Path, *, cuda_available: bool | None = None):
    """The TrainConfig for this run: the recipe's `train:` section plus what the stage decides.

    run.seed and run.report_to fill `seed` / `report_to` unless the train section sets them; the
    output folder is the stage's; without CUDA, training runs on the CPU in float32.
    """
    from csr.tracking import tracker_names
    from csr.train_config import TrainConfig

    values = dict(cfg.train)  # already type-checked by csr.config (YAML's `no` is "no" there)
    values["output_dir"] = str(out_dir)
    values.setdefault("seed", cfg.run.seed)
    values.setdefault("report_to", tracker_names(cfg.run.report_to) or "none")
    if re.fullmatch(r"round_\d+", out_dir.parent.name):  # a round of a run: its wandb run is round{N}-train
        values.setdefault("run_name", out_dir.parent.name.replace("_", "") + "-train")
    if values.get("deepspeed") is not None:
        values["deepspeed"] = resolve_deepspeed(values["deepspeed"])
        ds = _deepspeed_dict(values["deepspeed"]) or {}
        if values.get("train_projector") and "optimizer" in ds:
            raise ConfigError("train.train_projector needs the Trainer's optimizer (it gives the projector "
                              "its own learning rate), but the DeepSpeed config defines an 'optimizer' "
                              "block, which would train everything at one rate. Remove that block.")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda:
        if values.get("bf16", True) or values.get("fp16", False):
            log.info("No CUDA device: training on the CPU in float32 (bf16/fp16 off; the paper trains "
                     "in bf16 on GPUs).")
        values.update(bf16=False, fp16=False, use_cpu=True)
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train section: {e}") from None


# ---------------------------------------------------------------------------------------------
# Pure helpers: data
# ---------------------------------------------------------------------------------------------


def read_pairs(pairs_dir: Path) -> list[dict]:
    """The finished pairs stage's records, checked: required keys present, images on disk.

    Relative image paths are taken relative to `pairs_dir`.
    """
    pairs_dir = Path(pairs_dir)
    require_done(pairs_dir, "pairs")
    path = pairs_dir / PAIRS_FILE
    if not path.is_file():
        raise TrainInputError(f"{path} is missing although {pairs_dir} is marked done; rerun the 'pairs' stage.")
    records = []
    for n, rec in enumerate(iter_jsonl(path), 1):
        missing = [k for k in PAIR_KEYS if k not in rec]
        if missing:
            raise TrainInputError(f"{path}:{n}: record lacks {missing}; expected TRL's conversational "
                                  f"preference format with keys {list(PAIR_KEYS)}.")
        images = rec["images"] if isinstance(rec["images"], list) else [rec["images"]]
        images = [str(p if Path(p).is_absolute() else (pairs_dir / p)) for p in images]
        for p in images:
            if not Path(p).is_file():
                raise TrainInputError(f"{path}:{n}: image '{p}' does not exist.")
        records.append({"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"],
                        "images": images, "chosen_ends_with_eos": bool(rec.get("chosen_ends_with_eos", False)),
                        "rejected_ends_with_eos": bool(rec.get("rejected_ends_with_eos", False))})
    if not records:
        raise TrainInputError(f"{path} holds no pairs: nothing to train on. Check the 'pairs' stage's "
                              f"summary ({pairs_dir / 'DONE.json'}) for why every prompt was skipped.")
    return records


def render_pair(example: dict, processor) -> dict:
    """One conversational pair as TRL's plain prompt / completion text, rendered by the chat template.

    The same text TRL would render, except that a completion the model ended with EOS
    (`<side>_ends_with_eos`) is closed by EOS whatever the template renders: llava-hf's LLaVA-1.5
    template renders an assistant turn as `text + ' '` with no EOS, so DPO would never see where an
    answer stops. A template that already renders EOS (vicuna_v1, Qwen's `<|im_end|>`) is left as is.
    """
    from csr.models import close_answer

    prompt = processor.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
    out = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        full = processor.apply_chat_template(example["prompt"] + example[side], tokenize=False)
        if not full.startswith(prompt):
            raise TrainInputError(f"the chat template renders the prompt differently on its own than before an "
                                  f"answer ({prompt[-40:]!r} vs {full[len(prompt) - 40:len(prompt)]!r}); csr "
                                  f"cannot cut the completion out of it. Use model.chat_template=vicuna_v1 or "
                                  f"fix the template.")
        completion = full[len(prompt):]
        out[side] = close_answer(completion, processor) if example.get(f"{side}_ends_with_eos") else completion
    return out


def image_token_count(processor, size: tuple[int, int], cache: dict) -> int:
    """Tokens one image of `size` (width, height) becomes in the prompt, as the processor expands it."""
    from csr.models import image_token_text

    if size not in cache:
        w, h = size
        counter = getattr(processor, "_get_num_multimodal_tokens", None)
        n = None
        if counter is not None:
            try:
                n = int(counter(image_sizes=[(h, w)]).num_image_tokens[0])
            except (AttributeError, TypeError, KeyError, IndexError, ValueError):
                n = None
        if n is None:  # ask the processor itself on a blank image of that size
            from PIL import Image

            text = image_token_text(processor)
            ids = processor(images=[Image.new("RGB", size)], text=[text], return_tensors="pt")["input_ids"][0]
            n = len(ids) - len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        cache[size] = n
    return cache[size]


def longest_pair_tokens(dataset, processor, image_aspect: str = "processor", bos: int = 0) -> tuple[int, dict]:
    """(tokens, breakdown) of the longest prompt + completion in a rendered pairs dataset, image tokens
    included, without loading the images (their sizes come from the file headers)."""
    from datasets import Image as ImageFeature
    from PIL import Image

    try:
        from datasets import List
    except ImportError:  # pragma: no cover - datasets 3.x
        from datasets import Sequence as List
    from csr.models import image_token_text

    tok = getattr(processor, "tokenizer", processor)
    placeholder = tok(image_token_text(processor), add_special_tokens=False)["input_ids"]
    paths = dataset.cast_column("images", List(ImageFeature(decode=False)))["images"]
    texts = dataset.select_columns(["prompt", "chosen", "rejected"])
    cache: dict = {}
    best, breakdown = 0, {}
    for row, images in zip(texts, paths):
        image_tokens = 0
        for im in images:
            with Image.open(im["path"]) as f:
                size = f.size
            if image_aspect == "pad":
                size = (max(size), max(size))
            image_tokens += image_token_count(processor, size, cache) - len(placeholder)
        prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"]) + image_tokens + bos
        completion = max(len(tok(row[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        if prompt + completion > best:
            best = prompt + completion
            breakdown = {"prompt": prompt, "image": image_tokens + len(placeholder), "completion": completion}
    return best, breakdown


def check_token_budget(dataset, processor, max_length: int | None, image_aspect: str = "processor",
                       bos: int = 0) -> int:
    """Refuse, before training, pairs whose prompt + image + completion cannot fit `train.max_length`:
    TRL would cut into the image tokens and fail mid-run ("Image features and image tokens do not match")."""
    need, parts = longest_pair_tokens(dataset, processor, image_aspect, bos)
    if max_length is not None and need > max_length:
        raise ConfigError(f"train.max_length={max_length} cannot hold the longest pair: {need} tokens "
                          f"({parts['prompt']} of prompt, {parts['image']} of them the image, and "
                          f"{parts['completion']} of completion). Set train.max_length to at least {need}.")
    return need


def pairs_dataset(records: list[dict]):
    """A `datasets.Dataset` whose `images` column decodes to PIL images for the trainer."""
    from datasets import Dataset, Image

    try:
        from datasets import List  # datasets >= 4
    except ImportError:  # pragma: no cover - datasets 3.x
        from datasets import Sequence as List
    return Dataset.from_list(records).cast_column("images", List(Image()))


# ---------------------------------------------------------------------------------------------
# Pure helpers: model inspection and summary
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------


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
        log.info("train: %s is done, skipping", out_dir)
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
