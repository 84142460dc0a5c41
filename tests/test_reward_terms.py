"""The reward-term registry: a term registered here reaches both the search's ranking and the score stage."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

import csr.score.clip
from csr.config import ConfigError, CSRConfig, GenerateConfig, PairsConfig, ScoreConfig, _f
from csr.generate.beam import Candidate
from csr.generate.stage import make_sibling_scorer
from csr.generate.tree import TreeSettings, grow_tree
from csr.io import mark_done, read_jsonl, write_jsonl
from csr.score.reward import TERMS, RewardTerm, calibrated_rewards, register_term, reward_term, unregister_term
from csr.score.stage import run_score


@dataclass
class RedScoreConfig(ScoreConfig):
    """The score section with the weight of the test's term: the one config field a new term adds."""

    red_weight: float = _f(0.0, "Weight of the test's term: 100 for a sentence that says 'red', else 0.")


@pytest.fixture
def red_term():
    """A term that rewards sentences holding the word 'red', registered for one test only."""
    before = list(TERMS)
    term = register_term(RewardTerm("red", lambda node, cfg: 100.0 if "red" in node["text"].split() else 0.0,
                                    "red_weight", "red_reward"))
    try:
        yield term
    finally:
        unregister_term("red")
        assert list(TERMS) == before


# cos(CLIP image, CLIP sentence) the fake CLIP gives: binary fractions, so 100·cos is exact
COS = {"A blue ball.": 0.5, "A red ball.": 0.375, "It ends.": 0.25}
LOGPROB = {"A blue ball.": -1.0, "A red ball.": -2.0, " It ends.": -0.5}


class FakeClip:
    """CLIP with one feature dimension: the image is [1], a sentence is [cos]."""

    def image_features(self, images):
        return np.ones((len(images), 1))

    def text_features(self, texts):
        return np.array([[COS[t]] for t in texts])

    def scores_many(self, images, texts_per_image):
        return [[100.0 * COS[t] for t in texts] for texts in texts_per_image]


def scripted_expand(prefixes):
    """The root gets a blue and a red sentence; any sentence is followed by a final ' It ends.'."""
    out = []
    for prefix in prefixes:
        texts = ["A blue ball.", "A red ball."] if not prefix else [" It ends."]
        out.append([(t, Candidate(token_ids=[1, 2], logprobs=[LOGPROB[t]], ended_by="stop",
                                  has_eos=bool(prefix))) for t in texts])
    return out


def config(calibration: str, red_weight: float) -> CSRConfig:
    score = RedScoreConfig(reward_lambda=0.9, calibration=calibration, self_reward="sum_logprob", red_weight=red_weight)
    return CSRConfig(generate=GenerateConfig(selection="calibrated"), score=score,
                     pairs=PairsConfig(cleaning="none", min_sentence_chars=0))


def kept_sentence(nodes) -> str:
    (kept,) = [n["text"] for n in nodes if n["depth"] == 1 and not n["pruned"]]
    return kept


# level 1, by hand (λ = 0.9, R_T = the log-prob sum, R_I = 100·cos):
#   raw:  blue 0.9·50 + 0.1·(−1) = 44.9;   red 0.9·37.5 + 0.1·(−2) = 33.55 (+ w·100 with the term)
#   rank: self and CLIP rank blue 1/2, red 1; the term ranks red 1/2, blue 1:
#         blue −(0.1·½ + 0.9·½ + w·1) = −(0.5 + w);   red −(0.1·1 + 0.9·1 + w·½) = −(1 + w/2)
EXPECTED = {
    ("raw", 0.0): {"A blue ball.": 44.9, "A red ball.": 33.55},
    ("raw", 0.2): {"A blue ball.": 44.9, "A red ball.": 53.55},
    ("rank", 0.0): {"A blue ball.": -0.5, "A red ball.": -1.0},
    ("rank", 2.0): {"A blue ball.": -2.5, "A red ball.": -2.0},
}


@pytest.mark.parametrize("calibration,weight", list(EXPECTED))
def test_a_registered_term_ranks_the_search_and_is_stored_by_the_score_stage(red_term, calibration, weight,
                                                                               tmp_path, monkeypatch):
    cfg = config(calibration, weight)
    nodes = grow_tree(scripted_expand, make_sibling_scorer(cfg, FakeClip(), image=None),
                      TreeSettings(sentence_beam_width=1, pruning="best"))
    expected = EXPECTED[(calibration, weight)]
    # the search: the term flips which first sentence survives the beam of width 1
    assert kept_sentence(nodes) == ("A red ball." if weight else "A blue ball.")
    level1 = {n["text"]: n for n in nodes if n["depth"] == 1}
    assert {t: n["search_score"] for t, n in level1.items()} == pytest.approx(expected)

    # the score stage: the same reward stored, the term's value beside it (only when its weight is not 0)
    image = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(image)
    gen = tmp_path / "gen"
    write_jsonl(gen / "trees.jsonl", [{"id": "t", "image": str(image), "prompt": "Describe.", "nodes": nodes}])
    mark_done(gen, {"stage": "generate"})
    for n in nodes[1:]:  # the score stage computes CLIP itself
        del n["clip"]
    monkeypatch.setattr(csr.score.clip, "load_clip_from_config", lambda *a, **k: FakeClip())
    run_score(cfg, gen, tmp_path / "score")
    (tree,) = read_jsonl(tmp_path / "score" / "scored.jsonl")
    stored = {n["text"]: n for n in tree["nodes"][1:]}
    assert {t: stored[t]["reward"] for t in expected} == pytest.approx(expected)
    if weight:
        assert stored["A red ball."]["red_reward"] == 100.0 and stored["A blue ball."]["red_reward"] == 0.0
        # the final sentence is alone among its siblings: raw 0.9·25 + 0.1·(−0.5) + w·0; rank −(0.1 + 0.9 + w)
        end = 0.9 * 25 + 0.1 * -0.5 if calibration == "raw" else -(1.0 + weight)
        assert stored[" It ends."]["reward"] == pytest.approx(end)
    else:
        assert not any("red_reward" in n for n in tree["nodes"])


def test_the_registry_refuses_unknown_and_duplicate_terms(red_term):
    with pytest.raises(ValueError, match="unknown reward term 'blue'.*register_term"):
        reward_term("blue")
    with pytest.raises(ValueError, match="unknown reward term 'blue'"):
        unregister_term("blue")
    with pytest.raises(ValueError, match="'red' is already registered"):
        register_term(RewardTerm("red", lambda node, cfg: 0.0, "red_weight", "red_reward_2"))
    with pytest.raises(ValueError, match="node field 'red_reward', which red already writes"):
        register_term(RewardTerm("scarlet", lambda node, cfg: 0.0, "red_weight", "red_reward"))
    with pytest.raises(ValueError, match="node field 'reward'"):
        register_term(RewardTerm("scarlet", lambda node, cfg: 0.0, "red_weight", "reward"))
    assert "scarlet" not in TERMS


def test_a_term_weighed_by_a_missing_config_field_names_it(red_term):
    """The plain ScoreConfig has no red_weight: the error names the field and the fix."""
    with pytest.raises(ConfigError, match=r"score\.red_weight.*add the field to ScoreConfig"):
        calibrated_rewards([{"text": "A red ball.", "clip": 30.0, "logprob_sum": -1.0}], ScoreConfig())


def test_an_unknown_calibration_is_refused():
    with pytest.raises(ValueError, match="unknown calibration 'mean'"):
        calibrated_rewards([{"clip": 30.0, "logprob_sum": math.log(0.5)}], ScoreConfig(calibration="mean"))


@pytest.mark.parametrize("flags,weight,scale", [
    ([], 0.7, "nats"),                                             # the recipe's
    (["--vig-weight", "2.0"], 2.0, "nats"),                        # the flag overrides the weight alone
    (["--vig-scale", "contrast", "score.vig_weight=0.4"], 0.4, "contrast"),
])
def test_vig_rescore_weighs_the_term_as_the_recipe_says(tmp_path, monkeypatch, flags, weight, scale):
    import csr.vig.reward
    from csr.vig.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("score:\n  vig_weight: 0.7\n  vig_scale: nats\n  reward_lambda: 0.5\n")
    seen = {}
    monkeypatch.setattr(csr.vig.reward, "run_rescore", lambda *a, **k: seen.update(cfg=a[4]) or {})
    assert main(["rescore", "--scored", "S", "--policy", "P", "--out", "O", "--config", str(recipe), *flags]) == 0
    assert (seen["cfg"].vig_weight, seen["cfg"].vig_scale, seen["cfg"].reward_lambda) == (weight, scale, 0.5)


def test_vig_rescore_refuses_a_negative_weight(tmp_path):
    from csr.vig.cli import main

    with pytest.raises(ConfigError, match="score.vig_weight"):
        main(["rescore", "--scored", "S", "--policy", "P", "--out", "O", "--vig-weight", "-1"])
