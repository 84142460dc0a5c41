"""Tracking for the round loop: one wandb group per run, one wandb run per round and stage.

`run.report_to` names the trackers, a list or a comma-separated string: none, wandb (online, or
offline with WANDB_MODE=offline and synced later with `wandb sync`), tensorboard (event files under
<run_dir>/tensorboard, the one root of the run: TRL's train logs go to tensorboard/round{N}-train).
DPO training logs through TRL's own `report_to` (the train stage passes the same trackers), as the
wandb run `round{N}-train` of the same group with job type `train`.

A rerun or a resume logs nothing twice: every wandb run has a stable id (from the run folder, the
round and the stage; a resumed one continues where wandb allows), and `<run_dir>/tracking.json`
records what each tracker has logged, so a finished stage is not logged again. The summary run
holds the eval and pair metrics of every round, round 0 (the base model) included, against `round`.

Logged per round: score distributions (CLIP 100·cos, self-reward, calibrated reward) as
histograms, a histogram of pair margins, chosen/rejected reward means, a table of sample pairs
with the image and both texts, eval metrics, and the metrics across rounds in the run summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from csr.io import atomic_write_json

log = logging.getLogger(__name__)

TRACKERS = ("wandb", "tensorboard")
LEDGER = "tracking.json"
TENSORBOARD_DIR = "tensorboard"


def tracker_names(report_to) -> list[str]:
    """`report_to` (a list, or names separated by commas) as the trackers to run; [] for none."""
    if report_to is None:
        return []
    items = report_to if isinstance(report_to, (list, tuple)) else str(report_to).split(",")
    names = [str(n).strip() for n in items if str(n).strip() and str(n).strip() != "none"]
    for n in names:
        if n not in TRACKERS:
            raise ValueError(f"'{n}' is not a tracker csr runs; choose from none, {', '.join(TRACKERS)} "
                             f"(several: a list or comma-separated)")
    return list(dict.fromkeys(names))


def run_id(run_dir: Path, name: str) -> str:
    """A wandb run id that is the same for the same run folder and name on every rerun."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    return f"csr-{digest}-{name}"


class Ledger:
    """What each tracker has logged, in <run_dir>/tracking.json, so that a rerun logs it once."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LEDGER
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def has(self, tracker: str, key: str) -> bool:
        return key in self.data.get(tracker, [])

    def add(self, tracker: str, key: str) -> None:
        self.data.setdefault(tracker, []).append(key)
        atomic_write_json(self.path, self.data)


class NullTracker:
    def stage(self, round_: int, stage: str, data: dict) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass

    def train_env(self, round_: int) -> dict[str, str]:
        """Environment for TRL's train run of `round_` (read in this process or one accelerate launches)."""
        return {}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for the block, then put the old values back."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MultiTracker(NullTracker):
    def __init__(self, trackers: list):
        self.trackers = trackers

    def stage(self, round_, stage, data):
        for t in self.trackers:
            t.stage(round_, stage, data)

    def finish(self, summary):
        for t in self.trackers:
            t.finish(summary)

    def train_env(self, round_):
        env = {}
        for t in self.trackers:
            env.update(t.train_env(round_))
        return env


class WandbTracker(NullTracker):
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, project: str | None = None, ledger: Ledger | None = None):
        import wandb

        self.wandb = wandb
        # a user's WANDB_RUN_GROUP / WANDB_DIR / WANDB_PROJECT win, for our runs and TRL's alike
        self.group = os.environ.get("WANDB_RUN_GROUP") or Path(run_dir).name
        self.project = project or os.environ.get("WANDB_PROJECT", "csr")
        self.run_dir = Path(run_dir)
        self.config = config
        self.ledger = ledger or Ledger(run_dir)
        self.dir = os.environ.get("WANDB_DIR") or str(self.run_dir)

    def _run(self, name: str, job_type: str):
        return self.wandb.init(project=self.project, group=self.group, name=name, job_type=job_type,
                               id=run_id(self.run_dir, name), resume="allow", dir=self.dir,
                               config=self.config, reinit="finish_previous")

    def stage(self, round_: int, stage: str, data: dict) -> None:
        name = f"round{round_}-{stage}"
        if self.ledger.has(self.name, name):
            return
        run = self._run(name, stage)
        wb = self.wandb
        logged = {}
        for key, values in data.get("histograms", {}).items():
            if values:
                logged[f"{stage}/{key}"] = wb.Histogram(values)
        for key, rows in data.get("tables", {}).items():
            columns = list(rows[0]) if rows else []
            table = wb.Table(columns=columns)
            for row in rows:
                table.add_data(*[wb.Image(v) if k == "image" else v for k, v in row.items()])
            logged[f"{stage}/{key}"] = table
        logged.update({f"{stage}/{k}": v for k, v in data.get("scalars", {}).items() if _number(v)})
        logged["round"] = round_
        run.log(logged)
        run.finish()
        self.ledger.add(self.name, name)

    def finish(self, summary: dict) -> None:
        rows = summary_rows(summary)
        new = [r for r in rows if not self.ledger.has(self.name, f"summary-round{r['round']}")]
        if not new:
            return
        run = self._run("summary", "summary")
        run.define_metric("round")
        run.define_metric("*", step_metric="round")
        for row in new:
            run.log(row)
        run.finish()
        for row in new:
            self.ledger.add(self.name, f"summary-round{row['round']}")

    def train_env(self, round_: int) -> dict[str, str]:
        # wandb reads WANDB_* from the environment once per process, when it is first set up; this
        # tracker's own runs set it up, so without a teardown an in-process train stage's TRL run
        # would ignore the id, name and folder below (a random id, logged to ./wandb)
        self.wandb.teardown()
        name = f"round{round_}-train"
        return {"WANDB_PROJECT": self.project, "WANDB_RUN_GROUP": self.group, "WANDB_DIR": self.dir,
                "WANDB_JOB_TYPE": "train", "WANDB_RUN_ID": run_id(self.run_dir, name), "WANDB_RESUME": "allow",
                "WANDB_NAME": name}


class TensorboardTracker(NullTracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, ledger: Ledger | None = None):
        self.root = Path(run_dir) / TENSORBOARD_DIR
        self.ledger = ledger or Ledger(run_dir)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:  # opened on the first point: a rerun that logs nothing adds no file
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.root / "csr"))
        return self._writer

    def stage(self, round_: int, stage: str, data: dict) -> None:
        import numpy as np

        key = f"round{round_}-{stage}"
        if self.ledger.has(self.name, key):
            return
        for name, values in data.get("histograms", {}).items():
            if values:
                self.writer.add_histogram(f"{stage}/{name}", np.asarray(values), round_)
        for name, value in data.get("scalars", {}).items():
            if _number(value):
                self.writer.add_scalar(f"{stage}/{name}", value, round_)
        self.writer.flush()
        self.ledger.add(self.name, key)

    def finish(self, summary: dict) -> None:
        if self._writer is not None:
            self._writer.close()

    def train_env(self, round_: int) -> dict[str, str]:
        return {"TENSORBOARD_LOGGING_DIR": str(self.root / f"round{round_}-train")}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'pope': {'all': {'f1': x}}} -> {'prefix/pope/all/f1': x} (no prefix: 'pope/all/f1'); numbers only."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif _number(v):
            out[key] = v
    return out


def summary_rows(summary: dict) -> list[dict]:
    """One row per model, round 0 (the base) first: eval metrics and the round's pair statistics."""
    rows = [{"round": 0, **flatten(summary.get("base_eval") or {}, "eval")}]
    for r in summary.get("rounds", []):
        rows.append({"round": r["round"], **flatten(r.get("eval") or {}, "eval"),
                     **flatten(r["stages"].get("pairs", {}), "pairs")})
    return rows


def make_tracker(report_to, run_dir: Path, config: dict):
    names = tracker_names(report_to)
    ledger = Ledger(run_dir)
    trackers = []
    for name in names:
        trackers.append(WandbTracker(run_dir, config, ledger=ledger) if name == "wandb"
                        else TensorboardTracker(run_dir, ledger=ledger))
    if not trackers:
        return NullTracker()
    return trackers[0] if len(trackers) == 1 else MultiTracker(trackers)


# ---------------------------------------------------------------------------------------------
# What each stage contributes (pure: read the stage's files, return what to log)
# ---------------------------------------------------------------------------------------------


def score_stage_data(scored_trees: list[dict]) -> dict:
    nodes = [n for t in scored_trees for n in t["nodes"][1:] if n.get("reward") is not None]  # ranked nodes only
    return {"histograms": {"clip_score": [n["clip"] for n in nodes],
                           "self_reward": [n["self_reward"] for n in nodes],
                           "reward": [n["reward"] for n in nodes]},
            "scalars": {"sentences": len(nodes), "trees": len(scored_trees)}}


def pairs_stage_data(pairs: list[dict], summary: dict, n_samples: int = 8) -> dict:
    from csr.data import message_text

    samples = []
    for p in pairs[:n_samples]:
        samples.append({"id": str(p["id"]), "image": p["images"][0], "prompt": message_text(p["prompt"]),
                        "chosen": message_text(p["chosen"]), "rejected": message_text(p["rejected"]),
                        "margin": p["margin"]})
    return {"histograms": {"pair_margin": [p["margin"] for p in pairs]},
            "tables": {"sample_pairs": samples},
            "scalars": {k: summary.get(k) for k in ("pairs", "chosen_score_mean", "rejected_score_mean",
                                                     "margin_mean", "skipped_total")}}


def log_eval(tracker, round_: int, metrics: dict | None) -> None:
    """A model's eval metrics (round 0: the base model), as `eval/<metric path>`."""
    if metrics is not None:
        tracker.stage(round_, "eval", {"scalars": flatten(metrics)})


def log_round_stages(tracker, round_: int, round_dir: Path, pairs_summary: dict) -> None:
    """A finished round's score distributions and pairs, read from the round's score and pairs files."""
    from csr.io import read_jsonl

    tracker.stage(round_, "score", score_stage_data(read_jsonl(Path(round_dir) / "score" / "scored.jsonl")))
    tracker.stage(round_, "pairs", pairs_stage_data(read_jsonl(Path(round_dir) / "pairs" / "pairs.jsonl"),
                                                    pairs_summary))
