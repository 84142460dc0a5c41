"""The run report: a Markdown table per round and a PNG of the metrics across rounds."""

from __future__ import annotations

from pathlib import Path

from csr.io import atomic_savefig, atomic_write_text

# (column title, dotted key in the eval metrics or the pairs summary)
EVAL_COLUMNS = [
    ("CHAIR_S", "chair.chair_s"), ("CHAIR_I", "chair.chair_i"), ("recall", "chair.recall"),
    ("POPE acc", "pope.all.accuracy"), ("POPE F1", "pope.all.f1"),
    ("yes-ratio", "pope.all.yes_ratio"),
]
PAIR_COLUMNS = [("chosen R", "chosen_score_mean"), ("rejected R", "rejected_score_mean"),
                ("margin", "margin_mean"), ("pairs", "pairs")]


def lookup(d: dict | None, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def rows(summary: dict) -> list[dict]:
    """One row per model: round 0 (base) then every round, with eval and pair columns."""
    out = [{"round": 0, **{t: lookup(summary.get("base_eval"), k) for t, k in EVAL_COLUMNS}}]
    for r in summary["rounds"]:
        row = {"round": r["round"], **{t: lookup(r.get("eval"), k) for t, k in EVAL_COLUMNS}}
        row.update({t: lookup(r["stages"].get("pairs"), k) for t, k in PAIR_COLUMNS})
        out.append(row)
    return out


def markdown_table(table: list[dict]) -> str:
    cols = ["round"] + [t for t, _ in EVAL_COLUMNS] + [t for t, _ in PAIR_COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in table]
    return "\n".join(lines)


def plot(table: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in table]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for title in ("CHAIR_S", "CHAIR_I", "recall"):
        ax1.plot(rounds, [r.get(title) for r in table], marker="o", label=title)
    ax1.set(title="Captions (CHAIR: lower is better)", xlabel="round", xticks=rounds)
    for title in ("POPE acc", "POPE F1", "yes-ratio"):
        ax2.plot(rounds, [r.get(title) for r in table], marker="o", label=title)
    ax2.set(title="POPE", xlabel="round", xticks=rounds)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=110)
    plt.close(fig)


def write_report(run_dir: str | Path, summary: dict) -> Path:
    run_dir = Path(run_dir)
    table = rows(summary)
    plot(table, run_dir / "metrics.png")
    text = (f"# CSR run report: {run_dir}\n\nBase model: `{summary['base_model']}`; round 0 is the base "
            f"model.\n\n{markdown_table(table)}\n\n![metrics](metrics.png)\n")
    atomic_write_text(run_dir / "report.md", text)
    return run_dir / "report.md"
