"""Reward calibration and pair picking on hand-written trees."""

import math

import pytest

from csr.config import PairsConfig, ScoreConfig
from csr.cleaning import has_repeats, node_drop_reason
from csr.pairs import candidate_paths, pick_pair, to_csr, to_trl
from csr.score.reward import calibrated_rewards, rank_fractions, self_reward
from csr.tree_format import siblings_by_parent


def test_rank_fractions_best_is_one_over_n():
    assert rank_fractions([0.2, 0.9, 0.5, 0.1]) == [0.75, 0.25, 0.5, 1.0]
    assert rank_fractions([1.0, 1.0]) == [0.5, 1.0]  # ties keep order


def calibrate_siblings(self_scores, clip_scores, lam, mode):
    """The calibrated rewards of siblings whose R_T (self_reward=sum_logprob) and R_I (unclamped) are given."""
    siblings = [{"logprob_sum": s, "clip": c} for s, c in zip(self_scores, clip_scores)]
    cfg = ScoreConfig(reward_lambda=lam, calibration=mode, self_reward="sum_logprob", clip_clamp=False)
    return calibrated_rewards(siblings, cfg)


def test_raw_calibration_mixes_values_with_lambda_on_clip():
    assert calibrate_siblings([10.0, 50.0], [30.0, 20.0], 0.9, "raw") == pytest.approx([28.0, 23.0])
    assert calibrate_siblings([10.0, 50.0], [30.0, 20.0], 0.0, "raw") == pytest.approx([10.0, 50.0])


def test_rank_calibration_orders_like_the_official_lowest_rank():
    self_scores, clip_scores = [-0.5, -0.1, -0.9], [25.0, 20.0, 30.0]
    rewards = calibrate_siblings(self_scores, clip_scores, 0.9, "rank")
    # official mixed ranks: node0 .9*(2/3)+.1*(2/3)=.667, node1 .9*1+.1*(1/3)=.933, node2 .9*(1/3)+.1*1=.4
    assert rewards == pytest.approx([-2 / 3, -(0.9 + 0.1 / 3), -(0.3 + 0.1)])
    assert max(range(3), key=lambda i: rewards[i]) == 2


def test_self_reward_kinds_and_clamp():
    node = {"logprob_sum": math.log(0.25), "logprob_mean": math.log(0.5), "beam_score": -1.7}
    assert self_reward(node, "prob") == pytest.approx(25.0)
    assert self_reward(node, "mean_prob") == pytest.approx(50.0)
    assert self_reward(node, "beam_score") == -1.7
    nodes = [dict(node, clip=-12.0), dict(node, clip=31.0)]
    calibrated_rewards(nodes, ScoreConfig(reward_lambda=0.9, calibration="raw", self_reward="prob", clip_clamp=True))
    assert [n["visual_reward"] for n in nodes] == [0.0, 31.0]
    assert nodes[1]["reward"] == pytest.approx(0.9 * 31 + 0.1 * 25)
    calibrated_rewards(nodes, ScoreConfig(reward_lambda=0.9, calibration="raw", self_reward="prob", clip_clamp=False))
    assert nodes[0]["visual_reward"] == -12.0
    with pytest.raises(ValueError):
        self_reward(node, "nope")


def make_tree(spec):
    """spec: list of (parent, text, reward, final). Node 0 is the root. Texts are exact: a sentence
    keeps the space the model wrote before it."""
    nodes = [{"id": 0, "parent": None, "depth": 0, "text": "", "final": False}]
    for parent, text, reward, final in spec:
        nodes.append({"id": len(nodes), "parent": parent, "depth": nodes[parent]["depth"] + 1,
                      "text": text, "reward": reward, "final": final})
    return {"id": "t", "image": "/x.png", "prompt": "Describe.", "nodes": nodes}


TREE = make_tree([
    (0, "A cat sits.", 10.0, False),        # 1
    (0, "A dog runs.", 2.0, False),         # 2
    (1, " It is red.", 8.0, True),           # 3: path 1-3 mean 9
    (1, " Ok.", 0.0, True),                  # 4: "Ok." is < 4 chars -> dropped (its path with it)
    (2, " The sky is blue.", 1.0, True),     # 5: path 2-5 mean 1.5
    (2, " no no no no no no.", 50.0, True),  # 6: repeated words -> dropped
])


def test_pick_pair_best_and_worst_path_after_cleaning():
    # strict cleaning drops 6 (repeats) and the short 4, each with its path: 1-3 (mean 9), 2-5 (1.5)
    pair, reason = pick_pair(TREE, PairsConfig())
    assert reason is None
    assert pair["chosen"] == "A cat sits. It is red." and pair["chosen_score"] == 9.0
    assert pair["rejected"] == "A dog runs. The sky is blue." and pair["rejected_score"] == 1.5
    assert pair["margin"] == 7.5 and pair["n_paths"] == 2


def test_a_short_sentence_takes_its_path_with_it():
    # before: "A cat sits." (node 1, never final) was a response of its own, scored 10
    responses = [p.response for p in candidate_paths(TREE["nodes"], PairsConfig(cleaning="none"))]
    assert "A cat sits." not in responses and "A cat sits. Ok." not in responses


def test_pick_pair_without_cleaning_keeps_everything():
    cfg = PairsConfig(cleaning="none", min_sentence_chars=0)
    paths = {text: score for text, score, *_ in candidate_paths(TREE["nodes"], cfg)}
    assert paths["A cat sits. Ok."] == 5.0
    assert paths["A dog runs. no no no no no no."] == 26.0
    pair, _ = pick_pair(TREE, cfg)
    assert pair["chosen"] == "A dog runs. no no no no no no."


def test_rejected_quantile_picks_a_harder_negative():
    # no filter: paths 26 (2-6), 9 (1-3), 5 (1-4), 1.5 (2-5); quantile q takes the int(q*3)-th from
    # the bottom, at most the runner-up: 0 -> 1.5, 0.5 -> 5 (int 1.5 = 1), 1 -> 9
    cfg = dict(cleaning="none", min_sentence_chars=0)
    assert pick_pair(TREE, PairsConfig(rejected_quantile=0.0, **cfg))[0]["rejected_score"] == 1.5
    assert pick_pair(TREE, PairsConfig(rejected_quantile=0.5, **cfg))[0]["rejected"] == "A cat sits. Ok."
    pair = pick_pair(TREE, PairsConfig(rejected_quantile=1.0, **cfg))[0]
    assert pair["rejected_score"] == 9.0 and pair["chosen_score"] == 26.0
    with pytest.raises(ValueError, match="rejected_quantile"):
        PairsConfig(rejected_quantile=1.5).validate()


def test_pick_pair_refusals():
    assert pick_pair(TREE, PairsConfig(min_margin=9.0)) == (None, "below_min_margin")
    single = make_tree([(0, "Only one path here.", 1.0, True)])
    assert pick_pair(single, PairsConfig()) == (None, "fewer_than_two_paths")
    same = make_tree([(0, "Same text.", 1.0, True), (0, "Same text.", 2.0, True)])
    assert pick_pair(same, PairsConfig()) == (None, "identical_responses")


def test_cleaning_filters():
    cfg = PairsConfig()
    assert has_repeats("the the the the the", 4) and not has_repeats("the the the the", 4)
    assert has_repeats("wooooooow", 4)
    assert node_drop_reason("a\n" * 6, cfg) == "too_many_newlines"
    assert node_drop_reason("Привет мир.", cfg) == "unexpected_script"
    assert node_drop_reason("猫がいます。", cfg) == "unexpected_script"
    assert node_drop_reason("A cat 😀.", cfg) == "unexpected_script"
    assert node_drop_reason("A plain English sentence.", cfg) is None


def test_output_formats():
    pair, _ = pick_pair(TREE, PairsConfig())
    trl = to_trl(pair)
    assert trl["prompt"][0]["content"][0] == {"type": "image"}
    assert trl["chosen"][0]["content"][0]["text"] == "A cat sits. It is red."
    assert trl["images"] == ["/x.png"]
    csr = to_csr(pair)
    assert csr["conversations"][0]["value"] == "<image>\nDescribe."
    assert csr["conversations"][1]["value"] == "A cat sits. It is red."
    assert csr["rejected_conversations"][1]["value"] == "A dog runs. The sky is blue."


def test_siblings_by_parent():
    groups = siblings_by_parent(TREE["nodes"])
    assert {k: [n["id"] for n in v] for k, v in groups.items()} == {0: [1, 2], 1: [3, 4], 2: [5, 6]}


def test_vig_pair_filter_drops_pairs_whose_chosen_sees_less():
    tree = make_tree([(0, "A red circle.", 10.0, True), (0, "A blue dog.", 1.0, True)])
    tree["nodes"][1].update(vig_sum=0.5, vig_n_tokens=5)   # chosen: VIG 0.1
    tree["nodes"][2].update(vig_sum=2.0, vig_n_tokens=4)   # rejected: VIG 0.5
    pair, _ = pick_pair(tree, PairsConfig())
    assert pair["chosen_vig"] == pytest.approx(0.1) and pair["rejected_vig"] == pytest.approx(0.5)
    pair, reason = pick_pair(tree, PairsConfig(vig_filter=True))
    assert pair is None and reason
    tree["nodes"][1].update(vig_sum=5.0)  # chosen VIG 1.0 > 0.5: kept
    assert pick_pair(tree, PairsConfig(vig_filter=True))[0] is not None
    assert pick_pair(tree, PairsConfig(vig_filter=True, vig_min_gap=0.6))[0] is None


def test_rejected_pool_same_length_keeps_the_chosen_length():
    # no filter: paths 2-6 (26, 2 sentences), 1-3 (9, 2), 1-4 (5, 2), 2-5 (1.5, 2) and a one-sentence
    # path 7 (0.5): with all, the one-sentence path is rejected; with same_length, the worst of two sentences
    tree = make_tree([*[(p, t, r, f) for p, t, r, f in [
        (0, "A cat sits.", 10.0, False), (0, "A dog runs.", 2.0, False), (1, " It is red.", 8.0, True),
        (1, " Ok.", 0.0, True), (2, " The sky is blue.", 1.0, True), (2, " no no no no no no.", 50.0, True)]],
        (0, "Nothing else.", 0.5, True)])
    cfg = dict(cleaning="none", min_sentence_chars=0)
    assert pick_pair(tree, PairsConfig(**cfg))[0]["rejected"] == "Nothing else."
    pair = pick_pair(tree, PairsConfig(rejected_pool="same_length", **cfg))[0]
    assert pair["rejected"] == "A dog runs. The sky is blue." and pair["chosen_score"] == 26.0
    # no other path of the chosen's length: every path is the pool
    lone = make_tree([(0, "A cat sits.", 10.0, False), (1, " It is red.", 8.0, True), (0, "A dog.", 1.0, True)])
    assert pick_pair(lone, PairsConfig(rejected_pool="same_length", **cfg))[0]["rejected"] == "A dog."
    from csr.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rejected_pool='shorter' is not one of"):
        load_config(None, ["pairs.rejected_pool=shorter"])
