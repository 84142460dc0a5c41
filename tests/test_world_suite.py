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


# ---------------------------------------------------------------------------------------------
# The paired bootstrap of CHAIR_I over test images
# ---------------------------------------------------------------------------------------------

def _records(counts):
    """chair_captions.jsonl records of images with (hallucinated, mentions) counts."""
    return [{"id": f"test-{i:06d}", "image": f"images/test-{i:06d}.png", "caption": "...",
             "mentions": ["square"] * m, "hallucinated": ["square"] * h} for i, (h, m) in enumerate(counts)]


def test_chair_counts_per_image_and_bad_records():
    assert ws.chair_counts(_records([(1, 3), (0, 2)])) == {"test-000000": (1, 3), "test-000001": (0, 2)}
    unscored = [{"id": "a", "image": "a.png", "caption": "x"}]
    with pytest.raises(ValueError, match=r"record 1 \(a\).*not scored"):
        ws.chair_counts(unscored)
    with pytest.raises(ValueError, match="'test-000000' appears twice"):
        ws.chair_counts(_records([(1, 3)]) * 2)


def test_identical_captions_give_a_zero_interval():
    counts = ws.chair_counts(_records([(1, 3), (0, 2), (2, 4), (0, 1)]))
    out = ws.paired_chair_i(counts, dict(counts), n_resamples=200)
    assert out["before"] == out["after"] == pytest.approx(3 / 10)
    assert out["change"] == 0.0 and out["change_ci95"] == [0.0, 0.0]
    assert out["difference"] == 0.0 and out["difference_ci95"] == [0.0, 0.0]
    assert out["n_images"] == 4


def test_halving_every_image_gives_the_same_ratio_in_every_resample():
    # each image's hallucinated mentions halve and its mentions stay: any resample's CHAIR_I halves
    before = ws.chair_counts(_records([(2, 4), (4, 5), (2, 3), (6, 8)]))
    after = ws.chair_counts(_records([(1, 4), (2, 5), (1, 3), (3, 8)]))
    out = ws.paired_chair_i(before, after, n_resamples=300)
    assert out["before"] == pytest.approx(14 / 20) and out["after"] == pytest.approx(7 / 20)
    assert out["change"] == pytest.approx(-0.5)
    assert out["change_ci95"] == pytest.approx([-0.5, -0.5])
    assert out["difference"] == pytest.approx(-0.35)
    # the absolute change is minus half the resample's base CHAIR_I, between half the images' least
    # and greatest CHAIR_I (2/4 and 4/5)
    low, high = out["difference_ci95"]
    assert -0.5 * 4 / 5 <= low < high <= -0.5 * 2 / 4


def test_resamples_without_a_base_hallucination_are_left_out_and_counted():
    # one hallucination, on image 0, gone after: every resample that draws image 0 falls by 100%;
    # the quarter that draws image 1 twice has no base hallucination and no relative change
    out = ws.paired_chair_i({"a": (1, 2), "b": (0, 2)}, {"a": (0, 2), "b": (0, 2)}, n_resamples=1000)
    assert out["change"] == -1.0 and out["change_ci95"] == [-1.0, -1.0]
    assert 150 < out["n_undefined"] < 350
    none = ws.paired_chair_i({"a": (0, 2)}, {"a": (1, 2)}, n_resamples=10)
    assert none["change"] is None and none["change_ci95"] is None and none["n_undefined"] == 10


def test_interval_narrows_with_more_mentions_and_is_seeded():
    base = [(1, 3), (0, 3), (2, 3), (0, 3), (1, 3), (0, 3), (0, 3), (3, 3), (1, 3), (0, 3)]
    final = [(0, 3), (0, 3), (1, 3), (0, 3), (1, 3), (0, 3), (0, 3), (1, 3), (0, 3), (0, 3)]
    few = ws.paired_chair_i(ws.chair_counts(_records(base)), ws.chair_counts(_records(final)))
    many = ws.paired_chair_i(ws.chair_counts(_records(base * 10)), ws.chair_counts(_records(final * 10)))
    assert few["change"] == many["change"] == pytest.approx(3 / 8 - 1)
    for out in (few, many):
        assert out["change_ci95"][0] < out["change"] < out["change_ci95"][1]
    width = {k: o["change_ci95"][1] - o["change_ci95"][0] for k, o in (("few", few), ("many", many))}
    assert width["many"] < 0.6 * width["few"]
    b, f = ws.chair_counts(_records(base * 10)), ws.chair_counts(_records(final * 10))
    assert ws.paired_chair_i(b, f, seed=3) == ws.paired_chair_i(b, f, seed=3)
    assert ws.paired_chair_i(b, f, seed=3)["change_ci95"] != ws.paired_chair_i(b, f, seed=4)["change_ci95"]
    with pytest.raises(ValueError, match="different images.*'test-000099'"):
        ws.paired_chair_i(b, {k: v for k, v in f.items() if k != "test-000099"})


def test_interval_side_of_the_target():
    assert ws.interval_side([-0.5, -0.4], -0.3) == "below"
    assert ws.interval_side([-0.2, 0.1], -0.3) == "above"
    assert ws.interval_side([-0.4, -0.2], -0.3) == "not distinguishable"
    assert ws.interval_side([-0.5, -0.3], -0.3) == "not distinguishable"  # holds the target
    assert ws.interval_side(None, -0.3) is None


def _chair(counts):
    h, m = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return {"chair": {"chair_s": 0.1, "chair_i": h / m, "recall": 0.9, "n_hallucinated": h, "n_mentions": m},
            "pope": {"all": {"f1": 0.8, "yes_ratio": 0.5}}}


def _finished_run(data, world, arm, base, final, captions=(0, 3)):
    """A run folder of 3 evaluated rounds whose base and round-3 CHAIR come from per-image counts,
    with the round evaluations' chair_captions.jsonl named in `captions`, and cached diagnostics."""
    folder = ws.run_dir(data, world, arm)
    for r, counts in ((0, base), (3, final)):
        if r in captions:
            (folder / "eval" / f"round_{r}").mkdir(parents=True)
            (folder / "eval" / f"round_{r}" / "chair_captions.jsonl").write_text(
                "\n".join(json.dumps(x) for x in _records(counts)) + "\n")
    rounds = [{"round": r, "eval": _chair(final), "stages": {"pairs": {}, "train": {}}} for r in (1, 2, 3)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"base_eval": _chair(base), "rounds": rounds}))
    diag = data / "suite" / "diagnostics"
    diag.mkdir(parents=True, exist_ok=True)
    (diag / f"world-{world}.json").write_text("{}")
    (diag / f"{world}-{arm}.json").write_text(json.dumps({"pairs": {}, "dpo": {}}))


def test_table_command_writes_intervals_elsewhere_and_skips_a_run_without_captions(tmp_path, caplog):
    worlds = "  w1: {seed: 1, bias: 0.6, caption_noise: 0.3}\n  w2: {seed: 2, bias: 0.9, caption_noise: 0.6}\n"
    suite = _suite_file(tmp_path, worlds=worlds)
    data, out = tmp_path / "data", tmp_path / "scratch"
    base = [(1, 2)] * 20
    _finished_run(data, "w1", "l09", base, [(0, 2)] * 20)      # -100% in every resample
    _finished_run(data, "w1", "l0", base, [(1, 2)] * 20)       # 0% in every resample
    _finished_run(data, "w2", "l09", base, [(0, 2)] * 20, captions=(0,))  # round 3's captions lost
    _finished_run(data, "w2", "l0", base, [(1, 2)] * 14 + [(0, 2)] * 6)   # -30%, as sure as 6 images
    assert ws.main(["table", "--data", str(data), "--suite", str(suite), "--out", str(out),
                    "--seed", "1", "--resamples", "200"]) == 0
    assert not (data / "suite" / "suite.md").exists()
    result = json.loads((out / "suite.json").read_text())
    rows = {(r["world"], r["arm"]): r for r in result["rows"]}
    assert rows["w1", "l09"]["chair_i_change_ci95"] == [-1.0, -1.0] and rows["w1", "l09"]["chair_i_target"] == "met"
    assert rows["w1", "l0"]["chair_i_change_ci95"] == [0.0, 0.0] and rows["w1", "l0"]["chair_i_target"] == "missed"
    # the run without captions keeps every other column, with no interval, and the file is named
    assert rows["w2", "l09"]["chair_i_change"] == pytest.approx(-1.0)
    assert rows["w2", "l09"]["chair_i_change_ci95"] is None and rows["w2", "l09"]["chair_i_target"] is None
    missing = str(ws.run_dir(data, "w2", "l09") / "eval" / "round_3" / "chair_captions.jsonl")
    assert missing in caplog.text
    assert result["intervals"]["skipped"][0]["world"] == "w2" and missing in result["intervals"]["skipped"][0]["reason"]
    w2_l0 = rows["w2", "l0"]["chair_i_change_ci95"]
    assert w2_l0[0] < -0.3 < w2_l0[1]
    # the arms' difference: l09 has no hallucination left, l0 half its mentions, in every resample
    diff = result["intervals"]["final_chair_i_difference"]
    assert diff == [{"world": "w1", "l09": 0.0, "l0": 0.5, "difference": -0.5, "ci95": [-0.5, -0.5],
                     "verdict": "lower"}]
    assert result["arm_differences"][0]["final_chair_i_ci95"] == [-0.5, -0.5]
    md = (out / "suite.md").read_text()
    assert "| -100% | [-100%, -100%] |" in md and "| w2 | l09 | 3 |" in md
    assert "- w1: l09 met (-100%, [-100%, -100%]); l0 missed (+0%, [+0%, +0%])" in md
    assert "- w2: l09 no interval; l0 not distinguishable" in md
    assert "| w1 | 0.0000 | 0.5000 | -0.5000 | [-0.5000, -0.5000] | lower |" in md
    assert f"- w2 / l09: {missing} does not exist" in md
