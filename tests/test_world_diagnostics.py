"""csr.world.diagnostics (scripts/world_diagnostics.py) on a hand-made world whose answers are known."""

import json

import pytest

from csr.io import write_jsonl

import csr.world.diagnostics as diag


@pytest.fixture
def world(tmp_path):
    """Two partner pairs (circle-square, star-heart); image a holds circle+square, image b a lone star."""
    (tmp_path / "test").mkdir()
    (tmp_path / "vocab.json").write_text(json.dumps({
        "shapes": ["circle", "square", "star", "heart"],
        "positions": ["top left", "top right", "bottom left", "bottom right"],
        "pairs": [["circle", "square"], ["star", "heart"]]}))
    write_jsonl(tmp_path / "test" / "scenes.jsonl", [
        {"id": "a", "image": "images/a.png", "objects": [
            {"shape": "circle", "position": "top left", "size": 6.0},
            {"shape": "square", "position": "top right", "size": 2.5}]},
        {"id": "b", "image": "images/b.png", "objects": [
            {"shape": "star", "position": "bottom left", "size": 6.0}]}])
    write_jsonl(tmp_path / "test" / "pope.jsonl", [
        {"question_id": 0, "image": "images/a.png", "object": "circle", "label": "yes"},  # partner present
        {"question_id": 1, "image": "images/a.png", "object": "star", "label": "no"},     # partner absent
        {"question_id": 2, "image": "images/b.png", "object": "heart", "label": "no"},    # partner present
        {"question_id": 3, "image": "images/b.png", "object": "star", "label": "yes"},    # partner absent
        {"question_id": 4, "image": "images/b.png", "object": "circle", "label": "no"}])  # partner absent
    return tmp_path


def test_pope_prior_cells_split_errors_by_partner(world, tmp_path):
    answers = tmp_path / "answers.jsonl"
    # a prior-following model: "yes" exactly when the partner is in the image
    write_jsonl(answers, [{"question_id": i, "answer": a} for i, a in enumerate(["yes", "no", "yes", "no", "no"])])
    cells = diag.pope_prior_cells(world, answers)
    assert cells == {
        "label no, partner absent": {"n": 2, "errors": 0, "error_rate": 0.0},
        "label no, partner present": {"n": 1, "errors": 1, "error_rate": 1.0},
        "label yes, partner absent": {"n": 1, "errors": 1, "error_rate": 1.0},
        "label yes, partner present": {"n": 1, "errors": 0, "error_rate": 0.0}}
    write_jsonl(answers, [{"question_id": 99, "answer": "yes"}])  # answers from another world
    with pytest.raises(SystemExit, match="question_id 99 is not in"):
        diag.pope_prior_cells(world, answers)


def test_hallucination_causes_partner_and_where(world, tmp_path):
    captions = tmp_path / "captions.jsonl"
    write_jsonl(captions, [
        # a heart (no partner present) at the tiny square's cell, and a star at an empty cell
        {"id": "a", "caption": "A red circle is at the top left. A blue heart is at the top right. "
                               "Two stars are at the bottom right."},
        # the lone star's partner (heart) at a normal object's cell; the star itself is not counted
        {"id": "b", "caption": "A green star is at the bottom left. A pink heart is at the bottom left."}])
    out = diag.hallucination_causes(world, captions)
    assert out == {"hallucinated": 3, "partner_of_present": 1, "other_shape": 2,
                   "at_tiny_object": 1, "at_normal_object": 1, "at_empty_cell": 1}


def test_auc_counts_ties_half():
    assert diag._auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert diag._auc([1.0], [2.0]) == 0.0
    assert diag._auc([1.0, 2.0], [1.0]) == pytest.approx(0.75)


def test_cli_names_the_missing_argument(world, capsys):
    with pytest.raises(SystemExit):
        diag.main(["pope", "--world", str(world)])
    assert "pope needs --answers" in capsys.readouterr().err


def test_yes_score_summary_ranks_and_thresholds():
    # p(yes) ranks: yes .9, no .8, yes .7, yes .4, no .2 -> 4 of the 6 (yes, no) pairs ordered right
    out = diag.yes_score_summary([0.9, 0.8, 0.7, 0.4, 0.2], ["yes", "no", "yes", "yes", "no"], 0.6)
    assert out["auc"] == pytest.approx(4 / 6)
    # top 3 answered yes: tp 2, so F1 = 4 / (3 + 3); the best is top 4: tp 3, F1 = 6 / 7
    assert out["f1_at_yes_ratio"] == pytest.approx(4 / 6)
    assert out["best_f1"] == pytest.approx(6 / 7)
    with pytest.raises(ValueError, match="both"):
        diag.yes_score_summary([0.1, 0.2], ["yes", "yes"], 0.5)


def test_resampled_auc_matches_auc_with_ties():
    import numpy as np

    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    truth = rng.random(40) < 0.5
    idx = rng.integers(0, 40, size=(6, 40))
    got = diag._auc_resampled(scores, truth, idx)
    def pairwise(pos, neg):  # the definition, pair by pair
        return np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    want = [pairwise(scores[i][truth[i]], scores[i][~truth[i]]) for i in idx]
    assert got == pytest.approx(want)


def test_yes_scores_against_base_same_threshold(tmp_path):
    from csr.io import write_jsonl

    def probs(path, p_yes):
        write_jsonl(path, [{"question_id": i, "gold": g, "p": {"yes": p, "no": 1 - p},
                            "pred_uncalibrated": "yes" if p > 0.5 else "no"}
                           for i, (g, p) in enumerate(zip(["yes", "no", "yes", "no"], p_yes))])
    probs(tmp_path / "base.jsonl", [0.9, 0.6, 0.7, 0.1])   # AUC 1, says yes to 3
    probs(tmp_path / "new.jsonl", [0.45, 0.3, 0.4, 0.05])  # same ranking, threshold moved: yes to none
    out = diag.yes_scores(tmp_path / "new.jsonl", tmp_path / "base.jsonl", n_resamples=50)
    assert out["auc_change"]["delta"] == 0.0 and out["base"]["auc"] == 1.0
    # at the base's yes-ratio (3 of 4) the new scores give the base's F1: the drop is the threshold
    assert out["probs"]["f1_at_yes_ratio"] == out["base"]["f1_at_yes_ratio"] == pytest.approx(0.8)
    png = tmp_path / "f1.png"
    diag.yes_scores(tmp_path / "new.jsonl", tmp_path / "base.jsonl", n_resamples=5, plot=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*tmp*"))
    probs(tmp_path / "other.jsonl", [0.9, 0.6])
    with pytest.raises(SystemExit, match="different questions"):
        diag.yes_scores(tmp_path / "other.jsonl", tmp_path / "base.jsonl")


def test_cli_scores_needs_probs(capsys):
    with pytest.raises(SystemExit):
        diag.main(["scores"])
    assert "scores needs --probs" in capsys.readouterr().err
