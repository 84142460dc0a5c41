"""VIG-selective SFT (docs/method.md §3) through TRL's `SFTTrainer`, LoRA (PEFT) or full fine-tuning.

Input: a `csr vig score` output (vig.jsonl: image, prompt, answer, per-token and sample VIG, scored
by the model that is trained here). The selection (`csr.vig.maths.plan_selection`):

- keep the top `keep_percent`% of samples by sample VIG (default 70);
- inside kept samples, set the label of every answer token with VIG_t < τ to -100 (the token stays
  in the input); τ per `tau_mode` (default keep_boundary: the smallest kept sample VIG; see
  `csr.vig.maths` for the two readings of "τ = the p-th percentile").

`selection=none` is plain SFT on every sample and token, the baseline. Text-only samples (no image,
so no VIG) are kept and supervised in full by both (the paper's rule); multi-turn samples carry
every assistant turn, masked token by token like single-turn ones.

Schedule (docs/method.md §3): the paper keeps the vanilla recipe's schedule, the same number of
*epochs* for both arms, so every kept sample is seen equally often in either arm; the VIG arm then
runs fewer steps. Set `num_train_epochs` and leave `max_steps` unset (-1); with `max_steps` the two
arms see their samples different numbers of times (a warning says so). DONE.json records the
passes over each kept sample (`training.passes_per_kept_sample`).

How the mask reaches the loss without patching TRL: the dataset is TRL's prompt-completion
conversational format plus a `vig_keep` column (one 0/1 per answer token). `VIGMaskingCollator`
pops that column, runs TRL's own `DataCollatorForVisionLanguageModeling` (built as SFTTrainer
builds it: completion-only loss), and sets the labels of masked answer tokens to -100. The answer
tokens are those labelled by TRL's collator, the same positions `csr vig score` scored (it uses
the same collator). `remove_unused_columns` is forced off so the column reaches the collator.
With `add_bos` (default auto) BOS is put first, label -100, as in scoring (see `csr.vig.collate`).

Output in `<out>`: `adapter/` (LoRA), `model/` (a full model folder: the merged LoRA or the
fully fine-tuned weights, with the processor; what `csr eval` takes), `selection.jsonl` (kept
samples and their masks), `DONE.json` (selection statistics, tokens supervised, losses).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import SFTConfig

from csr.train_config import FineTuneFields
from csr.vig.collate import vig_example
from csr.vig.maths import IGNORE_INDEX, TAU_MODES, apply_token_masks, plan_records_selection
from csr.vig.records import record_turns
from csr.vig.score import read_scores

log = logging.getLogger(__name__)

MASK_KEY = "vig_keep"
ANSWER_COUNT_KEY = "vig_answer_tokens"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class SelectiveSFTConfig(FineTuneFields, SFTConfig):
    """`trl.SFTConfig` with LLaVA-1.5's fine-tuning defaults, the shared LoRA / dtype fields
    (`csr.train_config.FineTuneFields`) and the VIG selection."""

    # ---- VIG selection -------------------------------------------------------------------------
    selection: str = field(default="vig", metadata=_help(
        "vig: VIG-selective SFT (top keep_percent% samples, tokens below τ masked); none: plain SFT "
        "on every sample and token (the baseline).", choices=("vig", "none")))
    keep_percent: float = field(default=70.0, metadata=_help(
        "p: the share of samples kept, the top p% by sample VIG (paper: 70)."))
    tau_mode: str = field(default="keep_boundary", metadata=_help(
        "How τ is read from 'τ = the p-th percentile'. keep_boundary: the (100-p)-th ascending percentile, "
        "the smallest kept sample VIG (consistent with keeping the top p%); percentile: numpy's p-th "
        "percentile of sample VIG (literal, stricter).", choices=TAU_MODES))
    token_mask: bool = field(default=True, metadata=_help(
        "Mask the labels of answer tokens with VIG_t < τ inside kept samples (off: sample selection only)."))

    # ---- what trains ---------------------------------------------------------------------------
    use_lora: bool = field(default=True, metadata=_help(
        "LoRA on the language model (PEFT); off: full fine-tuning of the language model and projector."))
    projector_module: str = field(default="multi_modal_projector", metadata=_help(
        "Name of the projector module, for train_projector (LLaVA's: multi_modal_projector)."))
    train_vision_tower: bool = field(default=False, metadata=_help(
        "Full fine-tuning only: also train the vision tower (LLaVA keeps it frozen)."))
    merge: bool = field(default=True, metadata=_help(
        "With LoRA, also write model/: the adapter merged into the weights (a folder `csr eval` loads)."))
    add_bos: str = field(default="auto", metadata=_help(
        "BOS before the chat prompt, as generation has it (auto: when the tokenizer adds one on plain calls; "
        "never: TRL's collation unchanged). Must match the `csr vig score --add-bos` of the scores.",
        choices=("auto", "always", "never")))

    # ---- defaults changed from SFTConfig (LLaVA-1.5 fine-tuning) ----------------------------------
    learning_rate: float = field(default=2e-4, metadata=_help(
        "Peak learning rate (LLaVA-1.5 LoRA: 2e-4; full fine-tuning: 2e-5)."))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("Learning-rate schedule (LLaVA-1.5: cosine)."))
    warmup_steps: float = field(default=0.03, metadata=_help(
        "Warmup steps, or a float in [0, 1) as a fraction of the total (LLaVA-1.5: 3%)."))
    num_train_epochs: float = field(default=1.0, metadata=_help("Epochs (LLaVA-1.5: 1)."))
    logging_steps: float = field(default=1, metadata=_help("Log every N steps."))
    save_total_limit: int | None = field(default=1, metadata=_help("Checkpoint folders kept while training."))
    remove_unused_columns: bool = field(default=False, metadata=_help(
        "Must stay False: the vig_keep column has to reach the collator."))

    def __post_init__(self):
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False for VIG-selective SFT: the per-token mask "
                             "column has to reach the data collator.")
        if not 0.0 <= self.keep_percent <= 100.0:
            raise ValueError(f"keep_percent={self.keep_percent} must be in [0, 100]")
        if self.selection not in ("vig", "none"):
            raise ValueError(f"selection={self.selection!r} is not one of vig, none")
        if self.tau_mode not in TAU_MODES:
            raise ValueError(f"tau_mode={self.tau_mode!r} is not one of {TAU_MODES}")
        super().__post_init__()


def build_args(out_dir: str | Path, values: dict | None = None, *, cuda_available: bool | None = None) -> SelectiveSFTConfig:
    """The config for a run in `out_dir`; without CUDA, float32 on the CPU (bf16/fp16 off)."""
    values = dict(values or {})
    values["output_dir"] = str(out_dir)
    values.setdefault("report_to", "none")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda:
        values.update(bf16=False, fp16=False, use_cpu=True)
    return SelectiveSFTConfig(**values)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


class VIGMaskingCollator:
    """TRL's vision collator, then the per-token VIG mask on the labels.

    Each example carries `vig_keep` (one 0/1 per answer token, or None for no mask). The batch gains
    `vig_answer_tokens` (B,): each row's answer-token count before masking, which `VIGSFTTrainer`
    pops before the forward and counts (with the labels it actually trains on).
    """

    def __init__(self, inner, mask_key: str = MASK_KEY):
        self.inner = inner
        self.mask_key = mask_key

    def __call__(self, examples: list[dict]) -> dict:
        masks = [ex.get(self.mask_key) for ex in examples]
        clean = [{k: v for k, v in ex.items() if k != self.mask_key} for ex in examples]
        batch = self.inner(clean)
        labels = batch["labels"]
        batch[ANSWER_COUNT_KEY] = (labels != IGNORE_INDEX).sum(dim=1)
        batch["labels"] = apply_token_masks(labels, [None if m is None else [bool(x) for x in m] for m in masks])
        return batch


def _trainer_class():
    from trl import SFTTrainer

    class VIGSFTTrainer(SFTTrainer):
        """SFTTrainer that counts, per training micro-batch, the answer tokens and the supervised ones.

        Counting happens where the loss is computed, so prefetched batches are not counted; the counts
        are this process's (one process: the whole run).
        """

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.vig_counts = {"examples": 0, "answer": 0, "supervised": 0}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            answer = inputs.pop(ANSWER_COUNT_KEY, None)
            if model.training:
                self.vig_counts["examples"] += int(inputs["input_ids"].shape[0])
                self.vig_counts["supervised"] += int((inputs["labels"] != IGNORE_INDEX).sum())
                if answer is not None:
                    self.vig_counts["answer"] += int(answer.sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def seen(self) -> dict:
            c = self.vig_counts
            return {"examples_seen": c["examples"], "answer_tokens_seen": c["answer"],
                    "supervised_tokens_seen": c["supervised"],
                    "share_supervised_seen": c["supervised"] / c["answer"] if c["answer"] else None}

    return VIGSFTTrainer


def training_rows(records: list[dict], selection) -> list[dict]:
    """Kept samples as training rows: TRL prompt-completion columns, every turn (`vig_example`), the
    image path (none for a text-only sample) and the `vig_keep` mask over all answer tokens."""
    rows = []
    for rec, keep, mask in zip(records, selection.kept, selection.masks):
        if not keep:
            continue
        ex = vig_example(record_turns(rec), image=rec.get("image"))
        ex[MASK_KEY] = [int(x) for x in mask]
        rows.append(ex)
    return rows


def rows_dataset(rows: list[dict]):
    """A `datasets.Dataset` whose `images` column decodes to PIL images."""
    from datasets import Dataset, Image

    try:
        from datasets import List
    except ImportError:  # pragma: no cover - datasets 3.x
        from datasets import Sequence as List
    return Dataset.from_list(rows).cast_column("images", List(Image()))


def select_from_scores(records: list[dict], args: SelectiveSFTConfig):
    """The Selection the config asks for (plain SFT keeps every sample and token; text-only samples are
    kept unmasked either way)."""
    if args.selection == "none":
        return plan_records_selection(records, 100.0, args.tau_mode, token_mask=False)
    return plan_records_selection(records, args.keep_percent, args.tau_mode, token_mask=args.token_mask)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def build_trainer(model_path: str, dataset, args: SelectiveSFTConfig, *, trust_remote_code: bool = False):
    """SFTTrainer (counting subclass) with the VIG-masking collator, LoRA or full fine-tuning."""
    from transformers import AutoModelForImageTextToText, set_seed

    from csr.models import DTYPES, check_model_source, load_processor
    from csr.vig.collate import sft_collator

    set_seed(args.seed)
    check_model_source(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=DTYPES[args.resolved_model_dtype()],
                                                        trust_remote_code=trust_remote_code)
    processor = load_processor(model_path, trust_remote_code)
    tok = processor.tokenizer
    if tok.pad_token is None:  # what SFTTrainer does when it builds its own collator
        tok.pad_token = tok.eos_token
        model.config.get_text_config().pad_token_id = tok.pad_token_id
    collator = VIGMaskingCollator(sft_collator(processor, args.max_length, args.pad_to_multiple_of,
                                               add_bos=args.add_bos))
    peft_config = None
    if args.use_lora:
        peft_config = args.lora_config()
    else:
        vision = getattr(getattr(model, "model", model), "vision_tower", None)
        if vision is not None and not args.train_vision_tower:
            for p in vision.parameters():
                p.requires_grad_(False)
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         data_collator=collator, peft_config=peft_config)
    return trainer


def _history_summary(history: list[dict]) -> dict:
    steps = [h for h in history if "loss" in h]
    final = next((h for h in reversed(history) if "train_loss" in h), {})
    return {"first_loss": steps[0]["loss"] if steps else None, "final_loss": steps[-1]["loss"] if steps else None,
            "train_loss": final.get("train_loss"), "train_runtime_s": final.get("train_runtime"),
            "logged_steps": len(steps)}


def _save(trainer, args: SelectiveSFTConfig, out_dir: Path) -> dict:
    processor = trainer.processing_class
    paths = {}
    if args.use_lora:
        adapter = out_dir / ADAPTER_DIR
        trainer.save_model(str(adapter))
        (adapter / "training_args.bin").unlink(missing_ok=True)
        paths["adapter"] = str(adapter)
        if args.merge:
            merged = trainer.model.merge_and_unload()
            tmp = out_dir / f".{MODEL_DIR}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            merged.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            shutil.rmtree(out_dir / MODEL_DIR, ignore_errors=True)
            tmp.rename(out_dir / MODEL_DIR)
            paths["model"] = str(out_dir / MODEL_DIR)
    else:
        tmp = out_dir / f".{MODEL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.rmtree(out_dir / MODEL_DIR, ignore_errors=True)
        tmp.rename(out_dir / MODEL_DIR)
        paths["model"] = str(out_dir / MODEL_DIR)
    return paths


def run_selective_sft(model_path: str, scores: str | Path, out_dir: str | Path, args: SelectiveSFTConfig,
                      *, trust_remote_code: bool = False) -> dict:
    """Select from the VIG scores, train with SFTTrainer, save; returns (and writes) the summary."""
    from csr.io import atomic_write_json, is_done, mark_done, read_done, write_jsonl

    out_dir = Path(out_dir)
    if is_done(out_dir):
        log.info("[vig train] %s is finished; skipping", out_dir)
        return read_done(out_dir)
    t0 = time.time()
    records = read_scores(scores)
    if not records:
        raise ValueError(f"{scores} holds no scored samples")
    missing = [r["image"] for r in records if r.get("image") is not None and not Path(r["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of the scores are missing, e.g. {missing[0]}")
    selection = select_from_scores(records, args)
    rows = training_rows(records, selection)
    if not rows:
        raise ValueError(f"keep_percent={args.keep_percent} keeps no sample of {len(records)}")
    stats = selection.stats()
    log.info("[vig train] selection=%s: %d/%d samples, τ=%.4f, %d/%d answer tokens supervised (%.1f%%)",
             args.selection, stats["samples_kept"], stats["samples_total"], stats["tau"],
             stats["tokens_supervised"], stats["tokens_total"], 100 * stats["share_tokens_supervised"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "selection.jsonl",
                [{"id": r["id"], "vig": r["vig"], "kept": k, "mask": m}
                 for r, k, m in zip(records, selection.kept, selection.masks)])
    if args.max_steps is not None and args.max_steps > 0:
        log.warning("[vig train] max_steps=%d: the schedule is by steps, so arms with different numbers of kept "
                    "samples see each sample a different number of times; the paper keeps the same epochs "
                    "(set num_train_epochs and max_steps=-1)", args.max_steps)
    trainer = build_trainer(model_path, rows_dataset(rows), args, trust_remote_code=trust_remote_code)
    result = trainer.train()
    paths = _save(trainer, args, out_dir)
    summary = {
        "stage": "vig train", "start_model": str(model_path), "scores": str(scores), "selection": stats,
        "training": {**trainer.seen(), "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
                     "schedule": "steps" if (args.max_steps or 0) > 0 else "epochs",
                     "passes_per_kept_sample": trainer.seen()["examples_seen"] / len(rows),
                     "train_loss_reported": result.training_loss, **_history_summary(trainer.state.log_history)},
        "use_lora": args.use_lora, "learning_rate": args.learning_rate, "seed": args.seed,
        **paths, "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(out_dir / "train_args.json", json.loads(args.to_json_string()))
    mark_done(out_dir, summary)
    for ckpt in out_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    return summary


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def sft_overrides(items: list[str]) -> dict:
    """['learning_rate=1e-4', 'use_lora=false'] -> typed values, keys checked against SelectiveSFTConfig.

    `csr.config`'s parser and type checks; a key may carry the `train.` prefix."""
    import dataclasses

    from csr.config import ConfigError, check_section_values, parse_overrides

    raw = parse_overrides(items, default_section="train")
    if set(raw) - {"train"}:
        raise ConfigError(f"override section '{sorted(set(raw) - {'train'})[0]}': `csr vig train` takes only "
                          f"SelectiveSFTConfig / SFTConfig keys (key=value or train.key=value).")
    fields = {f.name: f for f in dataclasses.fields(SelectiveSFTConfig) if f.init}
    return check_section_values("train", raw.get("train", {}), fields, "csr vig train",
                                listing="SelectiveSFTConfig in csr/vig/train.py (with trl.SFTConfig's fields)")


def main_train(a: argparse.Namespace) -> int:
    values = sft_overrides(a.overrides)
    if a.selection is not None:
        values["selection"] = a.selection
    if a.keep_percent is not None:
        values["keep_percent"] = a.keep_percent
    if a.tau_mode is not None:
        values["tau_mode"] = a.tau_mode
    if a.no_token_mask:
        values["token_mask"] = False
    if a.full:
        values["use_lora"] = False
    try:
        args = build_args(a.out, values)
    except (TypeError, ValueError) as e:
        print(f"csr vig train: {e}", file=sys.stderr)
        return 2
    summary = run_selective_sft(a.model, a.scores, a.out, args)
    print(json.dumps(summary, indent=2))
    return 0
