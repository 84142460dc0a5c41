"""Closed-set evaluation files and their metrics before and after calibration: POPE (yes/no) and
multiple-choice files read into questions, images and gold labels; accuracy (and POPE's F1 and
yes-ratio) per category; `calibrate_file`, the one call behind ``csr debias calibrate`` and
``csr eval --calibrate`` (`csr.debias.label_probs` scores, `csr.debias.calibration` calibrates).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from csr.content_free import CALIBRATION_INPUTS
from csr.debias.calibration import MODES, normalise, resolve_labels
from csr.debias.label_probs import ClosedSetScores, calibrated_predictions, score_closed_set

# LLaVA's multiple-choice instruction (MMBench / ScienceQA evaluation prompts).
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


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
