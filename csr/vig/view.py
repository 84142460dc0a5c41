"""Views of VIG scores: a histogram of sample VIG (PNG) and one sample's per-token VIG as a heat map
(self-contained HTML, or ANSI colours in a terminal).

Colours: a diverging scale centred on 0. Green: the image made the token more likely (VIG_t > 0);
red: less likely (VIG_t < 0); white: no difference. With a threshold τ, tokens below it (masked in
VIG-selective training) are struck through.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence


def histogram_png(sample_vigs: Sequence[float], path: str | Path, *, tau: float | None = None,
                  bins: int = 40, title: str = "sample VIG", keep_percent: float | None = None) -> Path:
    """Write a histogram of sample VIG (with τ marked) to `path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csr.io import atomic_savefig

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = [float(v) for v in sample_vigs]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
    ax.axvline(0.0, color="#888888", lw=1)
    if tau is not None and math.isfinite(tau):
        label = f"τ = {tau:.3f}" + (f" (keep top {keep_percent:g}%)" if keep_percent is not None else "")
        ax.axvline(tau, color="#c44e52", lw=1.5, ls="--", label=label)
        ax.legend(loc="upper right", fontsize=8)
    mean = sum(values) / len(values) if values else float("nan")
    ax.set_title(f"{title}: n={len(values)}, mean={mean:.3f}", fontsize=10)
    ax.set_xlabel("VIG = mean_t [log p(a_t|I) − log p(a_t|I_cf)]  (nats)")
    ax.set_ylabel("samples")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def _rgb(v: float, scale: float) -> tuple[int, int, int]:
    """Diverging colour for v in [-scale, scale]: red ... white ... green."""
    x = max(-1.0, min(1.0, v / scale)) if scale > 0 else 0.0
    if x >= 0:
        return (int(255 - 155 * x), int(255 - 55 * x), int(255 - 155 * x))
    x = -x
    return (int(255 - 35 * x), int(255 - 155 * x), int(255 - 155 * x))


def _scale(values: Sequence[float]) -> float:
    m = max((abs(float(v)) for v in values), default=0.0)
    return m if m > 0 else 1.0


def heatmap_html(record: dict, path: str | Path | None = None, *, tau: float | None = None,
                 scale: float | None = None) -> str:
    """Self-contained HTML of one scored sample: each answer token coloured by its VIG_t.

    `record` is a line of `vig.jsonl` (tokens, vig_tokens, logp_image, logp_cf, prompt, vig).
    Hovering a token shows VIG_t and both log-probs. Writes to `path` when given; returns the HTML.
    """
    toks, vigs = record["tokens"], record["vig_tokens"]
    lpi, lpc = record.get("logp_image", [None] * len(toks)), record.get("logp_cf", [None] * len(toks))
    s = scale or _scale(vigs)
    spans = []
    for t, v, a, b in zip(toks, vigs, lpi, lpc):
        r, g, bl = _rgb(v, s)
        tip = f"VIG_t={v:+.4f}" + (f"  log p(I)={a:.4f}  log p(I_cf)={b:.4f}" if a is not None else "")
        style = f"background:rgb({r},{g},{bl})"
        if tau is not None and v < tau:
            style += ";text-decoration:line-through;opacity:0.7"
        spans.append(f'<span class="t" style="{style}" title="{html.escape(tip)}">'
                     f"{html.escape(t).replace(chr(10), '↵<br>') or '&nbsp;'}</span>")
    legend = "".join(f'<span class="t" style="background:rgb{_rgb(x * s, s)}">{x * s:+.2f}</span>'
                     for x in (-1, -0.5, 0, 0.5, 1))
    tau_line = (f"<p>τ = {tau:.4f}: struck-through tokens (VIG_t &lt; τ) are masked in selective training; "
                f"{sum(v >= tau for v in vigs)}/{len(vigs)} supervised.</p>" if tau is not None else "")
    img = record.get("image", "")
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>VIG {html.escape(str(record.get('id', '')))}</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.9}}
.t{{font-family:monospace;white-space:pre;padding:2px 0;border-radius:2px}}
.meta{{color:#555;font-size:90%}}</style></head><body>
<h3>Per-token VIG: sample {html.escape(str(record.get('id', '')))}</h3>
<p class="meta">image: {html.escape(str(img))}<br>prompt: {html.escape(str(record.get('prompt', '')))}<br>
sample VIG = {record.get('vig', float('nan')):+.4f} nats over {len(vigs)} tokens
(PPL with image {record.get('ppl_image', float('nan')):.3f}, content-free {record.get('ppl_cf', float('nan')):.3f})</p>
{tau_line}<p>{''.join(spans)}</p>
<p class="meta">scale: {legend} (green: the image helps; red: it hurts)</p>
</body></html>
"""
    if path is not None:
        from csr.io import atomic_write_text

        atomic_write_text(path, doc)
    return doc


def heatmap_terminal(record: dict, *, tau: float | None = None, scale: float | None = None,
                     color: bool = True) -> str:
    """One sample's tokens with ANSI 24-bit background colours by VIG_t (plain `[token|+0.12]` without colour)."""
    toks, vigs = record["tokens"], record["vig_tokens"]
    s = scale or _scale(vigs)
    parts = []
    for t, v in zip(toks, vigs):
        shown = t.replace("\n", "\\n")
        if color:
            r, g, b = _rgb(v, s)
            strike = "\x1b[9m" if tau is not None and v < tau else ""
            parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{strike}{shown}\x1b[0m")
        else:
            mark = "x" if tau is not None and v < tau else ""
            parts.append(f"[{shown}|{v:+.2f}{mark}]")
    head = (f"sample {record.get('id', '')}: VIG = {record.get('vig', float('nan')):+.4f} over {len(vigs)} tokens"
            + (f", τ = {tau:.4f}" if tau is not None else ""))
    return head + "\n" + "".join(parts)
