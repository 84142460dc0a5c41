"""The `TrainConfig` a DPO run trains with: the recipe's `train:` section plus what the stage decides,
and `train.deepspeed` resolved (a path, inline JSON, or the name of a shipped config).

Config errors surface here, before any data is read or model loaded.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from csr.config import ConfigError, CSRConfig

log = logging.getLogger(__name__)

SHIPPED_DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"


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
