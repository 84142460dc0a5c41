"""The calibrated reward (CSR, arXiv 2405.14622 §3.2) and the one registry of its terms, as pure functions.

    R(s) = λ · R_I(s) + (1 − λ) · R_T(s) [+ w · R_term(s) for every further term whose weight is not 0]

Terms (`TERMS`, each a function of a node's stored raw fields and the config field that weighs it):
- self (R_T), the self-reward, from the log-probs stored on each node (`self_reward`):
  prob (paper: the product of token probabilities, ×100 to share CLIP's percent scale),
  mean_prob (geometric-mean token probability ×100), sum_logprob, mean_logprob, or beam_score
  (what the official code uses: the length-normalised group-beam score, diversity penalty included).
  Weight 1 − λ (`score.reward_lambda`).
- visual (R_I), the visual constraint: 100 · cos(CLIP_image, CLIP_text(sentence)), clamped at 0 (paper)
  or not (official code). Weight λ.
- vig (R_VIG), the Visual Information Gain term (docs/method.md §3, the project's proposal): the node's
  `vig` on the percent scale (`vig_reward`). Weight `score.vig_weight` (0 = off, CSR as published).

calibration "raw" (paper) mixes the values; "rank" (official code) first turns each term's values into
their rank fractions among siblings (best = 1/n … worst = 1) and mixes the ranks. The official code then
prefers the lowest mixed rank; here the rank mix is negated so that higher is better everywhere,
which orders nodes and paths exactly as the official code does.

`calibrated_rewards(siblings, score_cfg)` is the one calibration: the search's sibling scorer, the score
stage and `csr vig rescore` all call it. A new term is one `register_term` call plus one `score.` config
field (with a help string, default 0 so that it is off); the term's value is stored on every node under
`stored_as`, beside `reward`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from csr.config import ConfigError

CALIBRATIONS = ("raw", "rank")
VIG_SCALES = ("contrast", "nats")

# the raw node field each self_reward kind reads
SELF_REWARD_FIELDS = {"prob": "logprob_sum", "sum_logprob": "logprob_sum", "mean_prob": "logprob_mean",
                      "mean_logprob": "logprob_mean", "beam_score": "beam_score"}


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


def vig_reward(vig: float | None, scale: str = "contrast") -> float:
    """R_VIG on the reward's percent scale; 0 for a node without VIG.

    R (R_I, R_T) lives on a 0–100 scale; VIG is a log-ratio in nats, unbounded. contrast (default):
    100 · tanh(VIG / 2) = 100 · (PPL_cf − PPL_I) / (PPL_cf + PPL_I), bounded in (−100, 100), 0 when the
    image does not change the sentence's perplexity, ≈ 50·VIG for small VIG; nats: VIG itself.
    """
    if vig is None or (isinstance(vig, float) and math.isnan(vig)):
        return 0.0
    if scale == "contrast":
        return 100.0 * math.tanh(float(vig) / 2.0)
    if scale == "nats":
        return float(vig)
    raise ValueError(f"unknown vig_scale {scale!r} ({', '.join(VIG_SCALES)})")


def rank_fractions(values: Sequence[float]) -> list[float]:
    """Rank fraction of each value among its siblings: best (highest) = 1/n, worst = 1; ties keep order."""
    n = len(values)
    order = sorted(range(n), key=lambda i: -values[i])
    ranks = [0.0] * n
    for position, i in enumerate(order, 1):
        ranks[i] = position / n
    return ranks


@dataclass(frozen=True)
class RewardTerm:
    """One term of the calibrated reward."""

    name: str
    value: Callable[[dict, Any], float]         # (node, score config) -> its value, from the node's raw fields
    weight: str | Callable[[Any], float]        # the score config field that weighs it, or config -> weight
    stored_as: str                              # the node field its value is stored in
    reads: Callable[[Any], Mapping[str, str]] = lambda cfg: {}  # config -> {raw node field: stage that writes it}
    always: bool = False                        # the paper's two terms: computed and stored even at weight 0

    def weight_in(self, score_cfg) -> float:
        if callable(self.weight):
            return self.weight(score_cfg)
        if not hasattr(score_cfg, self.weight):
            raise ConfigError(f"reward term '{self.name}' is weighed by score.{self.weight}, which the score "
                              f"config lacks; add the field to ScoreConfig (with a help string, default 0).")
        return getattr(score_cfg, self.weight)

    def is_on(self, score_cfg) -> bool:
        return self.always or self.weight_in(score_cfg) != 0


TERMS: dict[str, RewardTerm] = {}
"""The registered terms by name, in mixing order (`register_term`, `unregister_term`)."""


def register_term(term: RewardTerm) -> RewardTerm:
    """Add a term to the reward; refuses a taken name or a node field another term (or the reward) stores."""
    if term.name in TERMS:
        raise ValueError(f"reward term '{term.name}' is already registered; pick another name or "
                         f"unregister_term('{term.name}') first.")
    taken = {t.stored_as: t.name for t in TERMS.values()}
    if term.stored_as == "reward" or term.stored_as in taken:
        owner = taken.get(term.stored_as, "the calibrated reward")
        raise ValueError(f"reward term '{term.name}' would store its value in node field '{term.stored_as}', "
                         f"which {owner} already writes; give it a field of its own (stored_as).")
    TERMS[term.name] = term
    return term


def reward_term(name: str) -> RewardTerm:
    """The registered term called `name`."""
    if name not in TERMS:
        raise ValueError(f"unknown reward term '{name}' (registered: {', '.join(TERMS)}); register it "
                         f"with csr.score.reward.register_term.")
    return TERMS[name]


def unregister_term(name: str) -> RewardTerm:
    """Remove a term (a test's, or a plug-in's) from the reward; returns it."""
    return TERMS.pop(reward_term(name).name)


def active_terms(score_cfg) -> list[RewardTerm]:
    """The terms the reward mixes under `score_cfg`: the paper's two, and every other whose weight is not 0."""
    return [t for t in TERMS.values() if t.is_on(score_cfg)]


def term_raw_fields(score_cfg) -> dict[str, str]:
    """{raw node field: the stage that writes it} that the reward reads under `score_cfg`."""
    need: dict[str, str] = {}
    for t in active_terms(score_cfg):
        need.update(t.reads(score_cfg))
    return need


register_term(RewardTerm(
    "self", lambda node, cfg: self_reward(node, cfg.self_reward), lambda cfg: 1.0 - cfg.reward_lambda,
    "self_reward", reads=lambda cfg: {SELF_REWARD_FIELDS[cfg.self_reward]: "generate"}, always=True))
register_term(RewardTerm(
    "visual", lambda node, cfg: visual_reward(node["clip"], cfg.clip_clamp), lambda cfg: cfg.reward_lambda,
    "visual_reward", reads=lambda cfg: {"clip": "score"}, always=True))
register_term(RewardTerm(
    "vig", lambda node, cfg: vig_reward(node.get("vig"), cfg.vig_scale), "vig_weight", "vig_reward",
    reads=lambda cfg: {"vig": "score (with score.vig_weight > 0)"}))


def mix_terms(columns: Sequence[Sequence[float]], weights: Sequence[float], mode: str) -> list[float]:
    """Σ weight·value per sibling over the terms' value columns (raw), or −Σ weight·rank_fraction (rank).

    Summed left to right in term order, starting from the first product (so no −0.0 turns into 0.0):
    with self before visual the floats are those of λ·R_I + (1 − λ)·R_T, as a + b == b + a exactly,
    and the rank mix negated at the end equals −(…) − w·rank, as −x − y == −(x + y).
    """
    if mode not in CALIBRATIONS:
        raise ValueError(f"unknown calibration '{mode}' ({', '.join(CALIBRATIONS)})")
    if mode == "rank":
        columns = [rank_fractions(values) for values in columns]
    mixed = []
    for values in zip(*columns):
        total = weights[0] * values[0]
        for w, v in zip(weights[1:], values[1:]):
            total += w * v
        mixed.append(-total if mode == "rank" else total)
    return mixed


def calibrated_rewards(siblings: list[dict], score_cfg) -> list[float]:
    """The calibrated reward of sibling nodes (higher = better) under `score_cfg` (a ScoreConfig).

    Reads each active term's raw fields on the nodes and stores, on every node, each active term's
    value (`stored_as`) and the mixed `reward`.
    """
    terms = active_terms(score_cfg)
    columns = [[term.value(n, score_cfg) for n in siblings] for term in terms]
    rewards = mix_terms(columns, [t.weight_in(score_cfg) for t in terms], score_cfg.calibration)
    for i, n in enumerate(siblings):
        # laid out as the files always were: the paper's parts, the reward, then any further term's
        n.update((t.stored_as, values[i]) for t, values in zip(terms, columns) if t.always)
        n["reward"] = rewards[i]
        n.update((t.stored_as, values[i]) for t, values in zip(terms, columns) if not t.always)
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
