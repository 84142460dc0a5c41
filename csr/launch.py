"""Launching the heavy stages on several processes (GPUs) from the single-process round loop.

With `run.num_processes > 1`, `csr run` stays one light process and starts generate and train as
`accelerate launch --config_file <run.accelerate_config> --num_processes N -m csr.cli <stage> ...`
on the run's resolved `config.yaml`; generate shards its prompts across the ranks, train runs
DDP or DeepSpeed as the accelerate config says. Score, pairs and merge are light and stay in the
loop's process. With one process (or on CPU), everything runs in-process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from csr.config import ConfigError, CSRConfig

log = logging.getLogger(__name__)

ACCELERATE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "accelerate_configs"


def shipped_accelerate_configs() -> list[Path]:
    return sorted(ACCELERATE_DIR.glob("*.yaml")) if ACCELERATE_DIR.is_dir() else []


def resolve_accelerate_config(value: str) -> str:
    """A path, or the name of a shipped config ('zero2'); refused with the list when neither."""
    path = Path(value).expanduser()
    if path.is_file():
        return str(path)
    for shipped in shipped_accelerate_configs():
        if value in (shipped.name, shipped.stem):
            return str(shipped)
    names = ", ".join(p.stem for p in shipped_accelerate_configs()) or "(none beside this install)"
    raise ConfigError(f"run.accelerate_config={value!r}: no such file. Give a path to an `accelerate config` "
                      f"YAML or a shipped one: {names}.")


def available_devices() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA device(s)"
    return os.cpu_count() or 1, "CPU core(s) (no CUDA device found)"


def check_launch(cfg: CSRConfig) -> str | None:
    """Refuse, before any work, a process count the machine cannot serve; returns the accelerate config."""
    n = cfg.run.num_processes
    if n < 1:
        raise ConfigError(f"run.num_processes={n} must be at least 1.")
    if n == 1:
        return None
    have, kind = available_devices()
    if n > have:
        raise ConfigError(f"run.num_processes={n} but this machine has {have} {kind}. Lower run.num_processes "
                          f"to at most {have}.")
    return resolve_accelerate_config(cfg.run.accelerate_config)


def accelerate_command(accelerate_config: str, num_processes: int, program: list[str]) -> list[str]:
    """`accelerate launch` of `program` (a script and its arguments, or `-m module ...`)."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
           "--num_processes", str(num_processes)]
    if not torch.cuda.is_available():
        cmd += ["--mixed_precision", "no"]  # the shipped configs say bf16, for GPUs
    return cmd + list(program)


def stage_command(accelerate_config: str, num_processes: int, stage: str, args: list[str]) -> list[str]:
    return accelerate_command(accelerate_config, num_processes, ["-m", "csr.cli", stage, *args])


def launch_stage(cfg: CSRConfig, accelerate_config: str, stage: str, args: list[str]) -> None:
    cmd = stage_command(accelerate_config, cfg.run.num_processes, stage, args)
    log.info("launching: %s", " ".join(cmd))
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"stage '{stage}' failed on {cfg.run.num_processes} processes (exit "
                           f"{result.returncode}); its output is above. Rerun `csr run` to resume.")
