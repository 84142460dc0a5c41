"""Print the plain-vs-VIG instruction-tuning table of docs/results/vig.md from finished run folders.

    python scripts/vig_compare_table.py data/world-vig/s0 data/world-vig/s1 ...

Each folder holds aligned/ (with eval/), vig_blur/, it_none/, it_vig/, eval_none/, eval_vig/, as
scripts/vig_world_compare.sh writes them. A second table gives, per kind of answer word, the mean
VIG_t and the share of its tokens supervised inside kept samples, and how many POPE answers of each
kind the VIG arm keeps.
"""

import json
import sys
from pathlib import Path


def _metrics(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    return {"chair_s": m["chair"]["chair_s"], "chair_i": m["chair"]["chair_i"], "recall": m["chair"]["recall"],
            "words": m["chair"]["words_per_caption"], "pope_acc": m["pope"]["all"]["accuracy"],
            "pope_f1": m["pope"]["all"]["f1"], "yes": m["pope"]["all"]["yes_ratio"]}


def rows(run: Path) -> list[tuple]:
    out = [(run.name, "aligned (start)", "-", "-", "-", _metrics(run / "aligned" / "eval"))]
    done = {arm: json.loads((run / f"it_{arm}" / "DONE.json").read_text()) for arm in ("none", "vig")}
    for arm, name in (("none", "plain IT"), ("vig", "VIG-selective IT")):
        d = done[arm]
        sel, tr = d["selection"], d["training"]
        out.append((run.name, name, f"{sel['samples_kept']}", f"{tr['supervised_tokens_seen']:,}",
                    f"{tr['steps']} ({tr['passes_per_kept_sample']:.0f} passes)", _metrics(run / f"eval_{arm}")))
    return out


def kinds(run: Path) -> dict:
    """Per kind of answer word: mean VIG_t, and the share supervised inside kept samples; POPE answers kept."""
    from csr.vig.maths import plan_records_selection
    from csr.vig.score import read_scores
    from csr.world.generate import COLORS, SHAPES

    recs = read_scores(run / "vig_blur")
    sel = plan_records_selection(recs, 70.0)
    vig, total, sup = {}, {}, {}
    for r, kept, mask in zip(recs, sel.kept, sel.masks):
        for j, (tok, v) in enumerate(zip(r["tokens"], r["vig_tokens"])):
            w = tok.strip().lower().strip(".,")
            k = ("shape" if w in SHAPES else "colour" if w in COLORS else
                 "position" if w in ("top", "bottom", "left", "right") else "yes/no" if w in ("yes", "no") else "other")
            vig.setdefault(k, []).append(v)
            if kept:
                total[k] = total.get(k, 0) + 1
                sup[k] = sup.get(k, 0) + int(mask[j])
    pope = {a: (sum(1 for r, kp in zip(recs, sel.kept) if kp and r.get("kind") == "pope" and r["answer"].startswith(a)),
                sum(1 for r in recs if r.get("kind") == "pope" and r["answer"].startswith(a))) for a in ("Yes", "No")}
    return {k: (sum(v) / len(v), sup.get(k, 0) / total[k] if total.get(k) else 0.0) for k, v in vig.items()} | \
        {"pope_kept": pope, "tau": sel.tau}


def main(argv) -> int:
    print("| seed | model | samples | supervised tokens seen | steps | CHAIR_S | CHAIR_I | recall | words | "
          "POPE acc | POPE F1 | yes-ratio |")
    print("|" + "---|" * 12)
    for run in map(Path, argv):
        base = None
        for seed, name, n, tok, steps, m in rows(run):
            if name == "plain IT":
                base = int(tok.replace(",", ""))
            if name == "VIG-selective IT" and base:
                tok = f"{tok} ({int(tok.replace(',', '')) / base - 1:+.0%})"
            print(f"| {seed} | {name} | {n} | {tok} | {steps} | {m['chair_s']:.3f} | {m['chair_i']:.3f} | "
                  f"{m['recall']:.3f} | {m['words']:.1f} | {m['pope_acc']:.3f} | {m['pope_f1']:.3f} | {m['yes']:.3f} |")
    print("\n| seed | τ | shape | colour | position | yes/no | other | POPE 'Yes' kept | POPE 'No' kept |")
    print("|" + "---|" * 9)
    for run in map(Path, argv):
        k = kinds(run)
        cells = " | ".join(f"{k[w][0]:.3f} / {k[w][1]:.0%}" for w in ("shape", "colour", "position", "yes/no", "other"))
        (yk, yn), (nk, nn) = k["pope_kept"]["Yes"], k["pope_kept"]["No"]
        print(f"| {run.name} | {k['tau']:.4f} | {cells} | {yk}/{yn} | {nk}/{nn} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
