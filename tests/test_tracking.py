"""Tracking: wandb (offline) runs per round and stage and TensorBoard events from a tiny run; a rerun
of the finished run adds no run and no point."""

import json
import os
import struct
from collections import Counter
from pathlib import Path

import pytest

from csr.config import ConfigError, load_config
from csr.loop import run
from csr.tracking import flatten, run_id, summary_rows, tracker_names

ROOT = Path(__file__).parent.parent


def tiny(tiny_llava_dir, tiny_clip_dir, out, *extra):
    return load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [
        f"model.model_name_or_path={tiny_llava_dir}", f"score.clip_model={tiny_clip_dir}",
        f"data.prompts={ROOT / 'data/tiny/prompts.json'}", f"data.image_root={ROOT / 'data/tiny/images'}",
        f"run.output_dir={out}", "run.rounds=1", *extra])


def wandb_records(path: Path):
    """The records of an offline .wandb file (LevelDB log format: 32 KiB blocks of crc/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""  # 7: the ':W&B' file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_runs(out: Path) -> list[dict]:
    runs = []
    for f in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        info = {"history": []}
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(id=rec.run.run_id, name=rec.run.display_name, group=rec.run.run_group,
                            job_type=rec.run.job_type)
            elif kind == "history":
                info["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                        for i in rec.history.item})
        runs.append(info)
    return runs


def tensorboard_points(root: Path) -> Counter:
    """(event file's folder, tag, step) -> how many times it was written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points = Counter()
    for f in root.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(f)).Load():
            for value in event.summary.value:
                points[(f.parent.name, value.tag, event.step)] += 1
    return points


def test_report_to_names_several_trackers_and_refuses_unknown_ones():
    assert tracker_names("wandb,tensorboard") == ["wandb", "tensorboard"]
    assert tracker_names(["tensorboard", " wandb "]) == ["tensorboard", "wandb"]
    assert tracker_names("none") == [] and tracker_names(None) == []
    assert load_config(None, ["run.report_to=[wandb, tensorboard]"]).run.report_to == "wandb,tensorboard"
    with pytest.raises(ConfigError, match="run.report_to.*'tensorbord'"):
        load_config(None, ["run.report_to=wandb,tensorbord"])
    assert flatten({"pope": {"all": {"f1": 0.5}}, "model": "x"}) == {"pope/all/f1": 0.5}


def test_summary_rows_start_at_round_0():
    summary = {"base_eval": {"pope": {"f1": 0.5}},
               "rounds": [{"round": 1, "eval": {"pope": {"f1": 0.6}}, "stages": {"pairs": {"pairs": 4}}}]}
    assert summary_rows(summary) == [{"round": 0, "eval/pope/f1": 0.5},
                                     {"round": 1, "eval/pope/f1": 0.6, "pairs/pairs": 4}]


def test_wandb_and_tensorboard_then_a_rerun_logs_nothing_twice(tiny_llava_dir, tiny_clip_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_PROJECT", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.setenv(key, "")  # set then unset, so monkeypatch restores them
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # a stray ./runs folder (TensorBoard's default) would show here
    out = tmp_path / "csr-group-check"
    cfg = tiny(tiny_llava_dir, tiny_clip_dir, out, "run.report_to=wandb,tensorboard")
    run(cfg)
    assert "WANDB_RUN_GROUP" not in os.environ and "WANDB_RUN_ID" not in os.environ  # put back
    wandb.teardown()  # the service closes the logs asynchronously after run.finish(); wait for it
    runs = wandb_runs(out)
    by_name = {r["name"]: r for r in runs}
    assert sorted(by_name) == ["round1-pairs", "round1-score", "round1-train", "summary"]
    assert all(r["group"] == out.name for r in runs)
    assert {n: r["job_type"] for n, r in by_name.items()} == {
        "round1-pairs": "pairs", "round1-score": "score", "round1-train": "train", "summary": "summary"}
    assert all(r["id"] == run_id(out, n) for n, r in by_name.items())  # stable ids, TRL's included
    assert any("train/rewards/margins" in h or "rewards/margins" in h for h in by_name["round1-train"]["history"])
    score_keys = set(by_name["round1-score"]["history"][0])  # histograms are stored as nested keys
    assert {"score/clip_score/bins", "score/self_reward/bins", "score/reward/bins", "score/trees", "round"} <= score_keys
    # the summary: round 0 (the base model) and round 1, against the round
    assert [h["round"] for h in by_name["summary"]["history"]] == [0, 1]
    assert by_name["summary"]["history"][1]["pairs/pairs"] >= 1

    tb = tensorboard_points(out / "tensorboard")
    assert {folder for folder, _, _ in tb} == {"csr", "round1-train"}  # one root for the run
    tags = {tag for _, tag, _ in tb}
    assert {"score/sentences", "pairs/margin_mean"} <= tags and not any("eval/eval" in t for t in tags)
    assert not (tmp_path / "runs").exists() and not list((out / "round_1" / "train").glob("runs"))
    # each of csr's points once (the Trainer itself writes train/epoch twice at its last step)
    assert [p for p, n in tb.items() if n > 1 and p[0] == "csr"] == []

    run(cfg)  # the finished run again: nothing to log
    wandb.teardown()
    assert [r["id"] for r in wandb_runs(out)] == [r["id"] for r in runs]
    assert tensorboard_points(out / "tensorboard") == tb
