"""Tracking: wandb (offline) runs per round and stage and TensorBoard events, fed the round loop's calls
with scripted stage files and metrics; a rerun of the finished run adds no run and no point."""

import json
import os
import struct
from collections import Counter
from pathlib import Path

import pytest

from csr.config import ConfigError, load_config
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


def scripted_round(run_dir: Path) -> dict:
    """Round 1's score and pairs files as those stages write them, and the pairs stage's summary."""
    from PIL import Image

    from csr.io import write_jsonl

    rd = run_dir / "round_1"
    image = run_dir / "im.png"
    run_dir.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)
    nodes = [{"text": ""}] + [{"clip": 20.0 + i, "self_reward": 50.0 - i, "reward": 30.0 + i} for i in range(4)]
    write_jsonl(rd / "score" / "scored.jsonl", [{"id": "a", "nodes": nodes}, {"id": "b", "nodes": nodes[:3]}])
    pair = {"id": "a", "images": [str(image)], "margin": 1.5,
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A blue dog."}]}]}
    write_jsonl(rd / "pairs" / "pairs.jsonl", [pair])
    return {"pairs": 1, "chosen_score_mean": 33.0, "rejected_score_mean": 31.5, "margin_mean": 1.5, "skipped_total": 1}


def train_with_trl_callbacks(cfg, train_dir: Path) -> None:
    """What TRL's trainer does with the train stage's args about tracking: the reporting callbacks of
    `report_to`, built and run (begin, one logged step, end) in this process."""
    from transformers.integrations import get_reporting_integration_callbacks
    from transformers.trainer_callback import TrainerControl, TrainerState

    from csr.train.args import build_train_args
    from csr.tracking import tracker_names

    args = build_train_args(cfg, train_dir, cuda_available=False)
    assert args.report_to == tracker_names(cfg.run.report_to) and args.run_name == "round1-train"
    callbacks = [cls() for cls in get_reporting_integration_callbacks(args.report_to)]
    state, control = TrainerState(global_step=1), TrainerControl()
    for cb in callbacks:
        cb.on_train_begin(args, state, control)
        cb.on_log(args, state, control, logs={"loss": 0.69, "rewards/margins": 0.1, "epoch": 1.0})
        cb.on_train_end(args, state, control)


METRICS = [{"pope": {"f1": 0.5, "n": 8}}, {"pope": {"f1": 0.6, "n": 8}}]


def track_a_round(tmp_path: Path, monkeypatch, report_to: str):
    """The round loop's tracking calls (csr.loop.run's order) on scripted stage files and metrics, from
    a clean environment; returns the run folder and `again()`, which repeats them as a rerun of the
    finished run does (the train stage is then skipped, so TRL logs nothing)."""
    from csr.tracking import environment, log_eval, log_round_stages, make_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_PROJECT", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.setenv(key, "")  # set then unset, so monkeypatch restores them
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # a stray ./runs folder (TensorBoard's default) would show here
    out = tmp_path / "csr-group-check"
    pairs_summary = scripted_round(out)
    cfg = load_config(None, [f"run.output_dir={out}", f"run.report_to={report_to}", "run.rounds=1"])
    summary = {"base_eval": METRICS[0],
               "rounds": [{"round": 1, "eval": METRICS[1], "stages": {"pairs": pairs_summary}}]}

    def loop(train: bool):
        tracker = make_tracker(cfg.run.report_to, out, cfg.to_dict())
        log_eval(tracker, 0, METRICS[0])  # a tracker run before TRL's, as with a base eval
        if train:
            with environment(tracker.train_env(1)):
                train_with_trl_callbacks(cfg, out / "round_1" / "train")
        log_round_stages(tracker, 1, out / "round_1", pairs_summary)
        log_eval(tracker, 1, METRICS[1])
        tracker.finish(summary)
        if "wandb" in report_to:
            import wandb

            wandb.teardown()  # the service closes the logs asynchronously after run.finish(); wait for it

    loop(train=True)
    return out, lambda: loop(train=False)


def check_tensorboard(tmp_path: Path, out: Path) -> Counter:
    tb = tensorboard_points(out / "tensorboard")
    assert {folder for folder, _, _ in tb} == {"csr", "round1-train"}  # one root for the run
    tags = {tag for _, tag, _ in tb}
    assert {"score/sentences", "pairs/margin_mean", "eval/pope/f1", "train/rewards/margins"} <= tags
    assert not any("eval/eval" in t for t in tags)
    assert not (tmp_path / "runs").exists() and not list((out / "round_1" / "train").glob("runs"))
    # each of csr's points once (the Trainer itself writes train/epoch twice at its last step)
    assert [p for p, n in tb.items() if n > 1 and p[0] == "csr"] == []
    return tb


def test_tensorboard_under_one_root_then_a_rerun_logs_nothing_twice(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    out, again = track_a_round(tmp_path, monkeypatch, "tensorboard")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # put back after the train stage
    tb = check_tensorboard(tmp_path, out)
    again()
    assert tensorboard_points(out / "tensorboard") == tb


@pytest.mark.slow  # wandb's service takes seconds to start
def test_wandb_and_tensorboard_then_a_rerun_logs_nothing_twice(tmp_path, monkeypatch):
    """One wandb run per round and stage (TRL's train run among them) with stable ids, TensorBoard
    beside it, and a rerun of the finished run adds no run and no point."""
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    out, again = track_a_round(tmp_path, monkeypatch, "wandb,tensorboard")
    assert "WANDB_RUN_GROUP" not in os.environ and "WANDB_RUN_ID" not in os.environ  # put back
    runs = wandb_runs(out)
    by_name = {r["name"]: r for r in runs}
    assert sorted(by_name) == ["round0-eval", "round1-eval", "round1-pairs", "round1-score", "round1-train",
                               "summary"]
    assert all(r["group"] == out.name for r in runs)
    assert {n: r["job_type"] for n, r in by_name.items()} == {
        "round0-eval": "eval", "round1-eval": "eval", "round1-pairs": "pairs", "round1-score": "score",
        "round1-train": "train", "summary": "summary"}
    # stable ids, TRL's included (its run starts after csr's own runs have set wandb up in this process)
    assert all(r["id"] == run_id(out, n) for n, r in by_name.items())
    assert any("train/rewards/margins" in h or "rewards/margins" in h for h in by_name["round1-train"]["history"])
    score_keys = set(by_name["round1-score"]["history"][0])  # histograms are stored as nested keys
    assert {"score/clip_score/bins", "score/self_reward/bins", "score/reward/bins", "score/trees", "round"} <= score_keys
    assert by_name["round1-score"]["history"][0]["score/sentences"] == 6   # the ranked nodes, roots excluded
    assert by_name["round1-eval"]["history"][0]["eval/pope/f1"] == 0.6
    # the summary: round 0 (the base model) and round 1, against the round
    assert [h["round"] for h in by_name["summary"]["history"]] == [0, 1]
    assert by_name["summary"]["history"][1]["pairs/pairs"] >= 1
    tb = check_tensorboard(tmp_path, out)

    again()
    assert [r["id"] for r in wandb_runs(out)] == [r["id"] for r in runs]
    assert tensorboard_points(out / "tensorboard") == tb
