"""Why CSR does or does not reduce hallucination on the grounded world: the numbers behind
docs/results/world.md, from a world folder and a finished `csr run` folder. The command line is
scripts/world_diagnostics.py:

    python scripts/world_diagnostics.py clip   [--world data/world] [--clip DIR]
    python scripts/world_diagnostics.py pairs  --run data/runs/world [--world data/world]
    python scripts/world_diagnostics.py causes --captions DIR/chair_captions.jsonl [--world data/world]
    python scripts/world_diagnostics.py greedy --model DIR [--world data/world]
    python scripts/world_diagnostics.py pope   --answers DIR/pope_answers.jsonl [--base BASE/pope_answers.jsonl]
    python scripts/world_diagnostics.py scores --probs DIR/label_probs.jsonl [--base BASE/label_probs.jsonl] [--plot PNG]
    python scripts/world_diagnostics.py yesno  --run DIR [--world data/world]   (a run with yesno.enabled)

- clip:   the judge's shape accuracy. For each object of the CSR prompt images, CLIP ranks the 8
          sentences "A <colour> <shape> is at the <position>." that differ only in the shape;
          top-1 accuracy for tiny objects and for normal ones.
- pairs:  pair quality per round, against the prompt images' ground truth: CHAIR of the chosen and
          rejected responses, of the best-reward path and of the oracle path (fewest hallucinated
          objects among a tree's candidates), and the ROC-AUC of each reward term for telling a
          sentence with a correct shape from one naming an absent shape.
- causes: for a caption file written by `csr eval --chair` (or `csr world --eval`), where each
          hallucinated object comes from: the co-occurrence partner of a present shape (the
          language prior the biased training split teaches) or another shape, and whether the
          sentence's position holds a tiny object.
- greedy: CHAIR of a model's greedy captions on the CSR prompt images (the images the pairs come
          from), to set beside the chosen responses of `pairs`.
- pope:   for an answer file written by `csr eval --pope`, the error rate in each cell of
          (label) x (is the queried shape's co-occurrence partner in the image?). A model that
          answers from the prior errs where the partner's presence and the label disagree.
          With --base (another answer file on the same questions), also the change of each POPE
          metric from base to answers, with a paired-bootstrap 95% interval.
- scores: the yes/no channel without a threshold, from the first-token p(yes) that
          `csr debias calibrate --pope` writes (label_probs.jsonl): ROC-AUC of p(yes) for the label,
          the best F1 over thresholds, and F1 at a fixed yes-ratio. With --base, the AUC change with
          a paired-bootstrap interval and both models' F1 at the base model's yes-ratio, which
          separates a moved threshold from lost discrimination. --plot draws F1 by yes-ratio.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=\.)\s+")  # world sentences end with '.'
SMALL_RADIUS = 4.0  # px at 32 px images: objects drawn tiny have radius 1.9-3.2, normal ones 4.8-6.7


def _auc_resampled(scores, truth, idx):
    """ROC-AUC of `scores` for `truth` on each row of resample indices `idx` (ties counted half)."""
    import numpy as np

    s, t = scores[idx], truth[idx]
    n = idx.shape[1]
    order = np.argsort(s, axis=1, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=1)
    ranks = np.empty(s.shape)
    for row in range(len(idx)):  # average ranks of ties, one resample at a time
        _, first, counts = np.unique(s_sorted[row], return_index=True, return_counts=True)
        ranks[row, order[row]] = np.repeat(first + (counts + 1) / 2, counts)
    n_pos = t.sum(axis=1)
    n_neg = n - n_pos
    return ((ranks * t).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    import numpy as np

    scores = np.concatenate([np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)])
    truth = np.arange(len(scores)) < len(pos)
    return float(_auc_resampled(scores, truth, np.arange(len(scores))[None])[0])


def clip_accuracy(world: Path, clip_dir: Path) -> dict:
    from csr.data import load_image, resolve_image_path
    from csr.io import read_jsonl
    from csr.score.clip import load_clip
    from csr.world.generate import SHAPES

    clip = load_clip("open_clip", str(clip_dir), "", device="cpu")
    images, texts, truth, small = [], [], [], []
    for scene in read_jsonl(world / "train" / "prompt_scenes.jsonl"):
        image = load_image(resolve_image_path(scene["image"], world / "train", allow_absolute=True, resolve=False))
        for o in scene["objects"]:
            images.append(image)
            texts.append([f"A {o['color']} {s} is at the {o['position']}." for s in SHAPES])
            truth.append(SHAPES.index(o["shape"]))
            small.append(o["size"] < SMALL_RADIUS)
    scores = clip.scores_many(images, texts)
    hit = [max(range(len(s)), key=s.__getitem__) == t for s, t in zip(scores, truth)]
    tiny = [h for h, s in zip(hit, small) if s]
    normal = [h for h, s in zip(hit, small) if not s]
    return {"clip": str(clip_dir), "top1_tiny": sum(tiny) / len(tiny) if tiny else None, "n_tiny": len(tiny),
            "top1_normal": sum(normal) / len(normal) if normal else None, "n_normal": len(normal)}


def prompt_truth(world: Path) -> dict[str, list[str]]:
    """The shapes in each CSR prompt image, by prompt id."""
    from csr.io import read_jsonl

    return {r["id"]: [o["shape"] for o in r["objects"]] for r in read_jsonl(world / "train" / "prompt_scenes.jsonl")}


def pairs_chair(pairs: list[dict], truth: dict[str, list[str]], table) -> dict:
    """The number of pairs and CHAIR_I, CHAIR_S, recall and mean sentence count of their chosen and of
    their rejected responses."""
    from csr.data import message_text
    from csr.eval.chair import chair_metrics

    gts = [truth[p["id"]] for p in pairs]
    row = {"pairs": len(pairs)}
    for side in ("chosen", "rejected"):
        texts = [message_text(p[side]) for p in pairs]
        m = chair_metrics(texts, gts, table)
        row[f"{side}_chair_i"], row[f"{side}_chair_s"], row[f"{side}_recall"] = m["chair_i"], m["chair_s"], m["recall"]
        row[f"{side}_sentences"] = sum(len(SENTENCE_END.split(t.strip())) for t in texts) / max(len(texts), 1)
    return row


def pair_quality(world: Path, run: Path, rounds: list[int] | None = None) -> list[dict]:
    """Pair quality of every round of `run` (or of `rounds` only), one row a round."""
    from csr.config import PairsConfig
    from csr.eval.chair import caption_report, chair_metrics, load_synonyms
    from csr.io import read_jsonl
    from csr.pairs import candidate_paths

    table = load_synonyms(world / "test" / "synonyms.json")
    truth = prompt_truth(world)
    cfg = PairsConfig()
    rows = []
    for rnd in sorted(run.glob("round_*"), key=lambda p: int(p.name.split("_")[1])):
        if rounds is not None and int(rnd.name.split("_")[1]) not in rounds:
            continue
        pairs_file, scored_file = rnd / "pairs" / "pairs.jsonl", rnd / "score" / "scored.jsonl"
        if not pairs_file.is_file() or not scored_file.is_file():
            continue
        row = {"round": rnd.name, **pairs_chair(read_jsonl(pairs_file), truth, table)}
        best, oracle, oracle_gts = [], [], []
        terms = {"clip": ([], []), "self_reward": ([], []), "reward": ([], [])}
        for tree in read_jsonl(scored_file):
            gt = truth[tree["id"]]
            paths = candidate_paths(tree["nodes"], cfg)
            if len(paths) >= 2:
                reports = [caption_report(p.response, gt, table) for p in paths]
                k = min(range(len(paths)), key=lambda i: (len(reports[i]["hallucinated"]), -len(reports[i]["covered"])))
                oracle.append(paths[k].response)
                best.append(max(paths, key=lambda p: p.score).response)
                oracle_gts.append(gt)
            for node in tree["nodes"]:
                if node.get("parent") is None or node.get("reward") is None:  # the root, or cleaned away
                    continue
                rep = caption_report(node["text"], gt, table)
                if rep["mentions"]:
                    for name, (ok, bad) in terms.items():
                        (bad if rep["hallucinated"] else ok).append(node[name])
        for name, caps in (("best_reward", best), ("oracle", oracle)):
            m = chair_metrics(caps, oracle_gts, table)
            row[f"{name}_chair_i"], row[f"{name}_recall"] = m["chair_i"], m["recall"]
        for name, (ok, bad) in terms.items():
            row[f"auc_{name}"] = _auc(ok, bad) if ok and bad else None
        rows.append(row)
    return rows


def hallucination_causes(world: Path, captions: Path) -> dict:
    from csr.io import read_jsonl

    vocab = json.loads((world / "vocab.json").read_text())
    partner = _partner(vocab)
    scenes = {r["id"]: r for r in read_jsonl(world / "test" / "scenes.jsonl")}
    out = {"hallucinated": 0, "partner_of_present": 0, "other_shape": 0, "at_tiny_object": 0,
           "at_normal_object": 0, "at_empty_cell": 0}
    for cap in read_jsonl(captions):
        scene = scenes[cap["id"]]
        present = {o["shape"] for o in scene["objects"]}
        by_position = {o["position"]: o for o in scene["objects"]}
        for sentence in SENTENCE_END.split(cap["caption"]):
            for shape in vocab["shapes"]:
                if shape in present or not re.search(rf"\b{shape}s?\b", sentence):
                    continue
                out["hallucinated"] += 1
                out["partner_of_present" if partner[shape] in present else "other_shape"] += 1
                where = by_position.get(next((p for p in vocab["positions"] if p in sentence), None))
                out["at_empty_cell" if where is None else
                    "at_tiny_object" if where["size"] < SMALL_RADIUS else "at_normal_object"] += 1
    return out


def _partner(vocab: dict) -> dict[str, str]:
    """Each shape's co-occurrence partner, from the world's vocab.json."""
    return {a: b for a, b in vocab["pairs"]} | {b: a for a, b in vocab["pairs"]}


def pope_prior_cells(world: Path, answers: Path) -> dict:
    """POPE errors split by label and by whether the queried shape's partner is present."""
    from csr.io import read_jsonl

    partner = _partner(json.loads((world / "vocab.json").read_text()))
    shapes_in = {r["image"]: {o["shape"] for o in r["objects"]}
                 for r in read_jsonl(world / "test" / "scenes.jsonl")}
    questions = {q["question_id"]: q for q in read_jsonl(world / "test" / "pope.jsonl")}
    cells: dict[str, dict] = {}
    for a in read_jsonl(answers):
        q = questions.get(a["question_id"])
        if q is None:
            raise SystemExit(f"{answers}: question_id {a['question_id']!r} is not in {world}/test/pope.jsonl; "
                             "pass the --world the answers were made on")
        where = "present" if partner[q["object"]] in shapes_in[q["image"]] else "absent"
        cell = cells.setdefault(f"label {q['label']}, partner {where}", {"n": 0, "errors": 0})
        cell["n"] += 1
        cell["errors"] += a["answer"] != q["label"]
    for cell in cells.values():
        cell["error_rate"] = round(cell["errors"] / cell["n"], 3)
    return dict(sorted(cells.items()))


def pope_change(base: Path, answers: Path) -> dict:
    """Each POPE metric's change from `base` to `answers`, with a paired-bootstrap interval."""
    from csr.eval.pope import paired_bootstrap
    from csr.io import read_jsonl

    old = {a["question_id"]: a for a in read_jsonl(base)}
    new = read_jsonl(answers)
    if set(old) != {a["question_id"] for a in new}:
        raise SystemExit(f"{base} and {answers} answer different questions")
    return paired_bootstrap([old[a["question_id"]]["answer"] for a in new], [a["answer"] for a in new],
                            [a["label"] for a in new])


def f1_by_yes_ratio(p_yes, labels: list[str]):
    """F1 when the k questions with the highest p(yes) are answered "yes", for k = 1..n; returns
    (yes-ratios k/n, F1s)."""
    import numpy as np

    s = np.asarray(p_yes, dtype=float)
    truth = np.array([v == "yes" for v in labels])
    if not 0 < truth.sum() < len(truth):
        raise ValueError("scoring p(yes) needs both 'yes' and 'no' labels")
    tp = np.cumsum(truth[np.argsort(-s, kind="stable")])
    k = np.arange(1, len(s) + 1)
    return k / len(s), 2 * tp / (k + truth.sum())


def yes_score_summary(p_yes, labels: list[str], yes_ratio: float) -> dict:
    """Threshold-free view of a yes/no channel: ROC-AUC of p(yes), the best F1 over thresholds, and
    F1 when the `yes_ratio` share of questions with the highest p(yes) are answered "yes"."""
    import numpy as np

    ratios, f1 = f1_by_yes_ratio(p_yes, labels)
    s, truth = np.asarray(p_yes, dtype=float), np.array([v == "yes" for v in labels])
    k = int(round(yes_ratio * len(s)))
    return {"auc": float(_auc(s[truth], s[~truth])), "best_f1": float(f1.max()),
            "f1_at_yes_ratio": float(f1[k - 1]) if k else 0.0, "yes_ratio": k / len(s)}


def plot_f1_by_yes_ratio(curves: dict, out_png: Path) -> None:
    """F1 against the yes-ratio for each {name: (p_yes, labels, greedy yes-ratio)}, each model's
    greedy answers marked: a moved threshold slides along a curve, lost discrimination lowers it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csr.io import atomic_savefig

    greedy_ratios = [greedy for _, _, greedy in curves.values()]
    low, high = max(min(greedy_ratios) - 0.2, 0.0), min(max(greedy_ratios) + 0.2, 1.0)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (p_yes, labels, greedy) in curves.items():
        ratios, f1 = f1_by_yes_ratio(p_yes, labels)
        shown = (ratios >= low) & (ratios <= high)  # the region around the greedy answers
        (line,) = ax.plot(ratios[shown], f1[shown], label=name)
        k = max(int(round(greedy * len(ratios))), 1)
        ax.plot(ratios[k - 1], f1[k - 1], "o", color=line.get_color(), markeredgecolor="black", zorder=3)
    ax.set(title="POPE F1 by the share answered yes (dots: greedy)", xlabel="yes-ratio", ylabel="F1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=110)
    plt.close(fig)


def yes_scores(probs: Path, base: Path | None = None, n_resamples: int = 1000, seed: int = 0,
               plot: Path | None = None) -> dict:
    """`yes_score_summary` of a label_probs.jsonl; with `base`, both at the base's greedy yes-ratio
    and the AUC change with a paired-bootstrap 95% interval. `plot` writes F1 by yes-ratio."""
    import numpy as np

    from csr.eval.bootstrap import interval95, resample_indices
    from csr.io import read_jsonl

    def load(path):
        rows = {r["question_id"]: r for r in read_jsonl(path)}
        if not rows:
            raise SystemExit(f"{path} holds no records")
        return rows

    def columns(rows):
        return (np.array([rows[i]["p"]["yes"] for i in ids]),
                float(np.mean([rows[i]["pred_uncalibrated"] == "yes" for i in ids])))

    new = load(probs)
    ids = sorted(new)
    labels = [new[i]["gold"] for i in ids]
    p_new, ratio_new = columns(new)
    if base is None:
        if plot is not None:
            plot_f1_by_yes_ratio({str(probs.parent.name): (p_new, labels, ratio_new)}, plot)
        return {"probs": yes_score_summary(p_new, labels, ratio_new)}
    old = load(base)
    if set(old) != set(new):
        raise SystemExit(f"{base} and {probs} score different questions")
    p_old, ratio_old = columns(old)
    before, after = yes_score_summary(p_old, labels, ratio_old), yes_score_summary(p_new, labels, ratio_old)
    truth = np.array([v == "yes" for v in labels])
    idx = resample_indices(len(ids), n_resamples, seed)
    delta = _auc_resampled(p_new, truth, idx) - _auc_resampled(p_old, truth, idx)
    if plot is not None:
        plot_f1_by_yes_ratio({f"base ({base.parent.name})": (p_old, labels, ratio_old),
                              str(probs.parent.name): (p_new, labels, ratio_new)}, plot)
    return {"base": before, "probs": after,
            "auc_change": {"delta": after["auc"] - before["auc"], "ci95": interval95(delta)}}


def greedy_chair(world: Path, model: Path) -> dict:
    import tempfile

    from csr.data import resolve_image_path, strip_image_token
    from csr.eval.run import evaluate_model
    from csr.io import read_jsonl, write_jsonl

    questions = {r["id"]: strip_image_token(r["input"])
                 for r in read_jsonl(world / "train" / "prompts.jsonl")}
    records = [{"id": r["id"], "image": str(resolve_image_path(r["image"], world / "train", allow_absolute=True)),
                "objects": [o["shape"] for o in r["objects"]], "prompt": questions[r["id"]]}
               for r in read_jsonl(world / "train" / "prompt_scenes.jsonl")]
    with tempfile.TemporaryDirectory() as tmp:
        chair_file = Path(tmp) / "prompt_chair.jsonl"
        write_jsonl(chair_file, records)
        result = evaluate_model(str(model), None, chair_file, synonyms_path=world / "test" / "synonyms.json")
    return {"model": str(model), **{k: result["chair"][k] for k in ("chair_i", "chair_s", "recall")}}


def yesno_quality(world: Path, run: Path) -> list[dict]:
    """How often each signal of the yes/no stage (csr.yesno) answers its yes/no questions right, per round:
    the reward's choice, the calibrated and raw probabilities, CLIP against its reference; by question source."""
    from csr.io import read_jsonl

    truth = {r["id"]: {o["shape"] for o in r["objects"]} for r in read_jsonl(world / "train" / "prompt_scenes.jsonl")}
    rows = []
    for rnd in sorted(run.glob("round_*"), key=lambda p: int(p.name.split("_")[1])):
        f = rnd / "yesno" / "questions.jsonl"
        if not f.is_file():
            continue
        qs = read_jsonl(f)
        row = {"round": rnd.name, "questions": len(qs)}
        for source in ("all", "named", "prior"):
            sel = [q for q in qs if source == "all" or q["source"] == source]
            if not sel:
                continue
            present = [q["object"] in truth[q["id"]] for q in sel]
            signals = {"reward": [q["reward_yes"] >= q["reward_no"] for q in sel],
                       "calibrated": [q["q_yes"] >= 0.5 for q in sel], "raw": [q["p_yes"] >= 0.5 for q in sel],
                       "clip": [q["clip"] >= q["reference"] for q in sel]}
            row[f"{source}_n"], row[f"{source}_present"] = len(sel), sum(present) / len(sel)
            for name, says_yes in signals.items():
                row[f"{source}_acc_{name}"] = sum(a == b for a, b in zip(says_yes, present)) / len(sel)
            kept = [(q["reward_yes"] >= q["reward_no"]) == t for q, t in zip(sel, present) if q["kept"]]
            row[f"{source}_kept_acc"] = sum(kept) / len(kept) if kept else None
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("clip", "pairs", "causes", "greedy", "pope", "scores", "yesno"))
    p.add_argument("--world", default="data/world", type=Path)
    p.add_argument("--clip", type=Path, help="open_clip folder (default: <world>/models/clip)")
    p.add_argument("--run", type=Path, help="a `csr run` output folder (for pairs, yesno)")
    p.add_argument("--captions", type=Path, help="chair_captions.jsonl (for causes)")
    p.add_argument("--model", type=Path, help="a model folder (for greedy)")
    p.add_argument("--answers", type=Path, help="pope_answers.jsonl (for pope)")
    p.add_argument("--probs", type=Path, help="label_probs.jsonl from `csr debias calibrate --pope` (for scores)")
    p.add_argument("--plot", type=Path, help="PNG of F1 by yes-ratio (for scores)")
    p.add_argument("--base", type=Path, help="the base model's file of the same kind, to compare with "
                                             "(pope: pope_answers.jsonl; scores: label_probs.jsonl)")
    args = p.parse_args(argv)
    if args.what == "clip":
        result = clip_accuracy(args.world, args.clip or args.world / "models" / "clip")
    elif args.what == "pairs":
        if args.run is None:
            p.error("pairs needs --run")
        result = pair_quality(args.world, args.run)
    elif args.what == "yesno":
        if args.run is None:
            p.error("yesno needs --run")
        result = yesno_quality(args.world, args.run)
    elif args.what == "greedy":
        if args.model is None:
            p.error("greedy needs --model")
        result = greedy_chair(args.world, args.model)
    elif args.what == "pope":
        if args.answers is None:
            p.error("pope needs --answers")
        result = {"cells": pope_prior_cells(args.world, args.answers)}
        if args.base is not None:
            result["change_from_base"] = pope_change(args.base, args.answers)
    elif args.what == "scores":
        if args.probs is None:
            p.error("scores needs --probs")
        result = yes_scores(args.probs, args.base, plot=args.plot)
    else:
        if args.captions is None:
            p.error("causes needs --captions")
        result = hallucination_causes(args.world, args.captions)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
