"""Print the plain-vs-VIG instruction-tuning table of docs/results/vig.md from finished run folders.

    python scripts/vig_compare_table.py data/world-vig/s0 data/world-vig/s1 ...

Each folder holds aligned/ (with eval/), vig_blur/, it_none/, it_vig/, eval_none/, eval_vig/, as
scripts/vig_world_compare.sh writes them.
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
