"""Sentence-level beam search against scripted logits and scripted candidates (no model)."""

import math

import pytest
import torch

from csr.generate.beam import Candidate, diverse_group_search
from csr.generate.tree import TreeSettings, grow_tree, prune
from csr.tree_format import final_paths

PAD, EOS, DOT, A, B, C = range(6)
V = 6


def logits_from_probs(probs: dict[int, float]) -> torch.Tensor:
    p = torch.full((V,), 1e-9)
    for tok, value in probs.items():
        p[tok] = value
    return p.log()


FIRST = {A: 0.5, B: 0.3, C: 0.15, DOT: 0.04, EOS: 0.01}


def scripted_step(next_probs):
    """A step function whose next-token distribution depends only on the last token fed."""
    fed = []

    def step(tokens):
        fed.append(tokens.tolist())
        return torch.stack([logits_from_probs(next_probs(int(t))) for t in tokens])
    return step, fed


def run(penalty, groups=3, max_new_tokens=5, next_probs=lambda t: {DOT: 0.9, EOS: 0.1}):
    step, fed = scripted_step(next_probs)
    first = logits_from_probs(FIRST)[None]
    cands = diverse_group_search(first, step, num_groups=groups, diversity_penalty=penalty,
                                 max_new_tokens=max_new_tokens, stop_ids=[DOT], eos_ids=[EOS], pad_id=PAD)
    return cands[0], fed


def test_diversity_penalty_pushes_groups_to_different_tokens():
    strong, _ = run(penalty=3.0)
    assert [c.token_ids[0] for c in strong] == [A, B, C]
    weak, _ = run(penalty=0.1)  # a's lead (log .5 - log .3 = 0.51) beats a 0.1 penalty
    assert [c.token_ids[0] for c in weak] == [A, A, A]
    none, _ = run(penalty=0.0)
    assert [c.token_ids for c in none] == [[A, DOT]] * 3


def test_scores_pure_logprobs_and_penalised_beam_score():
    cands, _ = run(penalty=3.0)
    # step 2: group 0 takes '.', so '.' costs group 1 a penalty of 3: log .9 - 3 < log .1 -> EOS
    assert [c.token_ids for c in cands] == [[A, DOT], [B, EOS], [C, DOT]]
    assert [c.ended_by for c in cands] == ["stop", "eos", "stop"]
    g1, g2 = cands[1], cands[2]
    assert g1.logprobs == pytest.approx([math.log(0.3), math.log(0.1)], abs=1e-5)
    assert g1.logprob_sum == pytest.approx(math.log(0.3) + math.log(0.1), abs=1e-5)
    # the beam score is the penalised sum over the length: only the second '.' of group 2 pays
    assert g1.beam_score == pytest.approx((math.log(0.3) + math.log(0.1)) / 2, abs=1e-4)
    assert g2.beam_score == pytest.approx((math.log(0.15) + math.log(0.9) - 3.0) / 2, abs=1e-4)
    assert g2.logprob_mean == pytest.approx((math.log(0.15) + math.log(0.9)) / 2, abs=1e-4)


def test_penalty_counts_earlier_groups_at_the_same_step():
    # after the first token every group wants '.' (0.6) over EOS (0.4); with penalty 3 the second group
    # pays 3 for '.', so it ends with EOS instead; the third pays 3 for each and takes '.' again
    cands, _ = run(penalty=3.0, next_probs=lambda t: {DOT: 0.6, EOS: 0.4})
    assert [c.token_ids[1] for c in cands] == [DOT, EOS, DOT]
    assert [c.ended_by for c in cands] == ["stop", "eos", "stop"]
    assert cands[0].beam_score == pytest.approx((math.log(0.5) + math.log(0.6)) / 2, abs=1e-4)
    assert cands[2].beam_score == pytest.approx((math.log(0.15) + math.log(0.6) - 3.0) / 2, abs=1e-4)


def test_max_new_tokens_cuts_and_finished_rows_get_pad():
    cands, fed = run(penalty=0.0, groups=2, max_new_tokens=3, next_probs=lambda t: {A: 0.9, DOT: 0.1})
    assert [c.token_ids for c in cands] == [[A, A, A]] * 2
    assert all(c.ended_by == "length" for c in cands)
    assert len(fed) == 2  # no step after the last token
    cands, fed = run(penalty=3.0, groups=2, next_probs=lambda t: {DOT: 0.9, EOS: 0.1} if t == A else {B: 0.9, DOT: 0.1})
    # group 0 stops after 2 tokens ('.' is fed once), from then on it is fed PAD
    assert cands[0].token_ids == [A, DOT]
    assert [f[0] for f in fed] == [A, DOT, PAD, PAD]
    assert cands[1].token_ids == [B] * 5 and cands[1].ended_by == "length"


def test_vectorised_over_nodes_equals_one_node_at_a_time():
    def next_probs(t):
        return {A: {A: 0.1, B: 0.5, DOT: 0.4}, B: {DOT: 0.7, C: 0.3}, C: {EOS: 0.6, A: 0.4}}.get(t, {DOT: 1.0})
    firsts = [FIRST, {B: 0.6, C: 0.4}, {C: 0.9, A: 0.1}]
    batched_step, _ = scripted_step(next_probs)
    batched = diverse_group_search(torch.stack([logits_from_probs(f) for f in firsts]), batched_step,
                                   num_groups=3, diversity_penalty=1.0, max_new_tokens=6,
                                   stop_ids=[DOT], eos_ids=[EOS], pad_id=PAD)
    for f, got in zip(firsts, batched):
        step, _ = scripted_step(next_probs)
        alone = diverse_group_search(logits_from_probs(f)[None], step, num_groups=3, diversity_penalty=1.0,
                                     max_new_tokens=6, stop_ids=[DOT], eos_ids=[EOS], pad_id=PAD)[0]
        assert [c.token_ids for c in got] == [c.token_ids for c in alone]
        assert [c.beam_score for c in got] == pytest.approx([c.beam_score for c in alone])


# ------------------------------------------------------------------------------------------
# The sentence tree
# ------------------------------------------------------------------------------------------


def test_prune_official_keeps_best_and_worst():
    cands = [(10, 0.9), (11, 0.1), (12, 0.5), (13, 0.7), (14, 0.3), (15, 0.2)]
    assert prune(cands, 5, "official") == [10, 15, 11]  # 1 best + 2 worst
    assert prune(cands, 6, "official") == [10, 13, 14, 15, 11]  # 2 best + 3 worst
    assert prune(cands, 3, "best") == [10, 13, 12]
    assert prune(cands[:2], 5, "official") == [10, 11]


# Scripted children: the k-th child of a node whose text is T gets text T+"ABC"[k], logprob_sum from
# the table (default -5), and ends with EOS at depth 3.
SCORES = {"A": -1.0, "B": -2.0, "C": -3.0,
          "AA": -1.0, "AB": -6.0, "AC": -2.0, "BA": -0.5, "BB": -4.0, "BC": -9.0,
          "CA": -3.0, "CB": -0.1, "CC": -7.0}


def scripted_expand(k=3):
    calls = []

    def expand(responses):
        calls.append(["".join(r) for r in responses])
        out = []
        for sentences in responses:
            prefix = "".join(sentences)
            children = []
            for letter in "ABC"[:k]:
                text = letter
                full = prefix + letter
                c = Candidate(token_ids=[1] * len(full), logprobs=[SCORES.get(full, -5.0)],
                              ended_by="eos" if len(full) == 3 else "stop")
                children.append((text, c))
            out.append(children)
        return out
    return expand, calls


def self_score(siblings):
    return [n["logprob_sum"] for n in siblings]


def test_tree_official_pruning_exact_survivors():
    expand, calls = scripted_expand()
    nodes = grow_tree(expand, self_score, TreeSettings(sentence_beam_width=4, pruning="official"))
    # level 1: A, B, C all kept (3 <= 1 best + 2 worst). Level 2 path means:
    # AA -1, AB -3.5, AC -1.5, BA -1.25, BB -3, BC -5.5, CA -3, CB -1.55, CC -5
    # official width 4: best 1 (AA) + worst 2 (CC, BC), best first
    assert calls == [[""], ["A", "B", "C"], ["AA", "CC", "BC"]]
    survivors = {"".join(n["text"] for n in (nodes[i] for i in _path(nodes, n["id"])))
                 for n in nodes if n["depth"] == 2 and not n["pruned"]}
    assert survivors == {"AA", "BC", "CC"}
    finals = ["".join(nodes[i]["text"] for i in p) for p in final_paths(nodes)]
    assert sorted(finals) == sorted(a + b for a in ["AA", "BC", "CC"] for b in "ABC")
    assert all(nodes[p[-1]]["final_reason"] == "eos" for p in final_paths(nodes))


def test_tree_best_pruning_exact_survivors():
    expand, calls = scripted_expand()
    grow_tree(expand, self_score, TreeSettings(sentence_beam_width=2, pruning="best"))
    assert calls == [[""], ["A", "B"], ["AA", "BA"]]


def test_tree_length_and_depth_limits_make_nodes_final():
    expand, _ = scripted_expand()
    nodes = grow_tree(expand, self_score, TreeSettings(sentence_beam_width=3, pruning="best", max_sentences=1))
    assert len(nodes) == 4 and all(n["final_reason"] == "max_sentences" for n in nodes[1:])
    nodes = grow_tree(expand, self_score, TreeSettings(sentence_beam_width=3, pruning="best",
                                                       max_response_chars=2))
    # sentences join exactly as generated: "AB" is 2 characters, so every depth-2 node is final by length
    assert {n["final_reason"] for n in nodes if n["depth"] == 2} == {"max_response_chars"}


def _path(nodes, i):
    from csr.tree_format import path_ids
    return path_ids(nodes, i)


def test_nodes_whose_groups_all_ended_leave_the_batch_with_the_same_candidates():
    # node 0's groups all end at their second token ('.'), node 1's run to the length cap
    def next_probs(t):
        return {DOT: 0.9, EOS: 0.1} if t == A else {B: 0.6, C: 0.4}
    firsts = torch.stack([logits_from_probs(FIRST), logits_from_probs({DOT: 0.2, EOS: 0.1, B: 0.7})])
    kw = dict(num_groups=3, diversity_penalty=0.0, max_new_tokens=4, stop_ids=[DOT], eos_ids=[EOS], pad_id=PAD)
    step, fed_all = scripted_step(next_probs)
    stepped = diverse_group_search(firsts, step, **kw)
    step, fed = scripted_step(next_probs)
    kept = []
    dropped = diverse_group_search(firsts, step, keep_rows=lambda rows: kept.append(rows.tolist()), **kw)
    assert [[c.token_ids for c in node] for node in dropped] == [[c.token_ids for c in node] for node in stepped]
    assert [[c.logprobs for c in node] for node in dropped] == [[c.logprobs for c in node] for node in stepped]
    assert [len(f) for f in fed_all] == [6, 6, 6]  # without keep_rows: both nodes' rows to the end
    assert [[c.token_ids for c in node] for node in dropped] == [[[A, DOT]] * 3, [[B] * 4] * 3]
    assert kept == [[3, 4, 5]] and [len(f) for f in fed] == [6, 3, 3]  # node 0 left after its '.'
