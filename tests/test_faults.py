"""Kill and resume: SIGKILL a tiny run inside every stage in turn, rerun it, and get exactly what an
uninterrupted run with the same seed gives, with no record lost or duplicated."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from csr.config import load_config
from csr.io import read_jsonl
from csr.loop import run

ROOT = Path(__file__).parent.parent
KILLS = ["generate.tree_written:2", "score.tree_written:3", "pairs.before_write:1",
         "train.checkpoint_saved:2", "merge.before_rename:1"]


def overrides(llava, clip, out):
    return [f"model.model_name_or_path={llava}", f"score.clip_model={clip}",
            f"data.prompts={ROOT / 'data/tiny/prompts.json'}", f"data.image_root={ROOT / 'data/tiny/images'}",
            f"run.output_dir={out}", "run.rounds=1", "generate.prompt_batch_size=1",
            "train.per_device_train_batch_size=1", "train.save_strategy=steps", "train.save_steps=1",
            "train.save_total_limit=2"]


def csr_run(args, kill_at=None):
    env = {k: v for k, v in os.environ.items() if k != "CSR_KILL_AT"}
    if kill_at:
        env["CSR_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "csr.cli", "run", "--config", str(ROOT / "recipes/tiny/csr.yaml"),
                           *args], env=env, capture_output=True, text=True, timeout=600)


def same_trees(a, b):
    assert [t["id"] for t in a] == [t["id"] for t in b]
    for x, y in zip(a, b):
        assert [(n["text"], n["parent"], n["final"]) for n in x["nodes"]] == \
            [(n["text"], n["parent"], n["final"]) for n in y["nodes"]]
        assert [n.get("reward", 0.0) for n in x["nodes"]] == pytest.approx([n.get("reward", 0.0) for n in y["nodes"]],
                                                                           abs=1e-4)


@pytest.mark.slow
def test_sigkill_in_every_stage_then_resume_equals_uninterrupted(tiny_llava_dir, tiny_clip_dir, tmp_path):
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "killed"
    run(load_config(ROOT / "recipes/tiny/csr.yaml", overrides(tiny_llava_dir, tiny_clip_dir, ref_dir)))
    args = overrides(tiny_llava_dir, tiny_clip_dir, cut_dir)
    rd = cut_dir / "round_1"
    for kill_at in KILLS:
        out = csr_run(args, kill_at)
        assert out.returncode == -signal.SIGKILL, (kill_at, out.stderr[-2000:])
        stage = kill_at.split(".")[0]
        assert not (rd / stage / "DONE.json").exists(), f"{stage} marked done after a kill"
        if stage == "merge":  # the half-written model folder is not where the next round would look
            assert not (rd / "merge").exists() and list(rd.glob(".merge.tmp-*"))
        if stage == "train":
            assert list((rd / "train").glob("checkpoint-*"))
    out = csr_run(args)
    assert out.returncode == 0, out.stderr[-3000:]
    train = json.loads((rd / "train" / "DONE.json").read_text())
    assert train["resumed_from"].endswith("checkpoint-2") and train["steps"] == 4  # picked up where killed

    ref = ref_dir / "round_1"
    for stage, name in [("generate", "trees.jsonl"), ("score", "scored.jsonl")]:
        got = read_jsonl(rd / stage / name)
        assert len({t["id"] for t in got}) == len(got) == 4  # nothing lost, nothing twice
        same_trees(got, read_jsonl(ref / stage / name))
    assert [(p["id"], p["chosen"], p["rejected"]) for p in read_jsonl(rd / "pairs/pairs.jsonl")] == \
        [(p["id"], p["chosen"], p["rejected"]) for p in read_jsonl(ref / "pairs/pairs.jsonl")]
    want, got = load_file(str(ref / "merge/model.safetensors")), load_file(str(rd / "merge/model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        assert (want[k] - got[k]).abs().max() < 1e-5, k
    assert not list(rd.glob(".merge.tmp-*"))
