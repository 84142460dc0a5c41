"""The calibrated reward (CSR, arXiv 2405.14622 §3.2), as pure functions over tree nodes.

    R(s) = λ · R_I(s) + (1 − λ) · R_T(s),   λ = 0.9

- R_T, the self-reward, from the log-probs stored on each node (`self_reward`):
  prob (paper: the product of token probabilities, ×100 to share CLIP's percent scale),
  mean_prob (geometric-mean token probability ×100), sum_logprob, mean_logprob, or beam_score
  (what the official code uses: the length-normalised group-beam score, diversity penalty included).
- R_I, the visual constraint: 100 · cos(CLIP_image, CLIP_text(sentence)), clamped at 0 (paper) or not
  (official code).
- calibration "raw" (paper) mixes the values; "rank" (official code) first turns each score into its
  rank fraction among siblings (best = 1/n … worst = 1) and mixes the ranks. The official code then
  prefers the lowest mixed rank; here the rank mix is negated so that higher is better everywhere,
  which orders nodes and paths exactly as the official code does.
"""

from __future__ import annotations

import math
from typing import Sequence


def self_reward(node: dict, kind: str) -> float:
    if kind == "prob":
        return 100.0 * math.exp(node["logprob_sum"])
    if kind == "mean_prob":
        return 100.0 * math.exp(node["logprob_mean"])
    if kind == "sum_logprob":
        return float(node["logprob_sum"])
    if kind == "mean_logprob":
        return float(node["logprob_mean"])
    if kind == "beam_score":
        return float(node["beam_score"])
    raise ValueError(f"unknown self_reward '{kind}' (prob, mean_prob, sum_logprob, mean_logprob, beam_score)")


def visual_reward(clip_score: float, clamp: bool = True) -> float:
    """`clip_score` is 100·cos already."""
    return max(clip_score, 0.0) if clamp else float(clip_score)


def rank_fractions(values: Sequence[float]) -> list[float]:
    """Rank fraction of each value among its siblings: best (highest) = 1/n, worst = 1; ties keep order."""
    n = len(values)
    order = sorted(range(n), key=lambda i: -values[i])
    ranks = [0.0] * n
    for position, i in enumerate(order, 1):
        ranks[i] = position / n
    return ranks


def calibrate_siblings(self_scores: Sequence[float], visual_scores: Sequence[float], lam: float,
                       mode: str) -> list[float]:
    """Calibrated rewards of sibling sentences (higher = better)."""
    if mode == "raw":
        return [lam * v + (1.0 - lam) * s for s, v in zip(self_scores, visual_scores)]
    if mode == "rank":
        rs, rv = rank_fractions(self_scores), rank_fractions(visual_scores)
        return [-(lam * v + (1.0 - lam) * s) for s, v in zip(rs, rv)]
    raise ValueError(f"unknown calibration '{mode}' (raw, rank)")


def score_siblings(siblings: list[dict], *, lam: float, mode: str, self_kind: str, clamp: bool) -> list[float]:
    """Calibrated reward for sibling nodes that already hold `clip` (100·cos). Stores the parts on each node."""
    self_scores = [self_reward(n, self_kind) for n in siblings]
    visual_scores = [visual_reward(n["clip"], clamp) for n in siblings]
    rewards = calibrate_siblings(self_scores, visual_scores, lam, mode)
    for n, s, v, r in zip(siblings, self_scores, visual_scores, rewards):
        n["self_reward"], n["visual_reward"], n["reward"] = s, v, r
    return rewards


PATH_SCORES = ("mean", "official")


def path_score(rewards: Sequence[float], kind: str = "mean") -> float:
    """A path's score from its sentences' rewards (first sentence first).

    mean (paper): their mean. official (the released code): their sum divided by the number of
    nodes on the path *including the root*, n + 1 (the root holds no reward but counts).
    """
    if not rewards:
        return float("-inf")
    total = 0.0
    for r in rewards:  # left to right, as the official code accumulates (ties depend on it)
        total += r
    if kind == "mean":
        return total / len(rewards)
    if kind == "official":
        return total / (len(rewards) + 1)
    raise ValueError(f"unknown path_score '{kind}' ({', '.join(PATH_SCORES)})")
