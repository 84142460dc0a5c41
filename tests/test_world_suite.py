"""The world suite (csr.world.suite): the suite file's checks, the table, resuming."""

import json
from pathlib import Path

import pytest

from csr.config import ConfigError
from csr.world import suite as ws

REPO = Path(__file__).resolve().parents[1]


def _suite_file(tmp_path, worlds="  w1: {seed: 1, bias: 0.6, caption_noise: 0.3}\n", arms=None):
    arms = arms or "  l09: [score.reward_lambda=0.9]\n  l0: [score.reward_lambda=0.0]\n"
    path = tmp_path / "suite.yaml"
    path.write_text(f"recipe: {REPO / 'recipes/world/default.yaml'}\narms:\n{arms}worlds:\n{worlds}")
    return path


def test_shipped_suite_parses_with_six_worlds_spanning_bias_and_noise():
    suite = ws.load_suite(REPO / ws.DEFAULT_SUITE)
    assert len(suite.worlds) >= 6
    biases = {w["bias"] for w in suite.worlds.values()}
    noises = {w["caption_noise"] for w in suite.worlds.values()}
    assert min(biases) <= 0.6 and max(biases) >= 0.95
    assert min(noises) <= 0.3 and max(noises) >= 0.7
    assert len({w["seed"] for w in suite.worlds.values()}) == len(suite.worlds)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*suite.yaml")), ids=lambda p: p.name)
def test_every_shipped_suite_parses_with_valid_arm_overrides(path):
    suite = ws.load_suite(path)                     # refuses an unknown override key or world option
    assert suite.arms and suite.worlds and (REPO / suite.recipe).is_file()


def test_unknown_world_option_is_named(tmp_path):
    path = _suite_file(tmp_path, worlds="  w1: {seed: 1, bias: 0.6, caption_nois: 0.3}\n")
    with pytest.raises(ConfigError, match="w1.*unknown option 'caption_nois'.*caption_noise"):
        ws.load_suite(path)


def test_bad_world_value_and_bad_arm_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cooccur_bias must be in"):
        ws.load_suite(_suite_file(tmp_path, worlds="  w1: {bias: 1.5}\n"))
    with pytest.raises(ConfigError, match="reward_lambd"):
        ws.load_suite(_suite_file(tmp_path, arms="  l0: [score.reward_lambd=0.0]\n"))
    with pytest.raises(ConfigError, match="unknown key 'world'"):
        path = tmp_path / "bad.yaml"
        path.write_text("recipe: x\narms: {a: []}\nworld: {}\n")
        ws.load_suite(path)


def test_arm_config_points_the_recipe_at_the_world(tmp_path):
    suite = ws.load_suite(_suite_file(tmp_path))
    cfg = ws.arm_config(suite, tmp_path, "w1", "l0")
    assert cfg.score.reward_lambda == 0.0
    assert cfg.run.output_dir == str(tmp_path / "runs" / "w1" / "l0")
    assert cfg.model.model_name_or_path == str(tmp_path / "worlds" / "w1" / "models" / "llava")
    assert cfg.score.clip_model == str(tmp_path / "worlds" / "w1" / "models" / "clip")
    assert cfg.run.build_world == ""
    assert cfg.run.num_threads == 1  # from the recipe


def _metrics(chair_i, recall=0.9, f1=0.8):
    return {"chair": {"chair_s": 2 * chair_i, "chair_i": chair_i, "recall": recall},
            "pope": {"all": {"f1": f1, "yes_ratio": 0.5}}}


def _summary(n_rounds, margin=30.0):
    rounds = [{"round": r, "eval": _metrics(0.1 - 0.02 * r),
               "stages": {"pairs": {"margin_mean": margin}, "train": {"final_rewards_margins": 0.4}}}
              for r in range(1, n_rounds + 1)]
    return {"base_eval": _metrics(0.1), "rounds": rounds}


def test_table_columns_from_scripted_summaries(tmp_path):
    diag = {"pairs": {"chosen_chair_i": 0.01, "rejected_chair_i": 0.5, "chosen_recall": 0.95,
                      "rejected_recall": 0.6, "auc_clip": 0.9},
            "dpo": {"final_rewards_margins": 0.4}}
    rows = [ws.table_row("w1", "l09", {"seed": 1, "bias": 0.6, "caption_noise": 0.3}, _summary(3), diag),
            ws.table_row("w1", "l0", {"seed": 1, "bias": 0.6, "caption_noise": 0.3}, _summary(3, 40.0), None)]
    assert rows[0]["base_chair_i"] == 0.1
    assert rows[0]["final_chair_i"] == pytest.approx(0.04)
    assert rows[0]["chair_i_change"] == pytest.approx(-0.6)
    assert rows[0]["rejected_recall"] == 0.6 and rows[0]["margin"] == 30.0
    assert rows[0]["dpo_final_rewards_margins"] == 0.4 and rows[0]["auc_clip"] == 0.9
    assert rows[1]["chosen_chair_i"] is None and rows[1]["margin"] == 40.0
    for k in ws.EVAL_COLUMNS:
        assert f"base_{k}" in rows[0] and f"final_{k}" in rows[0]
    ws.write_table(rows, tmp_path)
    md = (tmp_path / "suite.md").read_text().splitlines()
    assert md[0].count("|") == len(ws.MD_COLUMNS) + 1
    assert "CHAIR_I base → final" in md[0] and "rejected recall" in md[0] and "yes-ratio" in md[0]
    assert md[2].startswith("| w1 | l09 | 3 |") and "0.100 → 0.040" in md[2] and "-60%" in md[2]
    assert "0.010 / 0.500" in md[2] and "0.950 / 0.600" in md[2]
    assert json.loads((tmp_path / "suite.json").read_text())["rows"][1]["arm"] == "l0"


def test_resuming_skips_finished_arms(tmp_path):
    suite = ws.load_suite(_suite_file(tmp_path))
    ran = []
    finished = ws.run_dir(tmp_path, "w1", "l09")
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps(_summary(3)))
    half = ws.run_dir(tmp_path, "w1", "l0")
    half.mkdir(parents=True)
    (half / "summary.json").write_text(json.dumps(_summary(2)))  # round 3 not evaluated yet
    assert ws.run_arm(suite, tmp_path, "w1", "l09", runner=ran.append) is False
    assert ws.run_arm(suite, tmp_path, "w1", "l0", runner=ran.append) is True
    assert [c.run.output_dir for c in ran] == [str(half)]
    assert (tmp_path / "suite" / "timings" / "arm-w1-l0.json").is_file()


def test_correlations_rank_and_sign():
    rows = [{"a": x, "b": -2 * x, "c": x ** 3, "flat": 1.0, "chair_i_change": -x} for x in (0.1, 0.2, 0.4, 0.3)]
    corr = {c["cause"]: c for c in ws.correlations(rows, "chair_i_change", ("a", "b", "c", "flat", "missing"))}
    assert corr["a"]["pearson"] == pytest.approx(-1.0) and corr["b"]["pearson"] == pytest.approx(1.0)
    assert corr["c"]["spearman"] == pytest.approx(-1.0) and -1.0 < corr["c"]["pearson"] < -0.9
    assert corr["flat"]["pearson"] is None and corr["missing"]["n"] == 0
    assert "| a | 4 | -1.000 | -1.000 |" in ws.correlation_table(list(corr.values()))
    assert ws._ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]


def test_arm_differences_pair_the_worlds_arms():
    rows = [{"world": "w1", "arm": "x", "chair_i_change": -0.6, "bias": 0.6, "base_chair_i": 0.1, "margin": 30.0},
            {"world": "w1", "arm": "y", "chair_i_change": -0.4, "bias": 0.6, "base_chair_i": 0.1, "margin": 38.0},
            {"world": "w2", "arm": "x", "chair_i_change": -0.5}]  # w2's other arm has not finished
    diffs = ws.arm_differences(rows, "x", "y")
    assert diffs == [{"world": "w1", "chair_i_change": pytest.approx(-0.2), "bias": 0.6, "base_chair_i": 0.1,
                      "margin": -8.0}]


def test_rebuilt_pairs_takes_pairs_overrides_only(tmp_path):
    suite = ws.load_suite(_suite_file(tmp_path))
    with pytest.raises(ConfigError, match="pairs.* overrides only"):
        ws.rebuilt_pairs(suite, tmp_path, "w1", "l0", ["train.beta=0.5"])
    assert ws.rebuilt_pairs(suite, tmp_path, "w1", "l0", ["pairs.rejected_pool=same_length"]) is None  # no round 1
