"""Launching the heavy stages on several processes (GPUs) from the single-process round loop.

With `run.num_processes > 1`, `csr run` stays one light process and starts generate and train as
`accelerate launch --config_file <run.accelerate_config> --num_processes N -m csr.cli <stage> ...`
on the run's resolved `config.yaml`; generate shards its prompts across the ranks, train runs
DDP or DeepSpeed as the accelerate config says. Score, pairs and merge are light and stay in the
loop's process. With one process (or on CPU), everything runs in-process.

Multi-node (`run.num_machines > 1`): every machine runs `csr run` on the same run folder (a shared
filesystem) with its `run.machine_rank`; the launches get `--num_machines`, `--machine_rank`,
`--main_process_ip`, `--main_process_port` and `num_processes x num_machines` processes in all.
Rank 0 runs the light stages, the eval and the tracking; the other machines wait for its files
(`recipes/launch.slurm` starts 2 nodes x 8 GPUs).
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
    if n == 1 and cfg.run.num_machines == 1:
        return None
    have, kind = available_devices()
    if n > have:
        raise ConfigError(f"run.num_processes={n} but this machine has {have} {kind}. Lower run.num_processes "
                          f"to at most {have}.")
    return resolve_accelerate_config(cfg.run.accelerate_config)


def accelerate_command(accelerate_config: str, num_processes: int, program: list[str], *,
                       num_machines: int = 1, machine_rank: int = 0, main_process_ip: str = "",
                       main_process_port: int = 29500) -> list[str]:
    """`accelerate launch` of `program` (a script and its arguments, or `-m module ...`); `num_processes`
    per machine."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
           "--num_processes", str(num_processes * num_machines)]
    if num_machines > 1:
        cmd += ["--num_machines", str(num_machines), "--machine_rank", str(machine_rank),
                "--main_process_ip", main_process_ip, "--main_process_port", str(main_process_port)]
    if not torch.cuda.is_available():
        cmd += ["--mixed_precision", "no"]  # the shipped configs say bf16, for GPUs
    return cmd + list(program)


def stage_command(accelerate_config: str, num_processes: int, stage: str, args: list[str], **machines) -> list[str]:
    """The accelerate command of a stage (`machines`: accelerate_command's multi-node settings)."""
    return accelerate_command(accelerate_config, num_processes, ["-m", "csr.cli", stage, *args], **machines)


def launch_stage(cfg: CSRConfig, accelerate_config: str, stage: str, args: list[str]) -> None:
    r = cfg.run
    cmd = stage_command(accelerate_config, r.num_processes, stage, args, num_machines=r.num_machines,
                        machine_rank=r.machine_rank, main_process_ip=r.main_process_ip,
                        main_process_port=r.main_process_port)
    log.info("launching: %s", " ".join(cmd))
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"stage '{stage}' failed on {cfg.run.num_processes} processes (exit "
                           f"{result.returncode}); its output is above. Rerun `csr run` to resume.")


def wait_for(stage_dir: Path, stage: str, *, poll_s: float = 10.0, timeout_s: float | None = None) -> dict:
    """On a machine of rank > 0: wait until rank 0 has finished `stage` in the shared run folder."""
    import time

    from csr.io import is_done, read_done

    started = time.monotonic()
    logged = False
    while not is_done(stage_dir):
        if not logged:
            log.info("waiting for machine 0 to finish %s (%s)", stage, stage_dir)
            logged = True
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"machine 0 has not finished the {stage} stage ({stage_dir}) in {timeout_s:.0f} s.")
        time.sleep(poll_s)
    return read_done(stage_dir)
