"""The sentence-tree format that generate writes and score, pairs, the VIG glue and the viewer read.

A tree is ``{"id", "image", "prompt", "nodes"}``; ``nodes`` is a list whose index is the node's
``id``. Node 0 is the root: no text, ``parent`` None, depth 0. Every other node is one sentence:
``parent`` (the id of the node it continues; parents come before their children), ``depth``,
``text`` (its exact text, with the whitespace the model wrote before it), ``final`` and
``final_reason``, ``pruned``, ``ended_by``, and the raw scores the stages add (``logprob_sum``,
``logprob_mean``, ``beam_score`` from generate; ``clip``, ``vig``, ``vig_sum``, ``vig_n_tokens``
from score) with the reward parts computed from them (`csr.score.reward`).

Everything here is a pure function of that format: no search, no model, so any stage can read a tree
without importing the code that grows one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

ROOT = 0


def join_sentences(sentences: Sequence[str]) -> str:
    """A response: its sentences' exact texts concatenated, ends stripped.

    A sentence's text keeps the whitespace the model wrote before it (' The cat.', or 'A dog.'
    after a '.\\n'), so the concatenation is what the model wrote, newlines included.
    """
    return "".join(sentences).strip()


def continue_text(context: str, text: str) -> str:
    """`context` (a chat prompt and earlier sentences) followed by `text` exactly as generated: LLaVA's
    'ASSISTANT:' is followed by the model's ' The ...', ChatML's 'assistant\\n' by 'The ...'."""
    return context + text


def prefix_text(prompt_text: str, sentences: Sequence[str]) -> str:
    """The text a node continues from: the chat prompt followed by the node's sentences so far."""
    return continue_text(prompt_text, "".join(sentences))


def path_ids(nodes: list[dict], node_id: int) -> list[int]:
    """Node ids from the first sentence down to `node_id` (the root, which holds no text, excluded)."""
    ids = []
    while node_id != ROOT:
        ids.append(node_id)
        node_id = nodes[node_id]["parent"]
    return ids[::-1]


def path_sentences(nodes: list[dict], node_id: int) -> list[str]:
    """The exact texts of the sentences from the first one down to `node_id` (none for the root)."""
    return [nodes[i]["text"] for i in path_ids(nodes, node_id)]


def children_of(nodes: list[dict]) -> dict[int, list[int]]:
    """Child ids of every node, in generation order."""
    children: dict[int, list[int]] = {n["id"]: [] for n in nodes}
    for n in nodes[1:]:
        children[n["parent"]].append(n["id"])
    return children


def siblings_by_parent(nodes: list[dict]) -> dict[int, list[dict]]:
    """{parent id: its child nodes in generation order}, for the parents that have children."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for n in nodes[1:]:
        groups[n["parent"]].append(n)
    return groups


def final_paths(nodes: list[dict], keep: set[int] | None = None) -> list[list[int]]:
    """Every root-to-final path (node ids, first sentence first), in depth-first order.

    Depth-first with children in generation order is the order the official code lists paths in,
    which decides its ties. With `keep`, only paths whose every node is in `keep`.
    """
    children, out, stack = children_of(nodes), [], [(ROOT, [])]
    while stack:
        node_id, path = stack.pop()
        if node_id != ROOT:
            if keep is not None and node_id not in keep:
                continue
            path = path + [node_id]
            if nodes[node_id].get("final"):
                out.append(path)
                continue
        stack.extend((c, path) for c in reversed(children[node_id]))
    return out


def is_end_marker(node: dict) -> bool:
    """A candidate that is EOS alone (with `generate.stop_at_eos`, the model ending its response right
    after a sentence): no sentence to score or clean, but it marks its path as ended by the model."""
    return node.get("ended_by") == "eos" and not node["text"].strip()
