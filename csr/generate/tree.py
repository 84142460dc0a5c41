"""Sentence-level beam search: a tree whose nodes are sentences (CSR, arXiv 2405.14622 §3.1).

Level by level, every active node is extended by K candidate next sentences (see `beam.py`);
the level's new non-final nodes are then pruned to the sentence beam of width N, ranked by their
cumulative search score (the sum of the search scores along the path, as the official code keeps
it; every node of a level has the same depth, so the mean would order them the same). Pruning modes:
- official: with at least N open nodes keep the best N//2-1 and the worst N//2 (N=5: 1 best +
  2 worst); with fewer than N keep them all. The authors keep bad paths alive on purpose so that a
  clearly bad response exists for the rejected side of the preference pair.
- best: plain top-N.
A node is final when its sentence holds an EOS (see `beam.py` for whether EOS also stops it), when
the text reaches `max_response_chars` (the response alone, or the chat prompt plus the response as
the official code counts it: `length_limit`), or when the path reaches `max_sentences` (a safety
cap not in the paper). Pruned nodes stay in the tree, flagged, so the file shows the whole search.

Everything here is model-free: the model enters through `expand`, the reward through
`score_siblings`, which makes the search testable against scripted candidates. The node format it
writes, and the pure readers of it (paths, siblings, final paths, prefix text), live in
`csr.tree_format`, so that the later stages read trees without this search code.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

from csr.generate.beam import Candidate
from csr.tree_format import ROOT, join_sentences, path_ids, path_sentences, prefix_text

LENGTH_LIMITS = ("response", "prompt_and_response")


@dataclass(frozen=True)
class TreeSettings:
    sentence_beam_width: int = 5
    pruning: str = "official"
    max_response_chars: int = 1024
    max_sentences: int = 24
    length_limit: str = "response"  # or "prompt_and_response" (official)


class Prefix(list):
    """A node's sentences so far (their exact texts, as a list) and the token ids they were generated
    as (None when a node lacks them), so that the next level can continue from exactly those tokens."""

    def __init__(self, sentences: Sequence[str] = (), token_ids: list[int] | None = None):
        super().__init__(sentences)
        self.token_ids = token_ids


def path_prefix(nodes: list[dict], node_id: int) -> Prefix:
    path = [nodes[i] for i in path_ids(nodes, node_id)]
    tokens = None
    if all("token_ids" in n for n in path):
        tokens = [t for n in path for t in n["token_ids"]]
    return Prefix([n["text"] for n in path], tokens)


def prune(candidates: list[tuple[int, float]], width: int, mode: str) -> list[int]:
    """Ids kept from (id, path score) pairs, best first; ties keep generation order.

    official: fewer than `width` open nodes are all kept; otherwise the best width//2-1 and the
    worst width//2 (the released code's `new_nodes[:N//2-1] + new_nodes[-N//2:] if len >= N`).
    """
    order = [i for i, _ in sorted(candidates, key=lambda c: -c[1])]
    if mode == "best":
        return order[:width]
    if mode != "official":
        raise ValueError(f"unknown pruning mode '{mode}' (official, best)")
    if len(order) < width:
        return order
    n_best, n_worst = width // 2 - 1, width // 2
    return order[:n_best] + order[len(order) - n_worst:]


ExpandFn = Callable[[list[Prefix]], list[list[tuple[str, Candidate]]]]
"""Given each active node's prefix (sentences so far, with their tokens), returns per node its K
(exact text, Candidate) children."""

ScoreSiblingsFn = Callable[[list[dict]], list[float]]
"""Given the sibling nodes born from one parent, returns each one's search score (higher = better)."""


class TreeSearch:
    """The search for one (image, prompt) as a state machine, so that many trees can share batches.

    `pending()` gives the active nodes' sentences so far; `advance(expansions)` takes their children
    (same order) and runs scoring and pruning. `grow_tree` drives a single tree.
    """

    def __init__(self, score_siblings: ScoreSiblingsFn, settings: TreeSettings, prompt_text: str = ""):
        if settings.length_limit not in LENGTH_LIMITS:
            raise ValueError(f"unknown length_limit '{settings.length_limit}' ({', '.join(LENGTH_LIMITS)})")
        self.score_siblings = score_siblings
        # a scorer taking (siblings, nodes) also sees the tree so far (the VIG term reads the path)
        self._with_nodes = len(inspect.signature(score_siblings).parameters) >= 2
        self.settings = settings
        self.prompt_text = prompt_text
        self.nodes: list[dict] = [{"id": ROOT, "parent": None, "depth": 0, "text": "", "final": False,
                                   "pruned": False}]
        self.active = [ROOT]

    @property
    def done(self) -> bool:
        return not self.active

    def pending(self) -> list[Prefix]:
        return [path_prefix(self.nodes, i) for i in self.active]

    def advance(self, expansions: list[list[tuple[str, Candidate]]]) -> None:
        nodes, settings = self.nodes, self.settings
        level: list[dict] = []
        for parent_id, children in zip(self.active, expansions):
            parent = nodes[parent_id]
            siblings = []
            for text, cand in children:
                node = {
                    "id": len(nodes), "parent": parent_id, "depth": parent["depth"] + 1, "text": text,
                    "token_ids": list(cand.token_ids), "n_tokens": cand.n_tokens, "logprob_sum": cand.logprob_sum,
                    "logprob_mean": cand.logprob_mean, "beam_score": cand.beam_score,
                    "ended_by": cand.ended_by, "final": False, "final_reason": None, "pruned": False,
                }
                sentences = path_sentences(nodes, parent_id) + [text]
                if settings.length_limit == "prompt_and_response":
                    counted = prefix_text(self.prompt_text, sentences)
                else:
                    counted = join_sentences(sentences)
                if cand.ended_by == "eos" or cand.has_eos:
                    node["final"], node["final_reason"] = True, "eos"
                elif len(counted) >= settings.max_response_chars:
                    node["final"], node["final_reason"] = True, "max_response_chars"
                elif node["depth"] >= settings.max_sentences:
                    node["final"], node["final_reason"] = True, "max_sentences"
                nodes.append(node)
                siblings.append(node)
            scores = self.score_siblings(siblings, nodes) if self._with_nodes else self.score_siblings(siblings)
            for node, score in zip(siblings, scores):
                node["search_score"] = float(score)
                # cumulative, as the official code's `node.score = parent.score + score`
                node["path_search_score"] = parent.get("path_search_score", 0.0) + float(score)
            level.extend(siblings)
        open_nodes = [(n["id"], n["path_search_score"]) for n in level if not n["final"]]
        keep = prune(open_nodes, settings.sentence_beam_width, settings.pruning)
        kept = set(keep)
        for node_id, _ in open_nodes:
            nodes[node_id]["pruned"] = node_id not in kept
        self.active = keep


def grow_tree(expand: ExpandFn, score_siblings: ScoreSiblingsFn, settings: TreeSettings,
              prompt_text: str = "") -> list[dict]:
    """Run the sentence-level search for one (image, prompt); returns the node list (id = index)."""
    search = TreeSearch(score_siblings, settings, prompt_text)
    while not search.done:
        search.advance(expand(search.pending()))
    return search.nodes


ExpandManyFn = Callable[[list[tuple[int, Prefix]]], list[list[tuple[str, Candidate]]]]
"""Given (tree index, prefix) for active nodes of any trees, returns each one's children."""


def grow_trees(expand_many: ExpandManyFn, scorers: list[ScoreSiblingsFn], settings: TreeSettings,
               prompt_texts: list[str] | None = None) -> list[list[dict]]:
    """Run several searches in lockstep so that one batch serves the active nodes of all of them.

    Each tree's result is the same as `grow_tree` alone would give: the trees only share batches.
    """
    prompt_texts = prompt_texts or [""] * len(scorers)
    searches = [TreeSearch(score, settings, text) for score, text in zip(scorers, prompt_texts)]
    while True:
        live = [t for t, s in enumerate(searches) if not s.done]
        if not live:
            return [s.nodes for s in searches]
        pending = {t: searches[t].pending() for t in live}
        requests = [(t, sentences) for t in live for sentences in pending[t]]
        results = iter(expand_many(requests))
        for t in live:
            searches[t].advance([next(results) for _ in pending[t]])
