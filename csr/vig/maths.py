"""The pure core of Visual Information Gain (docs/method.md §3): VIG from log-probs, the selection
threshold τ, which samples and tokens selective training keeps, and the distribution summary.

    VIG_t = log p(a_t | a_<t, Q, I) − log p(a_t | a_<t, Q, I_cf)          (token level)
    VIG   = mean_t VIG_t = log( PPL(A | Q, I_cf) / PPL(A | Q, I) )         (sample level)

Selection for training (docs/method.md §3: "keep the top p% of samples by VIG (default p = 70, threshold
τ = the p-th percentile), and inside kept samples compute the loss only on tokens with VIG_t >= τ")
-----------------------------------------------------------------------------------------------------
"τ = the p-th percentile" read literally (ascending, numpy's convention) contradicts "keep the top
p%": with p = 70 the 70th percentile keeps only the top 30%. This module reads it as the percentile
counted from the top, i.e. the **(100 − p)-th ascending percentile**: τ is the smallest sample VIG
among the kept top p% (`tau_mode="keep_boundary"`, the default), so that exactly the samples with
VIG >= τ are kept (k = ceil(n·p/100) of n; ties at the boundary are broken by dataset order) and
the same τ masks the tokens. `tau_mode="percentile"` is the literal reading: samples are still the
top p% by rank, but the token threshold is `numpy.percentile(sample_vigs, p)` (linear
interpolation), a stricter cut (more tokens masked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

TAU_MODES = ("keep_boundary", "percentile")
IGNORE_INDEX = -100


def sample_vig(token_vigs: Sequence[float]) -> float:
    """Sample-level VIG: the mean of the per-token VIG (= log PPL_cf / PPL_image)."""
    if len(token_vigs) == 0:
        raise ValueError("a sample with no answer tokens has no VIG")
    return math.fsum(float(v) for v in token_vigs) / len(token_vigs)


def vig_from_logprobs(logp_image: Sequence[float], logp_cf: Sequence[float]) -> tuple[list[float], float]:
    """(per-token VIG, sample VIG) from the answer tokens' log-probs under the real and the content-free input.

    Both sequences hold log p(a_t | a_<t, Q, ·) of the same tokens in the same order.
    """
    a = [float(x) for x in logp_image]
    b = [float(x) for x in logp_cf]
    if len(a) != len(b):
        raise ValueError(f"log-prob sequences differ in length ({len(a)} vs {len(b)}): not the same tokens")
    per_token = [x - y for x, y in zip(a, b)]
    return per_token, sample_vig(per_token)


def n_kept(n: int, keep_percent: float) -> int:
    """How many of `n` samples the top `keep_percent`% is: ceil(n·p/100), at most n."""
    if not 0.0 <= keep_percent <= 100.0:
        raise ValueError(f"keep_percent={keep_percent} must be in [0, 100]")
    return min(n, math.ceil(round(n * keep_percent / 100.0, 9)))


def _sort_key(values: Sequence[float]):
    # NaN (should not happen) ranks last; ties keep dataset order
    return lambda i: (-(values[i] if values[i] == values[i] else -math.inf), i)


def select_samples(sample_vigs: Sequence[float], keep_percent: float = 70.0) -> list[bool]:
    """Which samples are in the top `keep_percent`% by VIG: exactly ceil(n·p/100) of them.

    Ties at the boundary are broken by dataset order (the earlier sample is kept).
    """
    n = len(sample_vigs)
    k = n_kept(n, keep_percent)
    order = sorted(range(n), key=_sort_key(sample_vigs))
    kept = set(order[:k])
    return [i in kept for i in range(n)]


def selection_threshold(sample_vigs: Sequence[float], keep_percent: float = 70.0,
                        tau_mode: str = "keep_boundary") -> float:
    """τ, the token threshold (see the module docstring for the two readings of docs/method.md).

    keep_boundary: the smallest sample VIG among the kept top p% (the (100 − p)-th percentile
    counted from below); +inf when nothing is kept. percentile: numpy.percentile(sample_vigs, p).
    """
    if tau_mode not in TAU_MODES:
        raise ValueError(f"tau_mode={tau_mode!r} is not one of {TAU_MODES}")
    values = [float(v) for v in sample_vigs]
    if not values:
        raise ValueError("no samples to take a threshold from")
    if tau_mode == "percentile":
        import numpy as np

        if not 0.0 <= keep_percent <= 100.0:
            raise ValueError(f"keep_percent={keep_percent} must be in [0, 100]")
        return float(np.percentile(np.asarray(values), keep_percent))
    k = n_kept(len(values), keep_percent)
    if k == 0:
        return math.inf
    order = sorted(range(len(values)), key=_sort_key(values))
    return values[order[k - 1]]


def token_keep_mask(token_vigs: Sequence[float], tau: float) -> list[bool]:
    """True where a token keeps its label: VIG_t >= τ."""
    return [float(v) >= tau for v in token_vigs]


@dataclass
class Selection:
    """The outcome of VIG selection over a scored dataset (one entry per sample, dataset order)."""

    tau: float
    keep_percent: float
    tau_mode: str
    token_mask: bool
    kept: list[bool]
    masks: list[list[bool] | None]          # per kept sample: keep flag per answer token; None if dropped
    token_counts: list[int] = field(default_factory=list)
    text_only: list[bool] = field(default_factory=list)   # samples with no image (kept, never masked)

    def stats(self) -> dict:
        total = sum(self.token_counts)
        in_kept = sum(n for n, k in zip(self.token_counts, self.kept) if k)
        supervised = sum(sum(m) for m in self.masks if m is not None)
        kept = sum(self.kept)
        return {
            "tau": self.tau, "tau_mode": self.tau_mode, "keep_percent": self.keep_percent,
            "token_mask": self.token_mask,
            "samples_total": len(self.kept), "samples_kept": kept,
            "tokens_total": total, "tokens_in_kept_samples": in_kept, "tokens_supervised": supervised,
            "share_tokens_supervised": supervised / total if total else 0.0,
            "share_tokens_supervised_in_kept": supervised / in_kept if in_kept else 0.0,
            "kept_samples_without_supervised_tokens": sum(1 for m in self.masks if m is not None and not any(m)),
            "text_only_samples": sum(self.text_only),
            "text_only_tokens": sum(n for n, t in zip(self.token_counts, self.text_only) if t),
        }


def plan_selection(token_vigs: Sequence[Sequence[float]], keep_percent: float = 70.0,
                   tau_mode: str = "keep_boundary", token_mask: bool = True,
                   sample_vigs: Sequence[float] | None = None) -> Selection:
    """Samples kept and per-token label masks for VIG-selective training.

    `token_vigs[i]` is sample i's per-token VIG; `sample_vigs` defaults to their means. With
    keep_percent=100 and token_mask=False this is plain SFT (everything kept and supervised).
    """
    if sample_vigs is None:
        sample_vigs = [sample_vig(t) for t in token_vigs]
    if len(sample_vigs) != len(token_vigs):
        raise ValueError("sample_vigs and token_vigs differ in length")
    kept = select_samples(sample_vigs, keep_percent)
    tau = selection_threshold(sample_vigs, keep_percent, tau_mode) if len(sample_vigs) else math.inf
    masks: list[list[bool] | None] = []
    for toks, k in zip(token_vigs, kept):
        if not k:
            masks.append(None)
        else:
            masks.append(token_keep_mask(toks, tau) if token_mask else [True] * len(toks))
    return Selection(tau=tau, keep_percent=keep_percent, tau_mode=tau_mode, token_mask=token_mask,
                     kept=kept, masks=masks, token_counts=[len(t) for t in token_vigs])


def plan_records_selection(records: Sequence[dict], keep_percent: float = 70.0, tau_mode: str = "keep_boundary",
                           token_mask: bool = True) -> Selection:
    """`plan_selection` over scored records (`csr vig score` output), text-only samples included.

    Records with a VIG are ranked and masked as `plan_selection` does; text-only records (``vig``
    None: no image, so no VIG) are kept with every answer token supervised, outside the ranking and
    outside τ (the paper keeps them unmasked).
    """
    scored = [i for i, r in enumerate(records) if r.get("vig") is not None]
    inner = plan_selection([records[i]["vig_tokens"] for i in scored], keep_percent, tau_mode, token_mask,
                           sample_vigs=[records[i]["vig"] for i in scored]) if scored else None
    n = len(records)
    kept: list[bool] = [True] * n
    masks: list[list[bool] | None] = [[True] * int(r["n_tokens"]) for r in records]
    for j, i in enumerate(scored):
        kept[i], masks[i] = inner.kept[j], inner.masks[j]
    return Selection(tau=inner.tau if inner else math.inf, keep_percent=keep_percent, tau_mode=tau_mode,
                     token_mask=token_mask, kept=kept, masks=masks,
                     token_counts=[int(r["n_tokens"]) for r in records],
                     text_only=[r.get("vig") is None for r in records])


def apply_token_masks(labels: torch.Tensor, masks: Sequence[Sequence[bool] | None],
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """A copy of `labels` (B, L) with VIG-masked answer tokens set to `ignore_index`.

    Row b's label positions (labels != ignore_index), left to right, are its answer tokens in order;
    the j-th keeps its label iff masks[b][j]. None keeps the row as is. A row with fewer label
    positions than mask entries (cut by max_length) uses the first entries of its mask; a row with
    more is an error (the scores do not belong to this tokenisation).
    """
    out = labels.clone()
    if len(masks) != labels.shape[0]:
        raise ValueError(f"{len(masks)} masks for a batch of {labels.shape[0]} rows")
    for b, m in enumerate(masks):
        if m is None:
            continue
        pos = (labels[b] != ignore_index).nonzero(as_tuple=True)[0]
        if len(pos) > len(m):
            raise ValueError(f"row {b} has {len(pos)} supervised tokens but its VIG mask covers {len(m)}: the "
                             f"scores were computed on another tokenisation (another model, chat template or "
                             f"max_length?). Rescore with `csr vig score` for this model.")
        keep = torch.tensor([bool(x) for x in m[:len(pos)]], dtype=torch.bool, device=labels.device)
        out[b, pos[~keep]] = ignore_index
    return out


def summarize_vigs(sample_vigs: Sequence[float], token_vigs: Sequence[Sequence[float]] = ()) -> dict:
    """Distribution summary of sample VIG (and of token VIG when given)."""
    import numpy as np

    v = np.asarray([float(x) for x in sample_vigs], dtype=float)
    out = {"samples": int(v.size)}
    if v.size:
        out.update(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()),
                   percentiles={str(p): float(np.percentile(v, p)) for p in (10, 30, 50, 70, 90)},
                   share_samples_positive=float((v > 0).mean()))
    flat = [float(x) for t in token_vigs for x in t]
    if flat:
        t = np.asarray(flat)
        out.update(tokens=int(t.size), token_mean=float(t.mean()), share_tokens_positive=float((t > 0).mean()))
    return out
