"""What keeps a run folder the user's data safe: ownership, one writer, and settings that match.

- **Ownership.** A folder csr writes into (a run folder, a world folder) carries a marker written
  when csr creates it. csr refuses a non-empty folder it did not create, unless everything in it is
  something csr itself writes there (a run made by an older csr); it never deletes a user's files.
- **One writer.** `FolderLock` holds an OS-level lock (`flock`) on `<folder>/.csr-lock` for the
  whole run or stage; a second process refuses at once, naming the holder's pid. The system drops
  the lock of a killed process, so a stale lock is taken over without anyone's help.
- **Settings that match.** Each stage records, when it starts and in its DONE.json, the recipe
  values its result depends on (`stage_settings`) and a fingerprint of them and of its inputs.
  Resuming with other values is refused with the changed keys and the two ways forward (a new
  output_dir, or `csr run --redo-from STAGE`, which moves the stale outputs aside); never mixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from csr.config import ConfigError, CSRConfig
from csr.io import DONE, atomic_write_json, is_done, read_done

log = logging.getLogger(__name__)

MARKER = ".csr-owned"
LOCK = ".csr-lock"
STARTED = "STAGE.json"
STAGES = ("generate", "score", "pairs", "yesno", "train", "merge")  # yesno: only with yesno.enabled

# What csr itself writes in a run folder (a run made before the marker existed is recognised by these).
RUN_ENTRIES = re.compile(r"^(config\.yaml|summary\.json|report\.md|metrics\.png|eval|round_\d+|wandb|tensorboard|"
                         r"tracking\.json|view|stale|\.csr-.*|\..*\.tmp.*)$")
WORLD_ENTRIES = re.compile(r"^(train|test|models|vocab\.json|DONE\.json|\.csr-.*|\..*\.tmp.*)$")


class RunLocked(ConfigError):
    """Another process is writing the folder."""


class SettingsChanged(ConfigError):
    """A finished or half-finished stage was made with other settings than the recipe's."""


# ---------------------------------------------------------------------------------------------
# Ownership
# ---------------------------------------------------------------------------------------------


def check_output_dir(path: str | Path, key: str) -> Path:
    """Refuse an output folder that is empty text, the current folder, or a file."""
    text = str(path).strip()
    if not text or Path(text).resolve() == Path.cwd().resolve():
        raise ConfigError(f"{key}={str(path)!r} would write into the current folder; name a folder of its own "
                          f"(e.g. {key}=data/runs/my-run).")
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}='{p}' is a file, not a folder; name a folder.")
    return p


def legacy_run(path: Path) -> bool:
    """A run folder made by a csr without the marker: its config.yaml is a csr recipe."""
    import yaml

    from csr.config import SECTIONS

    try:
        recipe = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(recipe, dict) and bool(recipe) and set(recipe) <= set(SECTIONS)


def legacy_world(path: Path) -> bool:
    """A world folder made by a csr without the marker: its DONE.json records the world's settings."""
    try:
        return "settings" in read_done(path)
    except (OSError, json.JSONDecodeError):
        return False


def claim_folder(path: str | Path, key: str, entries: re.Pattern = RUN_ENTRIES,
                 legacy: Callable[[Path], bool] = legacy_run) -> Path:
    """Make `path` csr's own: create it with the marker, or accept it when csr made it (the marker, or
    a folder an older csr made: only entries csr writes there and `legacy(path)`); refuse any other
    non-empty folder. Nothing is deleted."""
    path = check_output_dir(path, key)
    if (path / MARKER).is_file():
        return path
    if path.exists() and any(path.iterdir()):
        names = sorted(p.name for p in path.iterdir() if not p.name.startswith(".csr-"))  # its lock: csr's
        foreign = [n for n in names if not entries.match(n)] or ([] if not names or legacy(path) else names)
        if foreign:
            shown = ", ".join(f"'{n}'" for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ConfigError(f"{key}='{path}' already holds files csr did not write ({shown}); csr writes only "
                              f"into folders it created. Name a new or empty folder.")
    path.mkdir(parents=True, exist_ok=True)
    from csr import __version__

    atomic_write_json(path / MARKER, {"created_by": f"csr {__version__}", "key": key,
                                      "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return path


def owns(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


# ---------------------------------------------------------------------------------------------
# One writer
# ---------------------------------------------------------------------------------------------


class FolderLock:
    """`with FolderLock(folder):` the one process writing `folder` (a run, or a stage run alone)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock, say so once
            log.warning("no file locking on this system: make sure one process writes %s", self.folder)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"'{self.folder}' is being written by another csr process (pid {holder}); wait for it "
                            f"to finish or stop it. A lock left by a killed process is released by the system.") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def lock_if_main_process(folder: str | Path):
    """A stage run alone locks its output folder; under a distributed launcher only rank 0 does."""
    return FolderLock(folder) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Settings that match
# ---------------------------------------------------------------------------------------------

# Keys that change speed, memory or logging, never a stage's result.
NOT_RESULTS = {
    "model.device", "generate.node_batch_size", "generate.prompt_batch_size", "generate.implementation",
    "generate.prefix_attention", "generate.reuse_decode_kv",  # the same trees (tests/test_generate_equivalence.py)
    "score.clip_batch_size", "score.vig_batch_size", "score.tree_batch_size",
}
TRAIN_NOT_RESULTS = re.compile(r"^(logging_.*|save_.*|report_to|output_dir|keep_checkpoints|run_name|"
                               r"dataloader_.*|disable_tqdm|push_to_hub.*|hub_.*|overwrite_output_dir)$")
CLEANING_KEYS = ("cleaning", "min_sentence_chars", "max_repeats", "max_newlines", "drop_unexpected_scripts",
                 "vig_filter")


def _section(cfg: CSRConfig, name: str, keys: tuple | None = None) -> dict:
    values = getattr(cfg, name)
    values = dict(values) if isinstance(values, dict) else dataclasses.asdict(values)
    if keys is not None:
        values = {k: values[k] for k in keys if k in values}
    if name == "train":
        return {k: v for k, v in values.items() if not TRAIN_NOT_RESULTS.match(k)}
    return {k: v for k, v in values.items() if f"{name}.{k}" not in NOT_RESULTS}


def stage_settings(cfg: CSRConfig, stage: str) -> dict:
    """The recipe values a stage's result depends on, as {"section.key": value}."""
    model = _section(cfg, "model", ("model_name_or_path", "torch_dtype", "trust_remote_code", "chat_template",
                                     "image_aspect"))
    parts: dict[str, dict] = {}
    if stage == "generate":
        parts = {"model": model, "data": _section(cfg, "data"), "generate": _section(cfg, "generate"),
                 "run": {"seed": cfg.run.seed}}
        if cfg.generate.selection == "calibrated":  # the search ranks by the calibrated reward: every term's
            parts["score"] = _section(cfg, "score")  # settings (VIG's and any registered term's weight too)
    elif stage == "score":
        parts = {"model": model, "score": _section(cfg, "score"), "pairs": _section(cfg, "pairs", CLEANING_KEYS)}
    elif stage == "pairs":
        parts = {"pairs": _section(cfg, "pairs")}
    elif stage == "yesno":  # the yes/no questions, their rewards (yesno.reward_lambda, CLIP) and the mix
        parts = {"model": model, "yesno": _section(cfg, "yesno"), "run": {"seed": cfg.run.seed},
                 "score": _section(cfg, "score", ("clip_backend", "clip_model", "clip_pretrained"))}
    elif stage == "train":
        parts = {"model": model, "train": _section(cfg, "train"), "run": {"seed": cfg.run.seed}}
    elif stage == "merge":
        return {"merge.dtype": cfg.run.policy_dtype}  # what `csr run` merges the next round's policy in
    else:
        raise ValueError(f"unknown stage {stage!r}")
    parts["model"] = {k: v for k, v in parts.get("model", {}).items() if k != "model_name_or_path"}
    return {f"{s}.{k}": v for s, values in parts.items() for k, v in values.items()}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _input_identity(path: str | Path | None) -> str | None:
    """An input stage or model folder: its own fingerprint when csr made it, else its path."""
    if path is None:
        return None
    p = Path(path)
    if is_done(p):
        done = read_done(p)
        if "fingerprint" in done:
            return done["fingerprint"]
    return str(path)


def _recorded(out_dir: Path) -> dict | None:
    for name in (DONE, STARTED):
        f = out_dir / name
        if f.is_file():
            try:
                record = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                raise ConfigError(f"{f} is unreadable (a torn write?); delete it to redo the stage.") from None
            if "fingerprint" in record:
                return record
    return None


def changed_keys(old: dict, new: dict) -> list[str]:
    """The result keys that differ (a speed key an older csr recorded is none)."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in NOT_RESULTS]


def ways_forward(stage: str) -> str:
    return (f"Either name a new run.output_dir, or rerun with `csr run ... --redo-from {stage}`, which moves the "
            f"'{stage}' outputs and everything after them aside (into <run>/stale/) and redoes them.")


class StageGuard:
    """The bookkeeping of one stage folder: skip when done with the same settings and inputs, refuse
    when made with others, record the settings when starting and finishing."""

    def __init__(self, out_dir: str | Path, stage: str, cfg: CSRConfig | None, inputs: tuple = (),
                 settings: dict | None = None):
        self.out_dir, self.stage = Path(out_dir), stage
        self.settings = settings if settings is not None else stage_settings(cfg, stage)
        self.inputs = [_input_identity(i) for i in inputs]
        self.fingerprint = _digest({"settings": self.settings, "inputs": self.inputs})

    def finished(self) -> dict | None:
        """The stored summary when the stage is done with these settings (logged: the stage skips its
        work); None when it must run. The one "done? skip : run" of every stage.

        Raises SettingsChanged when the folder (finished or half-finished) was made with others.
        """
        record = _recorded(self.out_dir)
        if record is None:
            if is_done(self.out_dir):
                log.info("[%s] %s was finished by an older csr (no settings recorded); keeping it", self.stage,
                         self.out_dir)
                return read_done(self.out_dir)
            return None
        if record["fingerprint"] != self.fingerprint and not self._same_results(record):
            keys = changed_keys(record.get("settings", {}), self.settings)
            what = "; ".join(keys) if keys else "its input (an earlier stage or the policy) changed"
            state = "finished" if is_done(self.out_dir) else "half-finished"
            raise SettingsChanged(f"{self.out_dir} was {state} with other settings: {what}. {ways_forward(self.stage)}")
        if not is_done(self.out_dir):
            return None
        log.info("[%s] %s is finished; skipping", self.stage, self.out_dir)
        return read_done(self.out_dir)

    def _same_results(self, record: dict) -> bool:
        """A record made when a speed key (NOT_RESULTS) still counted as a setting: the same stage without it
        (its fingerprint holds today's inputs, and its other settings are today's)."""
        old = record.get("settings", {})
        return _digest({"settings": old, "inputs": self.inputs}) == record["fingerprint"] and \
            {k: v for k, v in old.items() if k not in NOT_RESULTS} == self.settings

    def start(self) -> None:
        atomic_write_json(self.out_dir / STARTED, {"stage": self.stage, "fingerprint": self.fingerprint,
                                                   "settings": self.settings, "inputs": self.inputs})

    def record(self, summary: dict) -> dict:
        """`summary` with the settings and fingerprint, for DONE.json."""
        return {**summary, "fingerprint": self.fingerprint, "settings": self.settings}


def stage_dirs(run_dir: Path) -> list[tuple[int, str, Path]]:
    """(round, stage, folder) of every stage folder of a run, in running order."""
    rounds = sorted((int(p.name.split("_")[1]), p) for p in run_dir.glob("round_*") if p.name.split("_")[1].isdigit())
    return [(r, s, p / s) for r, p in rounds for s in STAGES if (p / s).is_dir()]


def check_resume(cfg: CSRConfig, run_dir: Path) -> None:
    """Before any work: refuse a rerun whose recipe changes what a kept stage was made with."""
    problems = []
    for r, stage, folder in stage_dirs(run_dir):
        record = _recorded(folder)
        if record is None:
            continue
        keys = changed_keys(record.get("settings", {}), stage_settings(cfg, stage))
        if keys:
            problems.append((r, stage, f"round_{r}/{stage}: " + "; ".join(keys)))
    if problems:
        first = min(problems, key=lambda p: (p[0], STAGES.index(p[1])))
        listing = "\n  ".join(p[2] for p in problems)
        raise SettingsChanged(f"{run_dir} holds stages made with other settings than this recipe:\n  {listing}\n"
                              f"{ways_forward(first[1])}")


def redo_from(run_dir: Path, stage: str, from_round: int = 1) -> Path | None:
    """Move `stage` and everything after it (from round `from_round` on) aside into <run>/stale/<time>/.

    Returns the folder they were moved to (None when nothing was there). Nothing is deleted.
    """
    if stage not in STAGES:
        raise ConfigError(f"--redo-from {stage!r} is not a stage; stages: {', '.join(STAGES)}.")
    stale = run_dir / "stale" / time.strftime("%Y%m%d-%H%M%S")
    moved = False
    for r, s, folder in stage_dirs(run_dir):
        if r > from_round or (r == from_round and STAGES.index(s) >= STAGES.index(stage)):
            target = stale / f"round_{r}" / s
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(folder), str(target))
            moved = True
    for f in (run_dir / "eval").glob("round_*.json") if (run_dir / "eval").is_dir() else []:
        k = int(f.stem.split("_")[1])
        if k >= from_round:  # the metrics of models that will be remade
            (stale / "eval").mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), str(stale / "eval" / f.name))
            d = f.with_suffix("")
            if d.is_dir():
                shutil.move(str(d), str(stale / "eval" / d.name))
            moved = True
    if moved:
        log.warning("moved the stale outputs from round %d %s on into %s", from_round, stage, stale)
    return stale if moved else None

