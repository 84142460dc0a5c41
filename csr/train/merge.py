"""Stage 5: fold a round's LoRA adapter into the weights; the result is the next round's policy.

The merge runs in float32 and, by default, saves float32: a DPO update at lr 1e-7 is often smaller
than half a bf16 step of the weight it changes, so merging into (or saving as) the base's bf16/fp16
weights can round much of it away (`scripts/bf16_retention.py`: at the paper's settings a bf16 save
keeps at most 28-45% of the update, docs/results/merge-precision.md). `dtype="auto"` saves in the
base's own dtype instead; the summary then says which fraction of the adapted weights changed.
`export_model` writes a copy in the recipe's dtype for others to use (`csr push` uploads it).

Model folders are written as the Hub's are: safetensors shards of at most `max_shard_size` (5GB)
with an index, and the policy's tokenizer, processor and chat-template files copied byte for byte
(not re-saved: transformers 5 writes a tokenizer format that transformers 4.x cannot read), so a
merged folder loads wherever its base loads.

A folder is written beside `out_dir` under a temporary name, marked done inside, and renamed into
place, so a half-written folder is never taken as a finished model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from csr.faults import fault_point
from csr.io import is_done, mark_done, read_done

log = logging.getLogger(__name__)

SAVE_DTYPES = ("float32", "auto", "bfloat16", "float16")
MAX_SHARD_SIZE = "5GB"
# what a model folder holds beside its weights and config that loading it as a processor needs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "spiece.model", "preprocessor_config.json",
                   "processor_config.json", "video_preprocessor_config.json", "chat_template.json",
                   "chat_template.jinja")


class MergeError(ValueError):
    """The adapter cannot be merged; the message says why."""


def saved_dtype(config) -> torch.dtype:
    """The dtype a model folder's weights were saved in (float32 when the config does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def update_retention(w0: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> dict:
    """How much of `delta` survives merging into `w0` in float32 and saving in `dtype`.

    kept = dtype(float32(w0) + delta) - w0, compared with delta: `retained` is kept's component
    along delta (<kept, delta> / |delta|^2: 1 = all of it, 0 = rounded away), `norm_ratio`
    |kept| / |delta| (rounding up to a whole step can push it above 1), `changed_fraction` the
    share of elements whose saved value differs from w0 saved the same way. Sums for aggregating
    over layers come along (`dot`, `kept_sq`, `delta_sq`, `changed`, `elements`).
    """
    w0, delta = w0.float(), delta.float()
    saved = (w0 + delta).to(dtype)
    kept = saved.float() - w0.to(dtype).float()
    dot, kept_sq, delta_sq = float((kept * delta).sum()), float((kept * kept).sum()), float((delta * delta).sum())
    changed = int((saved != w0.to(dtype)).sum())
    return {"retained": dot / delta_sq if delta_sq else 0.0,
            "norm_ratio": (kept_sq / delta_sq) ** 0.5 if delta_sq else 0.0,
            "changed_fraction": changed / w0.numel() if w0.numel() else 0.0,
            "dot": dot, "kept_sq": kept_sq, "delta_sq": delta_sq, "changed": changed, "elements": w0.numel()}


def delta_stats(peft_model, out_dtype: torch.dtype) -> dict:
    """How big the LoRA update is, and which fraction of the adapted weights survives `out_dtype`.

    Runs before merging: for every LoRA layer, base weight W0 vs W0 + delta, both cast to out_dtype.
    `retained_fraction`: the share of the update (its component along itself, over all layers)
    that the saved weights keep (see `update_retention`).
    """
    from peft.tuners.lora import LoraLayer

    changed = total = 0
    dot = delta_sq = 0.0
    max_delta = 0.0
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                w0 = module.get_base_layer().weight
                delta = module.get_delta_weight(name).to(w0.dtype)
                max_delta = max(max_delta, float(delta.abs().max()))
                r = update_retention(w0, delta, out_dtype)
                changed, total = changed + r["changed"], total + r["elements"]
                dot, delta_sq = dot + r["dot"], delta_sq + r["delta_sq"]
    return {"lora_weights": total, "max_abs_delta": max_delta,
            "changed_fraction": changed / total if total else 0.0,
            "retained_fraction": dot / delta_sq if delta_sq else 0.0}


def _modules_to_save(adapter_dir: Path) -> list[str]:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return list(cfg.get("modules_to_save") or [])


def source_folder(name_or_path: str, patterns=TOKENIZER_FILES) -> Path | None:
    """A model's local folder: the path itself, or the Hub cache's snapshot of a hub id (None if neither)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=list(patterns)))
    except Exception as e:  # offline without a cache, a malformed id: the caller falls back
        log.info("no local files for '%s' (%s)", name_or_path, e)
        return None


def copy_tokenizer_files(src: str | Path, dst: Path) -> list[str]:
    """Copy the tokenizer / processor / chat-template files of `src` byte for byte; returns their names."""
    folder = source_folder(str(src))
    copied = []
    for name in TOKENIZER_FILES if folder is not None else ():
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dst / name)
            copied.append(name)
    return copied


def refuse_unfinished(out_dir: Path) -> None:
    """A model folder is renamed into place whole, with its DONE.json: a non-empty one without it is not csr's."""
    if out_dir.exists() and any(out_dir.iterdir()) and not is_done(out_dir):
        raise MergeError(f"'{out_dir}' exists and is not a finished model folder; csr does not overwrite a folder "
                         f"it did not finish. Remove it or choose another output folder.")


def save_model_folder(model, tokenizer_source: str, out_dir: Path, summary: dict, *,
                      max_shard_size: str = MAX_SHARD_SIZE, trust_remote_code: bool = False) -> Path:
    """`model` (weights + config) and `tokenizer_source`'s tokenizer files into `out_dir`, atomically, marked done."""
    from csr.models import load_processor

    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed merge
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        # safetensors (the only format transformers 5 writes), shards of max_shard_size with an index
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if not copy_tokenizer_files(tokenizer_source, tmp):  # no files to copy: re-save what loads
            log.warning("no tokenizer files to copy from '%s': re-saving its processor with this transformers",
                        tokenizer_source)
            load_processor(tokenizer_source, trust_remote_code).save_pretrained(tmp)
        mark_done(tmp, summary)
        fault_point("merge.before_rename")
        if out_dir.exists():  # only ever empty here: a finished folder is renamed into place whole
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_model(merged_dir: str | Path, out_dir: str | Path, dtype: str, *,
                 max_shard_size: str = MAX_SHARD_SIZE) -> Path:
    """A copy of a merged folder in `dtype` (the recipe's), sharded, for others to load or push.

    Skips when `out_dir` is done. The round-to-round policy stays the merged folder itself.
    """
    from transformers import AutoModelForImageTextToText

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if is_done(out_dir):
        log.info("export: %s is done, skipping", out_dir)
        return out_dir
    refuse_unfinished(out_dir)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise MergeError(f"export dtype={dtype!r} is not one of bfloat16, float16, float32.")
    model = AutoModelForImageTextToText.from_pretrained(str(merged_dir), dtype=getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)
    summary = {"stage": "export", "from": str(merged_dir), "dtype": dtype, "max_shard_size": max_shard_size}
    save_model_folder(model, str(merged_dir), out_dir, summary, max_shard_size=max_shard_size)
    log.info("export: %s -> %s (%s)", merged_dir, out_dir, dtype)
    return out_dir


def merge_lora(policy_path: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
               dtype: str = "float32", trust_remote_code: bool = False,
               allow_pickle_weights: bool = False, max_shard_size: str = MAX_SHARD_SIZE) -> Path:
    """Merge `adapter_dir` (a PEFT LoRA, possibly with a trained projector) into `policy_path`.

    Writes a plain model folder (safetensors + processor) to `out_dir` and returns it. Skips when
    `out_dir` is already done. `dtype`: float32 (default) or auto (the base's saved dtype), or an
    explicit bfloat16 / float16.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from csr.models import check_model_class

    from csr.runstate import StageGuard

    policy_path, adapter_dir, out_dir = str(policy_path), Path(adapter_dir), Path(out_dir)
    guard = StageGuard(out_dir, "merge", None, inputs=(policy_path, adapter_dir.parent),
                       settings={"merge.dtype": dtype})
    if guard.finished() is not None:
        return out_dir
    refuse_unfinished(out_dir)
    if dtype not in SAVE_DTYPES:
        raise MergeError(f"dtype={dtype!r} is not one of {list(SAVE_DTYPES)}.")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"'{adapter_dir}' is not a PEFT adapter folder (no adapter_config.json); run "
                         f"the 'train' stage first (its adapter is in <train out>/adapter).")
    check_model_class(policy_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle_weights)

    # float32 for the arithmetic whatever the base was saved in: W0 (exact from any lower dtype) + delta
    base = AutoModelForImageTextToText.from_pretrained(
        policy_path, dtype=torch.float32, trust_remote_code=trust_remote_code,
        use_safetensors=not allow_pickle_weights)
    out_dtype = saved_dtype(base.config) if dtype == "auto" else getattr(torch, dtype)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    trained_base = peft_model.peft_config["default"].base_model_name_or_path
    if trained_base and Path(trained_base).resolve() != Path(policy_path).resolve():
        log.warning("merge: the adapter was trained on '%s' but is being merged into '%s'.",
                    trained_base, policy_path)
    stats = delta_stats(peft_model, out_dtype)
    if out_dtype != torch.float32 and stats["changed_fraction"] < 0.5:
        log.warning("merge: saving in %s keeps the LoRA update in only %.1f%% of the adapted weights "
                    "(max |delta| %.2e); dtype=float32 keeps all of it.", out_dtype,
                    100 * stats["changed_fraction"], stats["max_abs_delta"])
    merged = peft_model.merge_and_unload()
    leftovers = [n for n, _ in merged.named_parameters() if "lora_" in n or "modules_to_save" in n]
    if leftovers:
        raise MergeError(f"merge left adapter parameters behind (e.g. {leftovers[0]}).")
    merged = merged.to(out_dtype)
    merged.config.dtype = out_dtype

    summary = {
        "stage": "merge",
        "policy": policy_path,
        "adapter": str(adapter_dir),
        "dtype": str(out_dtype).replace("torch.", ""),
        "modules_to_save": _modules_to_save(adapter_dir),
        **stats,
    }
    save_model_folder(merged, policy_path, out_dir, guard.record(summary), max_shard_size=max_shard_size,
                      trust_remote_code=trust_remote_code)
    log.info("merge: %s + %s -> %s (%s, %.1f%% of adapted weights changed)", policy_path, adapter_dir,
             out_dir, summary["dtype"], 100 * stats["changed_fraction"])
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from csr.config import ConfigError, load_config
    from csr.models import ModelLoadError

    p = argparse.ArgumentParser(prog="csr merge", description="Stage 5: merge a LoRA adapter into a model folder.")
    p.add_argument("--config", help="recipe YAML (for model.trust_remote_code / allow_pickle_weights)")
    p.add_argument("--policy", help="the model the adapter was trained on (default: model.model_name_or_path)")
    p.add_argument("--adapter", required=True, help="adapter folder (the train stage's <out>/adapter)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--dtype", default="float32", choices=SAVE_DTYPES,
                   help="saved dtype; float32 (default) keeps small DPO updates that bf16 would round away; "
                        "auto: the base's own dtype")
    p.add_argument("--max-shard-size", default=MAX_SHARD_SIZE, help="largest safetensors file (the Hub's layout)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    a = p.parse_args(argv)
    from csr.runstate import lock_if_main_process

    try:
        cfg = load_config(a.config, a.overrides)
        with lock_if_main_process(Path(a.out).parent):  # the merge renames its folder into place
            out = merge_lora(a.policy or cfg.model.model_name_or_path, a.adapter, a.out, dtype=a.dtype,
                             trust_remote_code=cfg.model.trust_remote_code,
                             allow_pickle_weights=cfg.model.allow_pickle_weights, max_shard_size=a.max_shard_size)
    except (ConfigError, MergeError, ModelLoadError) as e:
        print(f"csr merge: {e}", file=sys.stderr)
        return 2
    print(json.dumps(read_done(out), indent=2))
    return 0


if __name__ == "__main__":
    from csr.cli import setup_logging

    setup_logging()
    sys.exit(main())
