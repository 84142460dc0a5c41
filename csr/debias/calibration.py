"""Post-hoc calibration of closed-set answers (docs/method.md §2, Zhang et al. 2024; contextual
calibration, Zhao et al. 2021).

For a closed answer set (yes/no, option letters, or any custom labels) every label is scored
from the probabilities of the *first answer token*: a label's score is the summed next-token
probability of the first tokens of its surface variants ("yes", "Yes", " yes", " Yes", "YES",
...), so case and spacing variants of one label are merged. The label scores are renormalised
over the label set (`p`, one row per question).

The same question is scored under *content-free* inputs (`CALIBRATION_INPUTS`):

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
`label_scores`, `normalise`, `content_free_estimate`, `calibrate`, `predict`. Model glue:
`content_free_prompt`, `content_free_image`, `first_token_label_probs`, `score_closed_set`,
`calibrated_predictions`. Files and metrics: `load_closed_set`, `evaluate_calibration`.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from csr.content_free import CALIBRATION_INPUTS, TEXT_ONLY_INPUTS, blank_or_noise_image, content_free_prompt

log = logging.getLogger(__name__)

MODES = ("diag", "bias")
COMBINES = ("mean", "sum")
EPS = 1e-12

# Named label sets; anything else given as a comma-separated list is a custom label set.
LABEL_SETS = {
    "yesno": ["yes", "no"],
    "letters": list("ABCD"),
    "abcd": list("ABCD"),
    "abcde": list("ABCDE"),
}

# LLaVA's multiple-choice instruction (MMBench / ScienceQA evaluation prompts).
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


# ---------------------------------------------------------------------------------------------
# Pure math on probability tables
# ---------------------------------------------------------------------------------------------


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
        log.warning("first tokens shared by several labels are ignored: %s",
                    {tokenizer.convert_ids_to_tokens(t): [labels[k] for k in sorted(owners[t])]
                     for t in sorted(shared)})
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


# ---------------------------------------------------------------------------------------------
# Model glue
# ---------------------------------------------------------------------------------------------


def next_token_logits(model, enc: dict):
    """Next-token logits [B, V] after a left-padded batch (positions as generate() computes them)."""
    positions = (enc["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    out = model(**enc, position_ids=positions, use_cache=False)
    return out.logits[:, -1].float()


def first_token_label_probs(model, processor, questions: Sequence[str], groups: Sequence[Sequence[int]], *,
                            images: Sequence | None = None, cf: str | None = None, batch_size: int = 16,
                            seed: int = 0, reader=None) -> np.ndarray:
    """[N, K] unnormalised label masses from the first answer token.

    cf=None: the real `images` (paths or PIL images); cf='none'/'unk': text only, no pixel values;
    cf='blank'/'noise': a content-free image of each real image's size (noise seeded by `seed`).
    `reader` maps next-token probabilities [B, V] to label scores [B, K]; default
    `label_scores(probs, groups)`.
    """
    import torch

    from csr.data import as_rgb_image
    from csr.models import build_chat_prompt, encode_left_padded

    if cf is not None and cf not in CALIBRATION_INPUTS:
        raise ValueError(f"unknown content-free input {cf!r}: choose from {CALIBRATION_INPUTS}")
    if cf in (None, "blank", "noise") and images is None:
        raise ValueError("images are needed for the real or blank/noise inputs")
    rng = np.random.default_rng(seed)
    rows = []
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            prompts = [build_chat_prompt(processor, q) for q in questions[start:start + batch_size]]
            if cf in TEXT_ONLY_INPUTS:
                enc = encode_left_padded(processor, model, [content_free_prompt(p, processor, cf) for p in prompts],
                                         None)
            else:
                ims = [as_rgb_image(x) for x in images[start:start + batch_size]]
                if cf is not None:
                    ims = [blank_or_noise_image(cf, im.size, rng) for im in ims]
                enc = encode_left_padded(processor, model, prompts, ims)
            probs = torch.softmax(next_token_logits(model, enc), dim=-1).cpu().double().numpy()
            rows.append(reader(probs) if reader is not None else label_scores(probs, groups))
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, len(groups)))


@dataclass
class ClosedSetScores:
    """First-token label masses of a closed-set eval: real input and each content-free input."""
    labels: list[str]
    groups: list[list[int]]
    p_raw: np.ndarray                                   # [N, K] real image
    p_cf_raw: dict = field(default_factory=dict)        # name -> [N, K]

    @property
    def p(self) -> np.ndarray:
        return normalise(self.p_raw)

    @property
    def label_mass(self) -> np.ndarray:
        """How much of the first-token probability the label set covers, per question."""
        return self.p_raw.sum(axis=1)


def score_closed_set(model, processor, images: Sequence, questions: Sequence[str], labels: Sequence[str], *,
                     cf_inputs: Iterable[str] = CALIBRATION_INPUTS, batch_size: int = 16, seed: int = 0,
                     merge_variants: bool = True, label_top_k: int = 0) -> ClosedSetScores:
    """Label masses for the real (image, question) pairs and for every content-free input.

    label_top_k = 0: each label's first tokens (`label_token_groups`, variants merged or not);
    k > 0: the authors' rule, the exact label token among the top k (`top_k_label_probs`).
    """
    labels = list(labels)
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    if label_top_k < 0:
        raise ValueError(f"label_top_k must be >= 0, got {label_top_k}")
    reader = None
    if label_top_k:
        index = label_token_index(processor.tokenizer, labels)
        groups = [sorted(t for t, k in index.items() if k == j) for j in range(len(labels))]
        missing = [lab for lab, g in zip(labels, groups) if not g]
        if missing:
            raise ValueError(f"labels {missing} are no single token of this vocabulary: the top-k exact-token rule "
                             f"cannot score them (use label_top_k=0, the summed first tokens)")
        reader = lambda probs: top_k_label_probs(probs, index, len(labels), label_top_k)  # noqa: E731
    else:
        groups = label_token_groups(processor.tokenizer, labels, merge_variants)
    model.eval()
    p_raw = first_token_label_probs(model, processor, questions, groups, images=images, batch_size=batch_size,
                                    reader=reader)
    scores = ClosedSetScores(labels, groups, p_raw)
    for cf in cf_inputs:
        scores.p_cf_raw[cf] = first_token_label_probs(model, processor, questions, groups, images=images, cf=cf,
                                                      batch_size=batch_size, seed=seed, reader=reader)
        log.info("content-free '%s': mean p_cf %s", cf,
                 dict(zip(labels, np.round(normalise(scores.p_cf_raw[cf]).mean(axis=0), 3).tolist())))
    return scores


def calibrated_predictions(scores: ClosedSetScores, *, cf_inputs: Iterable[str] | None = None,
                           mode: str = "diag", per_sample: bool = True, combine: str = "mean",
                           epsilon: float = 0.0) -> dict:
    """{"q", "p_cf", "pred", "pred_uncalibrated"} for a subset of the scored content-free inputs."""
    names = list(cf_inputs) if cf_inputs is not None else list(scores.p_cf_raw)
    missing = [n for n in names if n not in scores.p_cf_raw]
    if missing:
        raise ValueError(f"content-free inputs {missing} were not scored (have {list(scores.p_cf_raw)})")
    p_cf = content_free_estimate([scores.p_cf_raw[n] for n in names], per_sample=per_sample, combine=combine,
                                 epsilon=epsilon)
    q = calibrate(scores.p_raw, p_cf, mode)
    return {"q": q, "p_cf": p_cf, "pred": predict(q, scores.labels),
            "pred_uncalibrated": predict(scores.p, scores.labels)}


# ---------------------------------------------------------------------------------------------
# Files and metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class ClosedSet:
    """A closed-set eval file read into questions, images, gold labels and the label set."""
    kind: str                     # "pope" or "mc"
    records: list[dict]
    images: list[Path]
    questions: list[str]
    gold: list[str]
    labels: list[str]


def _gold_label(answer, labels: Sequence[str], where: str) -> str:
    a = str(answer).strip()
    for lab in labels:
        if a.lower() == lab.lower():
            return lab
    raise ValueError(f"{where}: answer {answer!r} is not one of the labels {list(labels)}")


def load_closed_set(path: str | Path, kind: str = "pope", *, image_root: str | Path | None = None,
                    labels: str | Sequence[str] | None = None, suffix: str | None = None,
                    limit: int | None = None) -> ClosedSet:
    """Read a POPE file or a multiple-choice file.

    POPE (kind='pope'): ``{question_id, image, text, label: yes|no, category?}``; labels yes/no.
    Multiple choice (kind='mc'): ``{question_id, image, text, answer, options?, labels?, category?}``.
    ``options`` (a list, or a dict letter -> text) is appended to the question as lettered lines
    ("A. ...") followed by `suffix` (default LLaVA's "Answer with the option's letter from the given
    choices directly."); the labels are then the letters. Without options the labels are the
    record's ``labels``, else `labels` (default A-D). ``answer`` is the gold label.
    Image paths are relative to `image_root`, else to the file's folder.
    """
    from csr.data import read_raw_records, record_image_paths

    path = Path(path)
    recs = read_raw_records(path)[:limit]
    if not recs:
        raise ValueError(f"{path}: no records")
    images = record_image_paths(recs, path, image_root)
    if kind == "pope":
        lab = resolve_labels(labels or "yesno")
        qs = [(r["text"] + (" " + suffix if suffix else "")).strip() for r in recs]
        gold = [_gold_label(r["label"], lab, f"{path}:{i + 1}") for i, r in enumerate(recs)]
        return ClosedSet("pope", recs, images, qs, gold, lab)
    if kind != "mc":
        raise ValueError(f"unknown closed-set kind {kind!r} (pope, mc)")
    default = resolve_labels(labels or "letters")
    qs, gold, sets = [], [], []
    for i, r in enumerate(recs):
        opts = r.get("options")
        if opts:
            items = list(opts.items()) if isinstance(opts, dict) else list(zip(string.ascii_uppercase, opts))
            lab = [str(k) for k, _ in items]
            q = r["text"].rstrip() + "\n" + "\n".join(f"{k}. {v}" for k, v in items)
            sfx = MC_SUFFIX if suffix is None else suffix
            q = (q + ("\n" + sfx if sfx else "")).strip()
        else:
            lab = resolve_labels(r["labels"]) if r.get("labels") else default
            q = (r["text"] + (" " + suffix if suffix else "")).strip()
        qs.append(q)
        sets.append(tuple(lab))
        gold.append(_gold_label(r["answer"], lab, f"{path}:{i + 1}"))
    if len(set(sets)) != 1:
        raise ValueError(f"{path}: records use different label sets {sorted(set(sets))}; "
                         f"calibrate files with one label set at a time")
    return ClosedSet("mc", recs, images, qs, gold, list(sets[0]))


def closed_set_metrics(data: ClosedSet, preds: Sequence[str]) -> dict:
    """POPE: `csr.eval.pope.score_pope` (per category and "all"; accuracy, F1, yes-ratio, ...).
    Multiple choice: accuracy and each label's share of the predictions, per category and "all"."""
    if data.kind == "pope":
        from csr.eval.pope import score_pope

        return score_pope(data.records, [p.lower() for p in preds])
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(data.records):
        if r.get("category"):
            groups.setdefault(str(r["category"]), []).append(i)
    groups["all"] = list(range(len(preds)))
    out = {}
    for cat, idx in groups.items():
        n = len(idx)
        out[cat] = {"accuracy": sum(preds[i] == data.gold[i] for i in idx) / n if n else 0.0,
                    "pred_ratio": {lab: sum(preds[i] == lab for i in idx) / n if n else 0.0
                                   for lab in data.labels},
                    "n": n}
    return out


def evaluate_calibration(scores: ClosedSetScores, data: ClosedSet, *, cf_inputs: Sequence[str],
                         mode: str = "diag", per_sample: bool = True, grid: bool = True, combine: str = "mean",
                         epsilon: float = 0.0) -> dict:
    """Metrics before (first-token arg-max) and after calibration with the chosen settings; with
    `grid`, also every single content-free input and all of them, under both modes and both p_cf
    estimates (with the chosen `combine` and `epsilon`)."""
    cal = {"combine": combine, "epsilon": epsilon}
    chosen = calibrated_predictions(scores, cf_inputs=cf_inputs, mode=mode, per_sample=per_sample, **cal)
    out = {"labels": scores.labels,
           "label_tokens": {lab: g for lab, g in zip(scores.labels, scores.groups)},
           "label_mass_mean": float(scores.label_mass.mean()) if len(scores.label_mass) else 0.0,
           "settings": {"cf": list(cf_inputs), "mode": mode, "per_sample": per_sample, **cal},
           "rows_without_label_mass": int((scores.label_mass <= 0).sum()),
           "uncalibrated": closed_set_metrics(data, chosen["pred_uncalibrated"]),
           "calibrated": closed_set_metrics(data, chosen["pred"]),
           "p_cf_mean": dict(zip(scores.labels, chosen["p_cf"].mean(axis=0).round(4).tolist()))}
    if grid:
        rows = {}
        subsets = [[n] for n in scores.p_cf_raw] + ([list(scores.p_cf_raw)] if len(scores.p_cf_raw) > 1 else [])
        for subset in subsets:
            for m in MODES:
                for ps in (True, False):
                    r = calibrated_predictions(scores, cf_inputs=subset, mode=m, per_sample=ps, **cal)
                    name = f"{'+'.join(subset)}|{m}|{'per-sample' if ps else 'dataset-mean'}"
                    rows[name] = closed_set_metrics(data, r["pred"])["all"]
        out["grid"] = rows
    return out


def calibrate_file(model, processor, path: str | Path, kind: str = "pope", *, out_dir: str | Path | None = None,
                   image_root: str | Path | None = None, labels: str | Sequence[str] | None = None,
                   suffix: str | None = None, limit: int | None = None,
                   cf_inputs: Sequence[str] = CALIBRATION_INPUTS, mode: str = "diag", per_sample: bool = True,
                   batch_size: int = 16, seed: int = 0, merge_variants: bool = True, grid: bool = True,
                   combine: str = "mean", epsilon: float = 0.0, label_top_k: int = 0) -> dict:
    """Calibrated closed-set evaluation of a POPE (kind='pope') or multiple-choice (kind='mc') file.

    The one-call API behind ``csr debias calibrate`` (and for ``csr eval`` with calibration on):
    returns `evaluate_calibration`'s metrics plus the file, its kind and size; with `out_dir`,
    also writes ``label_probs.jsonl`` (per question: p, label mass, each content-free p_cf, q, the
    predictions before and after).
    """
    from csr.io import write_jsonl

    cf_inputs = list(cf_inputs)
    bad = [x for x in cf_inputs if x not in CALIBRATION_INPUTS]
    if bad or not cf_inputs:
        raise ValueError(f"content-free inputs must be a non-empty subset of {CALIBRATION_INPUTS}, got {cf_inputs}")
    data = load_closed_set(path, kind, image_root=image_root, labels=labels, suffix=suffix, limit=limit)
    scores = score_closed_set(model, processor, data.images, data.questions, data.labels, cf_inputs=cf_inputs,
                              batch_size=batch_size, seed=seed, merge_variants=merge_variants, label_top_k=label_top_k)
    result = {"file": str(path), "kind": kind, "n": len(data.questions),
              "label_token": f"exact among top {label_top_k}" if label_top_k else
              ("variants summed" if merge_variants else "first token of the label as given"),
              "suffix": suffix or "",
              **evaluate_calibration(scores, data, cf_inputs=cf_inputs, mode=mode, per_sample=per_sample, grid=grid,
                                     combine=combine, epsilon=epsilon)}
    if out_dir is not None:
        chosen = calibrated_predictions(scores, cf_inputs=cf_inputs, mode=mode, per_sample=per_sample,
                                        combine=combine, epsilon=epsilon)
        p, labs = scores.p, data.labels

        def row(x):
            return dict(zip(labs, np.round(x, 6).tolist()))

        write_jsonl(Path(out_dir) / "label_probs.jsonl", [
            {"question_id": r.get("question_id"), "category": r.get("category"), "gold": g, "p": row(p[i]),
             "label_mass": round(float(scores.label_mass[i]), 6),
             "p_cf": {name: row(normalise(t[i])) for name, t in scores.p_cf_raw.items()},
             "q": row(chosen["q"][i]), "pred_uncalibrated": chosen["pred_uncalibrated"][i], "pred": chosen["pred"][i]}
            for i, (r, g) in enumerate(zip(data.records, data.gold))])
    return result
