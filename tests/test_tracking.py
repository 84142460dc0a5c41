"""Tracking: a wandb offline run per round and stage, and TensorBoard events, from a tiny run."""

import os
from pathlib import Path

import pytest

from csr.config import load_config
from csr.loop import run

ROOT = Path(__file__).parent.parent


def tiny(tiny_llava_dir, tiny_clip_dir, out, *extra):
    return load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [
        f"model.model_name_or_path={tiny_llava_dir}", f"score.clip_model={tiny_clip_dir}",
        f"data.prompts={ROOT / 'data/tiny/prompts.json'}", f"data.image_root={ROOT / 'data/tiny/images'}",
        f"run.output_dir={out}", "run.rounds=1", *extra])


def test_wandb_offline_runs_per_stage(tiny_llava_dir, tiny_clip_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb.proto.wandb_internal_pb2 import RunRecord

    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_DIR", "WANDB_RUN_GROUP"):  # set then unset, so monkeypatch restores them
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    out = tmp_path / "csr-group-check"
    run(tiny(tiny_llava_dir, tiny_clip_dir, out, "run.report_to=wandb"))
    assert "WANDB_RUN_GROUP" not in os.environ and "WANDB_DIR" not in os.environ  # put back
    wandb.teardown()  # the service closes the logs asynchronously after run.finish(); wait for it
    # offline runs are protobuf logs (synced later with `wandb sync`); the logged keys are in them
    logs = [p.read_bytes() for p in (out / "wandb").glob("offline-run-*/run-*.wandb")]
    assert len(logs) == 4  # score, train (TRL), pairs, summary: one group, one run each

    def runs_with(*keys):
        return sum(all(k.encode() in b for k in keys) for b in logs)
    assert runs_with("clip_score", "self_reward", "reward") == 1
    assert runs_with("pair_margin", "sample_pairs", "chosen_score_mean") == 1
    assert runs_with("rewards/margins") == 1  # DPO's own metrics from TRL
    # every run, TRL's included, carries the group field itself (not just the folder in a path)
    group_field = RunRecord(run_group=out.name).SerializeToString()
    assert all(group_field in b for b in logs)


def test_tensorboard_events(tiny_llava_dir, tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    run(tiny(tiny_llava_dir, tiny_clip_dir, out, "run.report_to=tensorboard"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
