"""The default run, reduced: build a small world and its base models, one CSR round with evals,
and the report. The shipped recipe is used with sizes turned down."""

import json
from pathlib import Path

import pytest

from csr.config import load_config
from csr.loop import run
from csr.world.build import ensure_world
from csr.world.generate import WorldConfig

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_reduced_default_run(tmp_path):
    world = tmp_path / "world"
    ensure_world(world, clip_steps=20, llava_steps=40,
                 world_config=WorldConfig(n_train=200, n_prompts=8, n_test=12))
    again = ensure_world(world, clip_steps=20, llava_steps=40)  # cached: nothing rebuilt
    assert again["llava"] == json.loads((world / "models/llava/DONE.json").read_text())
    cfg = load_config(ROOT / "recipes/world/default.yaml", [
        f"run.output_dir={tmp_path / 'run'}", "run.rounds=1", f"run.build_world={world}",
        f"run.eval_pope={world / 'test/pope.jsonl'}", f"run.eval_chair={world / 'test/chair.jsonl'}",
        "run.eval_max_samples=24", f"model.model_name_or_path={world / 'models/llava'}",
        f"data.prompts={world / 'train/prompts.jsonl'}", f"data.image_root={world / 'train'}",
        f"score.clip_model={world / 'models/clip'}", "data.max_prompts=8", "generate.max_sentences=2",
        "train.per_device_train_batch_size=4", "model.device=cpu"])
    summary = run(cfg)
    base, r1 = summary["base_eval"], summary["rounds"][0]["eval"]
    for m in (base, r1):
        assert {"chair_s", "chair_i", "recall"} <= set(m["chair"])
        assert 0.0 <= m["pope"]["all"]["yes_ratio"] <= 1.0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| 0 |" in report and "| 1 |" in report
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
