"""Tracking for the round loop: one wandb group per run, one wandb run per round and stage.

`run.report_to` picks the tracker: none, wandb (online, or offline with WANDB_MODE=offline and
synced later with `wandb sync`), or tensorboard (event files under <run_dir>/tensorboard). DPO
training logs through TRL's own `report_to` (the train stage passes the same setting), named
into the same group.

Logged per round: score distributions (CLIP 100·cos, self-reward, calibrated reward) as
histograms, a histogram of pair margins, chosen/rejected reward means, a table of sample pairs
with the image and both texts, eval metrics, and the metrics across rounds in the run summary.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class NullTracker:
    def stage(self, round_: int, stage: str, data: dict) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, run_dir: Path, config: dict, project: str | None = None):
        import wandb

        self.wandb = wandb
        # a user's WANDB_RUN_GROUP / WANDB_DIR win, for our runs and TRL's alike
        self.group = os.environ.get("WANDB_RUN_GROUP") or Path(run_dir).name
        self.project = project or os.environ.get("WANDB_PROJECT", "csr")
        self.run_dir = Path(run_dir)
        self.config = config
        # TRL's train runs (in this process or one accelerate launches) read the group and the
        # folder from the environment; finish() puts the environment back for the next run
        self._saved_env = {k: os.environ.get(k) for k in ("WANDB_RUN_GROUP", "WANDB_DIR")}
        os.environ["WANDB_RUN_GROUP"] = self.group
        os.environ.setdefault("WANDB_DIR", str(self.run_dir))

    def _run(self, name: str, job_type: str):
        return self.wandb.init(project=self.project, group=self.group, name=name, job_type=job_type,
                               config=self.config, reinit="finish_previous")

    def stage(self, round_: int, stage: str, data: dict) -> None:
        run = self._run(f"{self.group}-round{round_}-{stage}", stage)
        wb = self.wandb
        logged = {}
        for key, values in data.get("histograms", {}).items():
            if values:
                logged[key] = wb.Histogram(values)
        for key, rows in data.get("tables", {}).items():
            columns = list(rows[0]) if rows else []
            table = wb.Table(columns=columns)
            for row in rows:
                table.add_data(*[wb.Image(v) if k == "image" else v for k, v in row.items()])
            logged[key] = table
        logged.update({k: v for k, v in data.get("scalars", {}).items() if isinstance(v, (int, float))})
        logged["round"] = round_
        run.log(logged)
        run.finish()

    def finish(self, summary: dict) -> None:
        run = self._run(f"{self.group}-summary", "summary")
        for r in summary.get("rounds", []):
            run.log({"round": r["round"], **flatten(r.get("eval") or {}, "eval"),
                     **flatten(r["stages"].get("pairs", {}), "pairs")})
        run.finish()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class TensorboardTracker(NullTracker):
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def stage(self, round_: int, stage: str, data: dict) -> None:
        import numpy as np

        for key, values in data.get("histograms", {}).items():
            if values:
                self.writer.add_histogram(f"{stage}/{key}", np.asarray(values), round_)
        for key, value in data.get("scalars", {}).items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{stage}/{key}", value, round_)
        self.writer.flush()

    def finish(self, summary: dict) -> None:
        self.writer.close()


def flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def make_tracker(report_to: str, run_dir: Path, config: dict):
    if report_to in ("none", "", None):
        return NullTracker()
    if report_to == "wandb":
        return WandbTracker(run_dir, config)
    if report_to == "tensorboard":
        return TensorboardTracker(run_dir)
    raise ValueError(f"run.report_to={report_to!r}: use none, wandb or tensorboard.")


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
    samples = []
    for p in pairs[:n_samples]:
        samples.append({"id": str(p["id"]), "image": p["images"][0], "prompt": p["prompt"][0]["content"][-1]["text"],
                        "chosen": p["chosen"][0]["content"][0]["text"],
                        "rejected": p["rejected"][0]["content"][0]["text"], "margin": p["margin"]})
    return {"histograms": {"pair_margin": [p["margin"] for p in pairs]},
            "tables": {"sample_pairs": samples},
            "scalars": {k: summary.get(k) for k in ("pairs", "chosen_score_mean", "rejected_score_mean",
                                                     "margin_mean", "skipped_total")}}
