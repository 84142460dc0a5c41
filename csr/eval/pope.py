"""POPE: yes/no object-existence questions, scored the way LLaVA scores them.

A POPE file is JSONL, one question a line: ``{question_id, image, text, label: yes|no}`` plus an
optional ``category`` (random / popular / adversarial; the official POPE release ships one file per
category instead, which also works: records without ``category`` count as ``"all"`` only).

Answer rule (LLaVA's ``eval_pope.py``): keep the text up to the first '.', drop commas, split on
spaces; the answer is "no" if a word is exactly ``No``, ``no`` or ``not``, otherwise "yes". So
"No, there is not." is no, "Yes." and "Nope" are yes, and so is an empty answer.

Metrics treat "yes" as the positive class: accuracy, precision, recall, F1 and yes-ratio (the
share of "yes" answers; 0.5 on a balanced file means no lean either way).
"""

from __future__ import annotations

from collections import defaultdict

CATEGORIES = ("random", "popular", "adversarial")


def parse_yes_no(text: str) -> str:
    """LLaVA's rule: 'no' if the first sentence holds the word No/no/not, else 'yes'."""
    text = text or ""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _normalise_label(label) -> str:
    label = str(label).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
    return label


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Metrics for parsed predictions ('yes'/'no') against labels; 'yes' is positive."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for p, y in zip(predictions, labels):
        p, y = _normalise_label(p), _normalise_label(y)
        if p == "yes":
            tp += y == "yes"
            fp += y == "no"
        else:
            tn += y == "no"
            fn += y == "yes"
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0, "n": n,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope(records: list[dict], answers: list[str]) -> dict:
    """Metrics per category (those present in `records`) and over all ("all").

    `answers` are the model's raw texts in the order of `records`; they are parsed with
    `parse_yes_no`.
    """
    if len(records) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(records)} questions")
    preds = [parse_yes_no(a) for a in answers]
    labels = [r["label"] for r in records]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.get("category"):
            groups[str(r["category"])].append(i)
    out = {}
    for cat in sorted(groups, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else 99, c)):
        idx = groups[cat]
        out[cat] = pope_metrics([preds[i] for i in idx], [labels[i] for i in idx])
    out["all"] = pope_metrics(preds, labels)
    return out



POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _resampled_metrics(pred, truth) -> dict:
    """`pope_metrics`' formulas on arrays: pred, truth are (resamples, n) booleans ('yes' = True)."""
    import numpy as np

    n = truth.shape[1]
    tp, fp, fn = (pred & truth).sum(1), (pred & ~truth).sum(1), (~pred & truth).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / (tp + fp))
        recall = np.nan_to_num(tp / (tp + fn))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"accuracy": (n - fp - fn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n}


def paired_bootstrap(base: list[str], new: list[str], labels: list[str], n_resamples: int = 2000,
                     seed: int = 0) -> dict:
    """Change of each POPE metric from `base` to `new` answers on the same questions, with a 95%
    percentile interval from resampling questions (both answer sets resampled together, so the
    interval reflects only the answers that differ)."""
    import numpy as np

    if not len(base) == len(new) == len(labels):
        raise ValueError(f"{len(base)} base answers, {len(new)} new answers, {len(labels)} labels")
    if not labels:
        raise ValueError("no questions to compare")
    truth, old, cur = (np.array([_normalise_label(v) == "yes" for v in vs]) for vs in (labels, base, new))
    idx = np.random.default_rng(seed).integers(0, len(truth), size=(n_resamples, len(truth)))
    before, after = _resampled_metrics(old[idx], truth[idx]), _resampled_metrics(cur[idx], truth[idx])
    observed_before, observed_after = pope_metrics(base, labels), pope_metrics(new, labels)
    out = {"answers_changed": int((old != cur).sum()), "n": len(truth)}
    for m in POPE_METRICS:
        low, high = np.percentile(after[m] - before[m], [2.5, 97.5])
        out[m] = {"delta": observed_after[m] - observed_before[m], "ci95": [float(low), float(high)]}
    return out
