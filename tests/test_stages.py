"""Generate / score / pairs on a tiny random LLaVA and CLIP: outputs, bad input, resume."""

import json
import shutil
from pathlib import Path

import pytest

import csr.generate.stage as gen_stage
from csr.config import load_config
from csr.generate.stage import run_generate
from csr.io import StageInputMissing, read_jsonl
from csr.models import ModelLoadError, check_model_source
from csr.pairs import run_pairs
from csr.score.stage import run_score
from csr.tree_format import final_paths

ROOT = Path(__file__).parent.parent
TINY_DATA = ROOT / "data" / "tiny"


def tiny_cfg(llava, clip, tmp_path, prompts=None, image_root=None, *extra):
    return load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [
        f"model.model_name_or_path={llava}", f"score.clip_model={clip}",
        f"data.prompts={prompts or TINY_DATA / 'prompts.json'}",
        f"data.image_root={image_root or TINY_DATA / 'images'}",
        f"run.output_dir={tmp_path / 'run'}", *extra])


def test_generate_score_pairs_end_to_end(tiny_llava_dir, tiny_clip_dir, tmp_path):
    cfg = tiny_cfg(tiny_llava_dir, tiny_clip_dir, tmp_path)
    gen = run_generate(cfg, str(tiny_llava_dir), tmp_path / "gen")
    assert gen["processed"] == 4 and gen["skipped_total"] == 0
    trees = read_jsonl(tmp_path / "gen" / "trees.jsonl")
    assert [t["id"] for t in trees] == ["tiny-0", "tiny-1", "tiny-2", "tiny-3"]
    g = cfg.generate
    for t in trees:
        nodes = t["nodes"]
        assert all(n["id"] == i for i, n in enumerate(nodes))
        children = [n for n in nodes if n["parent"] == 0]
        assert len(children) == g.num_candidates
        for n in nodes[1:]:
            assert {"text", "n_tokens", "logprob_sum", "logprob_mean", "parent", "final"} <= set(n)
            assert 1 <= n["n_tokens"] <= g.max_new_tokens and n["logprob_sum"] <= 0
            assert n["depth"] <= g.max_sentences
            assert "clip" in n  # selection=calibrated scored the siblings with CLIP during the search
        # official pruning, N=3: at most 0 best + 1 worst survive a level -> one open node per level
        for depth in range(1, g.max_sentences):
            open_nodes = [n for n in nodes if n["depth"] == depth and not n["final"] and not n["pruned"]]
            assert len(open_nodes) <= 1
        assert final_paths(nodes)
    sc = run_score(cfg, tmp_path / "gen", tmp_path / "score")
    assert sc["processed"] == 4
    for t in read_jsonl(tmp_path / "score" / "scored.jsonl"):
        for n in t["nodes"][1:]:
            if n.get("dropped"):  # cleaned away before ranking: no reward
                assert n["reward"] is None
                continue
            expected = 0.9 * max(n["clip"], 0.0) + 0.1 * n["self_reward"]
            assert n["reward"] == pytest.approx(expected)
    pr = run_pairs(cfg, tmp_path / "score", tmp_path / "pairs")
    pairs = read_jsonl(tmp_path / "pairs" / "pairs.jsonl")
    assert pr["pairs"] == len(pairs) > 0
    assert all(p["chosen_score"] >= p["rejected_score"] for p in pairs)
    import datasets

    ds = datasets.load_dataset("json", data_files=str(tmp_path / "pairs" / "pairs.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected", "images"} <= set(ds.column_names)
    parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "pairs" / "pairs.parquet"), split="train")
    assert len(parquet) == len(pairs) and parquet[0]["images"][0].size == (32, 32)  # bytes inside, not paths
    assert parquet[0]["chosen"] == pairs[0]["chosen"]
    csr_format = json.loads((tmp_path / "pairs" / "pairs_csr.json").read_text())
    assert csr_format[0]["conversations"][0]["from"] == "human"


def test_generate_resumes_after_an_interruption(tiny_llava_dir, tiny_clip_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_llava_dir, tiny_clip_dir, tmp_path, None, None, "generate.selection=self",
                   "generate.prompt_batch_size=1")
    run_generate(cfg, str(tiny_llava_dir), tmp_path / "full")
    reference = read_jsonl(tmp_path / "full" / "trees.jsonl")

    real_grow, calls = gen_stage._grow_batch, []

    def dies_on_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed while working on prompt 3
        return real_grow(*args, **kw)

    monkeypatch.setattr(gen_stage, "_grow_batch", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_generate(cfg, str(tiny_llava_dir), tmp_path / "cut")
    assert not (tmp_path / "cut" / "DONE.json").exists()
    assert len(read_jsonl(tmp_path / "cut" / "trees.jsonl")) == 2
    # a torn half-line from a kill in the middle of a write is repaired, not read
    with open(tmp_path / "cut" / "trees.jsonl", "a") as fh:
        fh.write('{"id": "tiny-2", "nodes": [{"id"')
    monkeypatch.setattr(gen_stage, "_grow_batch", real_grow)
    calls.clear()
    summary = run_generate(cfg, str(tiny_llava_dir), tmp_path / "cut")
    assert summary["processed"] == 2 and summary["trees"] == 4
    assert read_jsonl(tmp_path / "cut" / "trees.jsonl") == reference
    # finished: a rerun does nothing
    assert run_generate(cfg, str(tiny_llava_dir), tmp_path / "cut") == summary


def test_bad_prompts_and_images_are_skipped_and_counted(tiny_llava_dir, tiny_clip_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(TINY_DATA / "images", images)
    (images / "corrupt.png").write_bytes(b"\x89PNG not really")
    (images / "empty.png").write_bytes(b"")
    records = [
        {"id": "ok", "image": "0.png", "input": "<image>\nDescribe this image in detail."},
        {"id": "missing", "image": "nope.png", "input": "<image>\nDescribe."},
        {"id": "corrupt", "image": "corrupt.png", "input": "<image>\nDescribe."},
        {"id": "zero-bytes", "image": "empty.png", "input": "<image>\nDescribe."},
        {"id": "empty", "image": "0.png", "input": "<image>\n   "},
        {"id": "escape", "image": "../../etc/passwd", "input": "<image>\nDescribe."},
        {"id": "ok", "image": "1.png", "input": "<image>\nDuplicate id."},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = tiny_cfg(tiny_llava_dir, tiny_clip_dir, tmp_path, prompts, images, "generate.selection=self")
    summary = run_generate(cfg, str(tiny_llava_dir), tmp_path / "gen")
    assert summary["processed"] == 1
    assert summary["skipped"] == {"missing_image": 1, "corrupt_image": 2, "empty_prompt": 1,
                                  "image_outside_root": 1, "duplicate_id": 1}


def test_stage_inputs_and_model_paths_are_checked(tmp_path, tiny_clip_dir):
    cfg = load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [f"score.clip_model={tiny_clip_dir}"])
    with pytest.raises(StageInputMissing, match="run the 'generate' stage first"):
        run_score(cfg, tmp_path / "no_gen", tmp_path / "score")
    with pytest.raises(StageInputMissing, match="run the 'score' stage first"):
        run_pairs(cfg, tmp_path / "no_score", tmp_path / "pairs")
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_source(str(tmp_path / "no_model"))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        check_model_source(str(tmp_path / "pickled"))
    check_model_source("llava-hf/llava-1.5-7b-hf")  # a hub id is left to from_pretrained


@pytest.mark.slow  # subprocesses: ~15-25 s
def test_generate_shards_across_two_processes(tiny_llava_dir, tiny_clip_dir, tmp_path):
    """Two ranks (as `accelerate launch --num_processes 2` sets RANK/WORLD_SIZE) split the prompts,
    write a shard each, and rank 0 merges them in prompt order: equal to a single-process run."""
    import os
    import subprocess
    import sys

    overrides = [f"model.model_name_or_path={tiny_llava_dir}", f"score.clip_model={tiny_clip_dir}",
                 f"data.prompts={TINY_DATA / 'prompts.json'}", f"data.image_root={TINY_DATA / 'images'}",
                 "generate.selection=self"]
    recipe = str(ROOT / "recipes" / "tiny" / "csr.yaml")
    cmd = [sys.executable, "-m", "csr.cli", "generate", "--config", recipe, "--out", str(tmp_path / "two"), *overrides]
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    shard_ids = [[t["id"] for t in read_jsonl(tmp_path / "two" / "shards" / f"trees.rank{r}.jsonl")] for r in range(2)]
    assert shard_ids == [["tiny-0", "tiny-2"], ["tiny-1", "tiny-3"]]
    cfg = load_config(recipe, overrides)
    run_generate(cfg, str(tiny_llava_dir), tmp_path / "one")
    two, one = read_jsonl(tmp_path / "two" / "trees.jsonl"), read_jsonl(tmp_path / "one" / "trees.jsonl")
    assert [t["id"] for t in two] == [t["id"] for t in one]
    for a, b in zip(two, one):  # other batch neighbours: equal up to float rounding
        assert [(n["text"], n["parent"], n["final"], n["pruned"]) for n in a["nodes"]] == \
            [(n["text"], n["parent"], n["final"], n["pruned"]) for n in b["nodes"]]
        assert [n.get("logprob_sum", 0) for n in a["nodes"]] == \
            pytest.approx([n.get("logprob_sum", 0) for n in b["nodes"]], abs=1e-4)


def test_score_with_the_vig_term(tiny_llava_dir, tiny_clip_dir, tmp_path):
    """score.vig_weight > 0: every node gets its VIG from the round's policy and the reward adds the term."""
    cfg = tiny_cfg(tiny_llava_dir, tiny_clip_dir, tmp_path, None, None, "generate.selection=self",
                   "score.vig_weight=0.5", "data.max_prompts=2")
    run_generate(cfg, str(tiny_llava_dir), tmp_path / "gen")
    run_score(cfg, tmp_path / "gen", tmp_path / "score", str(tiny_llava_dir))
    import math
    for t in read_jsonl(tmp_path / "score" / "scored.jsonl"):
        for n in t["nodes"][1:]:
            assert "vig" in n and math.isfinite(n["vig"])
            if n.get("dropped"):
                continue
            base = 0.9 * max(n["clip"], 0.0) + 0.1 * n["self_reward"]
            assert n["reward"] == pytest.approx(base + 0.5 * 100 * math.tanh(n["vig"] / 2), abs=1e-3)


def test_a_vig_weighted_search_ranks_by_the_stored_reward(tiny_llava_dir, tiny_clip_dir, tmp_path):
    """score.vig_weight > 0 with the calibrated search: the reward that pruned each level is the one
    the score stage stores (before, the search left the VIG term out)."""
    cfg = tiny_cfg(tiny_llava_dir, tiny_clip_dir, tmp_path, None, None, "score.vig_weight=1.0",
                   "data.max_prompts=2", "pairs.cleaning=none", "pairs.min_sentence_chars=0")
    run_generate(cfg, str(tiny_llava_dir), tmp_path / "gen")
    run_score(cfg, tmp_path / "gen", tmp_path / "score", str(tiny_llava_dir))
    checked = 0
    for t in read_jsonl(tmp_path / "score" / "scored.jsonl"):
        for n in t["nodes"][1:]:
            if n.get("reward") is None:  # an EOS alone: no sentence, no reward
                continue
            assert n["search_score"] == pytest.approx(n["reward"], abs=1e-4), n["text"]
            assert n["vig_reward"] != 0.0 or n["vig"] in (None, 0.0)
            checked += 1
    assert checked > 4
