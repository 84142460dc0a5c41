"""Post-hoc calibration of closed-set answers (docs/method.md §2, Zhang et al. 2024; contextual
calibration, Zhao et al. 2021).

For a closed answer set (yes/no, option letters, or any custom labels) every label is scored
from the probabilities of the *first answer token*: a label's score is the summed next-token
probability of the first tokens of its surface variants ("yes", "Yes", " yes", " Yes", "YES",
...), so case and spacing variants of one label are merged. The label scores are renormalised
over the label set (`p`, one row per question).

The same question is scored under *content-free* inputs (`csr.content_free.CALIBRATION_INPUTS`):

- ``none``: no image: the image placeholder (and the newline after it) removed from the prompt,
  and no pixel values;
- ``unk``: the placeholder replaced by the tokenizer's unknown-token text (``<unk>``), no pixel
  values;
- ``blank``: a plain white image of the real image's size;
- ``noise``: a uniform RGB noise image of the real image's size (seeded).

Their renormalised label scores are averaged with equal weights into ``p_cf`` (``combine=mean``,
the toolkit's), or their raw label scores are summed and renormalised (``combine=sum``, the
authors' code), per question (default) or once for the whole dataset (the mean of the per-question
``p_cf``); an optional ``epsilon`` is then added (the authors: 1e-4). Then

- ``diag`` (default): ``W = diag(p_cf)^-1, b = 0``: ``q ∝ p / p_cf``, renormalised;
- ``bias``: ``q = softmax(p - p_cf)``, Zhao et al.'s offset form (its arg-max is the arg-max of
  ``p - p_cf``). This is not the authors' ``W = I, b = -p_cf`` as their code runs it: there
  ``p - p_cf`` is divided by its own sum, which is near zero (both rows sum to 1), so its sign
  flips from question to question and so do the decisions; the softmax form has no such division.

How a label is scored from the first-token probabilities: by default (the toolkit's) the summed
probability of the first tokens of its case and spacing variants (`label_token_groups`); with
``label_top_k = k`` (the authors': 10) the probability of the highest-ranked token among the top k
whose lower-cased, stripped text is the label, 0 when none is (`top_k_label_probs`). Named
settings: `csr.debias.recipes`.

The answer is ``argmax q``. With no image every label should score the same; dividing by (or
subtracting) what the model says with no image removes its language prior.

Pure functions on probability tables (numpy, float64): `label_variants`, `label_token_groups`,
`label_scores`, `normalise`, `content_free_estimate`, `label_token_index`, `top_k_label_probs`,
`calibrate`, `predict`. The model glue that produces the tables: `csr.debias.label_probs`; closed-set
files, metrics and the one-call `calibrate_file`: `csr.debias.closed_set`; the content-free inputs
themselves: `csr.content_free`.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MODES = ("diag", "bias")
COMBINES = ("mean", "sum")
EPS = 1e-12
_SHARED_WARNED: set[str] = set()

# Named label sets; anything else given as a comma-separated list is a custom label set.
LABEL_SETS = {
    "yesno": ["yes", "no"],
    "letters": list("ABCD"),
    "abcd": list("ABCD"),
    "abcde": list("ABCDE"),
}


def resolve_labels(spec: str | Sequence[str]) -> list[str]:
    """A label list from a named set ('yesno', 'letters', 'abcde') or 'a,b,c' or a list."""
    if not isinstance(spec, str):
        labels = [str(x) for x in spec]
    elif spec.strip().lower() in LABEL_SETS:
        labels = list(LABEL_SETS[spec.strip().lower()])
    else:
        labels = [x.strip() for x in spec.split(",") if x.strip()]
    if len(labels) < 2:
        raise ValueError(f"a closed answer set needs at least two labels, got {labels!r}")
    if len({lab.lower() for lab in labels}) != len(labels):
        raise ValueError(f"labels must differ in more than case: {labels!r}")
    return labels


def label_variants(label: str) -> list[str]:
    """Case and spacing variants of a label: as given, lower, Capitalised, UPPER, each also with a
    leading space (most tokenizers write the answer's first word with one)."""
    label = label.strip()
    cased = dict.fromkeys([label, label.lower(), label[:1].upper() + label[1:].lower(), label.upper()])
    return [v for c in cased for v in (c, " " + c)]


def label_token_groups(tokenizer, labels: Sequence[str], merge_variants: bool = True) -> list[list[int]]:
    """For each label, the distinct first-token ids of its variants (`label_variants`).

    A first token shared by variants of two different labels (e.g. a bare space 'Ġ' that starts
    both ' yes' and ' no' in a small vocabulary) says nothing about which label follows: it is
    dropped from both, with a warning. A label left with no token is an error. Without
    `merge_variants` only the label as given is used.
    """
    firsts: list[set[int]] = []
    for lab in labels:
        forms = label_variants(lab) if merge_variants else [lab]
        ids = set()
        for form in forms:
            toks = tokenizer.encode(form, add_special_tokens=False)
            if toks:
                ids.add(int(toks[0]))
        firsts.append(ids)
    owners: dict[int, set[int]] = {}
    for k, ids in enumerate(firsts):
        for t in ids:
            owners.setdefault(t, set()).add(k)
    shared = {t for t, ks in owners.items() if len(ks) > 1}
    if shared:
        message = str({tokenizer.convert_ids_to_tokens(t): [labels[k] for k in sorted(owners[t])]
                       for t in sorted(shared)})
        if message not in _SHARED_WARNED:  # once per process: stages call this every batch
            _SHARED_WARNED.add(message)
            log.warning("first tokens shared by several labels are ignored: %s", message)
    groups = [sorted(ids - shared) for ids in firsts]
    for lab, g in zip(labels, groups):
        if not g:
            raise ValueError(f"label {lab!r} has no first token of its own in this vocabulary "
                             f"(its variants all start with a token another label also starts with)")
    return groups


def label_scores(probs, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """[N, K] label masses: each label's summed next-token probability over its token ids.

    `probs` is [N, V] (or [V]) next-token probabilities.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = probs[None]
    return np.stack([probs[:, list(g)].sum(axis=1) for g in groups], axis=1)


def normalise(p) -> np.ndarray:
    """Rows renormalised to sum to 1 (an all-zero row becomes uniform)."""
    p = np.asarray(p, dtype=np.float64)
    if np.any(p < 0):
        raise ValueError("probabilities must be non-negative")
    s = p.sum(axis=-1, keepdims=True)
    k = p.shape[-1]
    return np.where(s > 0, p / np.where(s > 0, s, 1.0), 1.0 / k)


def content_free_estimate(tables, per_sample: bool = True, combine: str = "mean", epsilon: float = 0.0) -> np.ndarray:
    """``p_cf`` from the label scores of one or more content-free inputs.

    `tables` is a list (or a dict name -> table) of [N, K] label scores, one per content-free
    input. combine='mean' (the toolkit's): the equal-weight mean of each input's renormalised
    rows. combine='sum' (the authors' code): the raw rows summed, then renormalised (an input
    with more label mass weighs more). `epsilon` is added afterwards (the authors: 1e-4, so that
    a label absent from every content-free top-k does not divide by zero). Per sample (default):
    one ``p_cf`` row per question, [N, K]. Dataset mean: the mean of those rows, repeated for
    every question.
    """
    if isinstance(tables, dict):
        tables = list(tables.values())
    if combine not in COMBINES:
        raise ValueError(f"unknown content-free combination {combine!r}: choose from {COMBINES}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    tables = [np.asarray(t, dtype=np.float64) for t in tables]
    if not tables:
        raise ValueError("content_free_estimate needs at least one content-free input")
    shapes = {t.shape for t in tables}
    if len(shapes) != 1:
        raise ValueError(f"content-free tables differ in shape: {sorted(shapes)}")
    if combine == "mean":
        p_cf = np.mean(np.stack([normalise(t) for t in tables]), axis=0)
    else:
        p_cf = normalise(np.sum(np.stack(tables), axis=0))
    if p_cf.ndim == 1:
        p_cf = p_cf[None]
    p_cf = p_cf + epsilon
    if not per_sample:
        p_cf = np.broadcast_to(p_cf.mean(axis=0, keepdims=True), p_cf.shape).copy()
    return p_cf


def label_token_index(tokenizer, labels: Sequence[str]) -> dict[int, int]:
    """{token id: label index} for every vocabulary token whose decoded text, lower-cased and stripped,
    is a label (lower-cased): the tokens the authors' top-k rule can read a label from."""
    want = {lab.strip().lower(): k for k, lab in enumerate(labels)}
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    return {i: want[t.lower().strip()] for i, t in enumerate(texts) if t.lower().strip() in want}


def top_k_label_probs(probs, token_label: dict[int, int], n_labels: int, k: int = 10) -> np.ndarray:
    """[N, K] label probabilities by the authors' rule: among the k most probable first tokens, in
    rank order, a label takes the probability of the first token whose text is that label
    (`token_label`: token id -> label index); a label with no such token in the top k scores 0.
    Variants are not summed ('Yes' and ' yes' are one string; only the higher-ranked counts)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = probs[None]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, probs.shape[1])
    out = np.zeros((probs.shape[0], n_labels))
    # stable rank order: higher probability first, ties by lower token id
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    for r in range(probs.shape[0]):
        seen = set()
        for t in order[r]:
            lab = token_label.get(int(t))
            if lab is not None and lab not in seen:
                out[r, lab] = probs[r, t]
                seen.add(lab)
    return out


def calibrate(p, p_cf, mode: str = "diag") -> np.ndarray:
    """Calibrated label probabilities q [N, K] (p and p_cf are renormalised first).

    diag: W = diag(p_cf)^-1, b = 0 -> q ∝ p / p_cf, renormalised (the paper's and the authors').
    bias: q = softmax(p - p_cf), Zhao et al.'s offset form. The authors' code writes this mode as
    W = I, b = -p_cf and then divides p - p_cf by its sum, which is near zero: not reproduced.
    `p_cf` is [N, K] (per sample) or [K] (one for all rows).
    """
    p = normalise(p)
    p_cf = normalise(p_cf)
    if p.ndim == 1:
        p = p[None]
    if p_cf.ndim == 1:
        p_cf = np.broadcast_to(p_cf[None], p.shape)
    if p_cf.shape != p.shape:
        raise ValueError(f"p {p.shape} and p_cf {p_cf.shape} differ in shape")
    if mode == "diag":
        return normalise(p / np.maximum(p_cf, EPS))
    if mode == "bias":
        z = p - p_cf
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown calibration mode {mode!r}: choose from {MODES}")


def predict(q, labels: Sequence[str]) -> list[str]:
    """The arg-max label of each row (ties: the first label)."""
    q = np.asarray(q)
    if q.ndim == 1:
        q = q[None]
    return [labels[int(i)] for i in q.argmax(axis=1)]
