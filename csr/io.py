"""Files between stages: atomic writes, append-only JSONL with torn-line repair, stage markers.

Stages talk through files in the run directory. A stage's output is only trusted when its
`DONE.json` marker exists; the marker is written last and atomically, so an interrupted stage is
never taken as finished.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

DONE = "DONE.json"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_savefig(fig, path: str | Path, dpi: float | str = "figure") -> None:
    """Save a matplotlib figure beside `path` (same suffix, so the format is kept), then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write a whole JSONL file atomically; returns the record count."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield the records of a JSONL file; a malformed line is an error naming file and line."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg}).") from None


def repair_jsonl_tail(path: str | Path) -> int:
    """Drop a torn last line left by a killed writer; returns the number of intact records.

    Only the final line may be torn (appends are line-at-a-time); a bad line elsewhere is real
    corruption and raises.
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data:
        return 0
    lines = data.split(b"\n")
    keep = len(lines)
    if lines[-1] != b"":  # no trailing newline: the last write was cut
        keep = len(lines) - 1
        log.warning("%s: dropping a torn last line (%d bytes) from an interrupted write", path, len(lines[-1]))
    good = [ln for ln in lines[:keep] if ln.strip()]
    for n, ln in enumerate(good, 1):
        try:
            json.loads(ln)
        except json.JSONDecodeError:
            if n == len(good):
                log.warning("%s: dropping an unreadable last line from an interrupted write", path)
                good = good[:-1]
            else:
                raise ValueError(f"{path}:{n}: malformed JSON line in the middle of the file; "
                                 f"the file is corrupt, delete it to recompute the stage.") from None
    fixed = b"".join(ln + b"\n" for ln in good)
    if fixed != data:
        atomic_write_text(path, fixed.decode("utf-8"))
    return len(good)


class JsonlAppender:
    """Append records one line at a time, flushed and fsynced: a kill loses at most the torn line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Stage bookkeeping
# ---------------------------------------------------------------------------------------------


def is_done(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / DONE).is_file()


def mark_done(stage_dir: str | Path, summary: dict) -> None:
    atomic_write_json(Path(stage_dir) / DONE, summary)


def read_done(stage_dir: str | Path) -> dict:
    path = Path(stage_dir) / DONE
    try:
        done = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageInputMissing(f"{path} is unreadable ({type(e).__name__}); it is written last and whole, so it "
                                f"was damaged after the stage: delete it to redo the stage.") from None
    if not isinstance(done, dict):
        raise StageInputMissing(f"{path} does not hold a stage summary; delete it to redo the stage.")
    return done


class StageInputMissing(FileNotFoundError):
    """A stage's input is not there: the message names the stage to run first."""


def require_done(stage_dir: str | Path, producer: str) -> Path:
    stage_dir = Path(stage_dir)
    if not is_done(stage_dir):
        raise StageInputMissing(f"input '{stage_dir}' is missing or unfinished: run the '{producer}' "
                                f"stage first (e.g. `csr {producer} ...` or `csr run`).")
    return stage_dir


class StageSummary:
    """Processed / skipped (by reason) / failed counts for a stage, logged and stored in DONE.json."""

    def __init__(self, stage: str):
        self.stage = stage
        self.processed = 0
        self.skipped: Counter = Counter()
        self.failed = 0
        self.extra: dict = {}

    def skip(self, reason: str, what: str = "") -> None:
        self.skipped[reason] += 1
        log.warning("[%s] skipped %s: %s", self.stage, what, reason)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "processed": self.processed,
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "failed": self.failed, **self.extra}

    def log(self) -> None:
        d = self.as_dict()
        log.info("[%s] processed %d, skipped %d %s, failed %d", self.stage, d["processed"],
                 d["skipped_total"], d["skipped"] or "", d["failed"])
