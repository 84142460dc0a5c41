"""POPE: yes/no object-existence questions, scored the way LLaVA scores them.

A POPE file is JSONL, one question a line: ``{question_id, image, text, label: yes|no}`` plus an
optional ``category`` (random / popular / adversarial; the official POPE release ships one file per
category instead, which also works: records without ``category`` count as ``"all"`` only).

Answer rule (LLaVA's ``eval_pope.py``): keep the text up to the first '.', drop commas, split on
spaces; the answer is "no" if a word is exactly ``No``, ``no`` or ``not``, otherwise "yes". So
"No, there is not." is no, "Yes." and "Nope" are yes, and so is an empty answer.

Metrics treat "yes" as the positive class: accuracy, precision, recall, F1 and yes-ratio (the
share of "yes" answers; 0.5 on a balanced file means no lean either way).

Answers from any tool (`score_pope_files`, ``csr eval --pope-questions Q... --pope-answers A...``):
each official question file is paired with one answer file, either LLaVA's answer JSONL
(``{question_id, text, ...}`` a line, matched by ``question_id``) or plain text (one answer a
line, in question order; a blank line is an empty answer, which the rule reads as "yes").
Questions without an answer are counted (``n_unanswered``), warned about and left out.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

log = logging.getLogger(__name__)

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



# ------------------------------------------------------------------ answers from any tool (no model)


def split_name(path) -> str:
    """'coco_pope_adversarial.json' -> 'adversarial'; any other file: its name without suffix."""
    from pathlib import Path

    stem = Path(path).name.split(".")[0]
    for cat in CATEGORIES:
        if stem.endswith("_" + cat) or stem == cat:
            return cat
    return stem


def read_pope_questions(path) -> list[dict]:
    """An official POPE question file: one JSON a line, ``{question_id, image, text, label}``."""
    from pathlib import Path

    from csr.data import BadInput

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"POPE question file '{path}' does not exist.")
    out, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput("bad_json", f"{path}:{n}: malformed JSON line ({e.msg}); POPE files hold one "
                                       f"{{question_id, image, text, label}} a line.") from None
        if not isinstance(r, dict) or "question_id" not in r or "label" not in r:
            raise BadInput("bad_record", f"{path}:{n}: a question needs question_id and label (yes/no).")
        try:
            r["label"] = _normalise_label(r["label"])
        except ValueError as e:
            raise BadInput("bad_label", f"{path}:{n}: {e}.") from None
        qid = str(r["question_id"])
        if qid in seen:
            raise BadInput("duplicate_id", f"{path}:{n}: question_id {qid} appears twice; give each split its own "
                                           f"file (the official files number 1..3000 each).")
        seen.add(qid)
        out.append(r)
    if not out:
        raise BadInput("no_questions", f"{path}: no questions found.")
    return out


def read_pope_answers(path, questions: list[dict]) -> list[str | None]:
    """The answer text for each question (None: unanswered), from LLaVA's answer JSONL
    (``{question_id, text, ...}`` a line, matched by question_id) or plain text (one answer a line,
    in question order)."""
    from pathlib import Path

    from csr.data import BadInput

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"POPE answer file '{path}' does not exist.")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()                                   # the final newline ends the last answer
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    first = next((ln for ln in lines if ln.strip()), "")
    if not first.lstrip().startswith("{"):            # plain text: one answer a line, in order
        if len(lines) > len(questions):
            raise BadInput("too_many_answers", f"{path}: {len(lines)} answer lines for {len(questions)} questions; "
                                               f"give one answer a line in question order (or LLaVA's JSONL).")
        return lines + [None] * (len(questions) - len(lines))
    index = {str(q["question_id"]): i for i, q in enumerate(questions)}
    out: list[str | None] = [None] * len(questions)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput("bad_json", f"{path}:{n}: malformed JSON line ({e.msg}).") from None
        if not isinstance(r, dict) or "question_id" not in r or not isinstance(r.get("text"), str):
            raise BadInput("bad_record", f"{path}:{n}: an answer needs question_id and text (LLaVA's answer "
                                         f"format), got {line.strip()[:80]}.")
        qid = str(r["question_id"])
        if qid not in index:
            raise BadInput("unknown_question", f"{path}:{n}: question_id {qid} is not in the question file; "
                                               f"pair each answer file with the question file it answers.")
        if out[index[qid]] is not None:
            raise BadInput("duplicate_id", f"{path}:{n}: question_id {qid} is answered twice; keep one answer.")
        out[index[qid]] = r["text"]
    return out


def score_pope_files(question_paths: list, answer_paths: list) -> dict:
    """POPE metrics per split (one question file and its answer file each), pooled ("all") and,
    with several splits, their mean ("mean"). Unanswered questions are left out of the metrics,
    counted (``n_unanswered``) and warned about."""
    from csr.data import BadInput

    if len(question_paths) != len(answer_paths):
        raise BadInput("file_count", f"{len(question_paths)} question files but {len(answer_paths)} answer files: give one "
                         f"answer file per question file, in the same order.")
    out, preds, labels, unanswered = {}, [], [], 0
    for qp, ap in zip(question_paths, answer_paths):
        name = split_name(qp)
        if name in out:
            raise BadInput("duplicate_split", f"two question files name the split '{name}' ({qp}); give each split once.")
        questions = read_pope_questions(qp)
        answers = read_pope_answers(ap, questions)
        done = [(q["label"], parse_yes_no(a)) for q, a in zip(questions, answers) if a is not None]
        missing = len(questions) - len(done)
        if missing:
            log.warning("%s: %d of %d questions of %s are unanswered; they are left out of the metrics",
                        ap, missing, len(questions), qp)
        m = pope_metrics([p for _, p in done], [y for y, _ in done])
        out[name] = {**m, "n_questions": len(questions), "n_unanswered": missing,
                     "questions": str(qp), "answers": str(ap)}
        preds += [p for _, p in done]
        labels += [y for y, _ in done]
        unanswered += missing
    out["all"] = {**pope_metrics(preds, labels), "n_unanswered": unanswered}
    if len(question_paths) > 1:
        splits = [out[split_name(q)] for q in question_paths]
        out["mean"] = {k: sum(s[k] for s in splits) / len(splits) for k in POPE_METRICS}
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

    from csr.eval.bootstrap import interval95, resample_indices

    if not len(base) == len(new) == len(labels):
        raise ValueError(f"{len(base)} base answers, {len(new)} new answers, {len(labels)} labels")
    if not labels:
        raise ValueError("no questions to compare")
    truth, old, cur = (np.array([_normalise_label(v) == "yes" for v in vs]) for vs in (labels, base, new))
    idx = resample_indices(len(truth), n_resamples, seed)
    before, after = _resampled_metrics(old[idx], truth[idx]), _resampled_metrics(cur[idx], truth[idx])
    observed_before, observed_after = pope_metrics(base, labels), pope_metrics(new, labels)
    out = {"answers_changed": int((old != cur).sum()), "n": len(truth)}
    for m in POPE_METRICS:
        out[m] = {"delta": observed_after[m] - observed_before[m], "ci95": interval95(after[m] - before[m])}
    return out
