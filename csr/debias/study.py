"""The decoding study (docs/method.md §2): how far an LVLM's scores move with the decoding settings.

Every setting (greedy, beam search, sampling at several temperatures, top-p and top-k; optional
debias-sampling rows) generates the POPE answers and/or CHAIR captions of an eval set; each is
scored as `csr eval` scores it (`csr.eval.pope.score_pope`, `csr.eval.chair.chair_metrics`). The
greedy row is `csr.eval.run.generate_answers` itself, so it reproduces `csr eval`.

Outputs in ``out_dir``: ``study.json`` (the settings, every row's metrics, and per metric its min,
max, range, mean, standard deviation, the settings at the extremes and the greedy value),
``study.png`` (one panel per metric: each setting's value, the greedy value dashed) and
``texts/<setting>.jsonl`` (the generated texts).

POPE's yes-ratio is reported beside accuracy and F1: part of contrastive decoding's published
POPE gain is a shift toward "yes".
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

POPE_METRICS = ("accuracy", "f1", "yes_ratio", "precision", "recall")
CHAIR_METRICS = ("chair_s", "chair_i", "recall", "words_per_caption")


@dataclass(frozen=True)
class DecodingSetting:
    """One decoding configuration. ``debias`` rows use `csr.debias.sampling.debiased_generate`."""
    name: str
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    seed: int | None = None
    debias: bool = False
    alpha: float = 1.0
    beta: float = 0.1
    cf_mode: str = "none"

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample and self.num_beams == 1 and not self.debias

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate` (every knob explicit: 0 / 1.0 switch one off)."""
        if self.do_sample:
            return {"do_sample": True, "num_beams": 1, "temperature": self.temperature,
                    "top_k": int(self.top_k), "top_p": self.top_p}
        return {"do_sample": False, "num_beams": self.num_beams}


def default_settings(seeds: Sequence[int] = (0,), *, debias: bool = False, alpha: float = 1.0,
                     beta: float = 0.1, cf_mode: str = "none") -> list[DecodingSetting]:
    """Greedy; beam 3 and 5; sampling at T = 0.2 / 0.5 / 1.0; top-p 0.5 / 0.9; top-k 5 / 20 (each
    sampled setting once per seed); with `debias`, debias greedy and debias sampling at T = 1."""
    base = [DecodingSetting("greedy"), DecodingSetting("beam3", num_beams=3), DecodingSetting("beam5", num_beams=5)]
    sampled = [DecodingSetting(f"T{t}", do_sample=True, temperature=t) for t in (0.2, 0.5, 1.0)]
    sampled += [DecodingSetting(f"top_p{p}", do_sample=True, top_p=p) for p in (0.5, 0.9)]
    sampled += [DecodingSetting(f"top_k{k}", do_sample=True, top_k=k) for k in (5, 20)]
    if debias:
        base.append(DecodingSetting(f"debias_a{alpha}_b{beta}", debias=True, alpha=alpha, beta=beta, cf_mode=cf_mode))
        sampled.append(DecodingSetting(f"debias_a{alpha}_b{beta}_T1.0", do_sample=True, debias=True, alpha=alpha,
                                       beta=beta, cf_mode=cf_mode))
    return base + expand_seeds(sampled, seeds)


def expand_seeds(settings: Sequence[DecodingSetting], seeds: Sequence[int]) -> list[DecodingSetting]:
    """Each sampled setting once per seed (named ``<name>@s<seed>`` when there are several)."""
    out = []
    for s in settings:
        if not s.do_sample:
            out.append(s)
            continue
        for seed in seeds:
            out.append(replace(s, seed=seed, name=s.name if len(seeds) == 1 else f"{s.name}@s{seed}"))
    return out


def load_settings(path: str | Path, seeds: Sequence[int] = (0,)) -> list[DecodingSetting]:
    """Settings from a JSON list of objects with `DecodingSetting`'s fields (``name`` required)."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of decoding settings")
    fields = set(DecodingSetting.__dataclass_fields__)
    settings = []
    for i, r in enumerate(raw):
        unknown = set(r) - fields
        if unknown or "name" not in r:
            raise ValueError(f"{path}[{i}]: needs 'name'; unknown keys {sorted(unknown)} (valid: {sorted(fields)})")
        settings.append(DecodingSetting(**r))
    return expand_seeds(settings, seeds)


# ---------------------------------------------------------------------------------------------
# Generation with one setting
# ---------------------------------------------------------------------------------------------


def generate_texts(model, processor, image_paths: Sequence, questions: Sequence[str], setting: DecodingSetting,
                   *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Texts for (image, question) pairs under one decoding setting, in input order.

    Greedy: `csr.eval.run.generate_answers` (exactly what `csr eval` does). Beam and sampling: the
    same batching through `model.generate` with the setting's knobs (sampling seeded by
    ``setting.seed``). Debias rows: `csr.debias.sampling.debiased_generate`.
    """
    import torch

    from csr.eval.run import generate_answers

    if setting.debias:
        from csr.debias.sampling import debiased_generate

        return debiased_generate(model, processor, list(image_paths), list(questions), alpha=setting.alpha,
                                 beta=setting.beta, max_new_tokens=max_new_tokens, do_sample=setting.do_sample,
                                 temperature=setting.temperature, top_k=setting.top_k, top_p=setting.top_p,
                                 cf_mode=setting.cf_mode, batch_size=batch_size, seed=setting.seed)
    if setting.is_greedy:
        return generate_answers(model, processor, list(image_paths), list(questions),
                                max_new_tokens=max_new_tokens, batch_size=batch_size, desc=setting.name)
    from csr.data import load_image
    from csr.models import build_chat_prompt

    if setting.seed is not None:
        torch.manual_seed(setting.seed)
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    texts: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(questions), batch_size):
                qs = questions[start:start + batch_size]
                images = [load_image(p) for p in image_paths[start:start + batch_size]]
                enc = processor(text=[build_chat_prompt(processor, q) for q in qs], images=images, padding=True,
                                return_tensors="pt")
                enc = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in enc.items()}
                out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                     **setting.generate_kwargs())
                texts += [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                              skip_special_tokens=True)]
    finally:
        tok.padding_side = old_side
    return texts


# ---------------------------------------------------------------------------------------------
# Spread and plot
# ---------------------------------------------------------------------------------------------


def flat_metrics(result: dict) -> dict:
    """``pope_<metric>`` (over "all") and ``chair_<metric>`` from one row's results."""
    out = {}
    if "pope" in result:
        out.update({f"pope_{k}": result["pope"]["all"][k] for k in POPE_METRICS})
    if "chair" in result:
        out.update({(k if k.startswith("chair_") else f"chair_{k}"): result["chair"][k] for k in CHAIR_METRICS})
    return out


def spread(rows: Sequence[dict]) -> dict:
    """Per metric over the rows ({"setting", "metrics": {...}}): min, max, range, mean, std (population),
    the settings at the min and max, and the greedy row's value (None when there is none)."""
    names = sorted({k for r in rows for k in r["metrics"]})
    out = {}
    for m in names:
        vals = [(r["setting"]["name"], float(r["metrics"][m])) for r in rows if m in r["metrics"]]
        xs = [v for _, v in vals]
        mean = sum(xs) / len(xs)
        greedy = next((float(r["metrics"][m]) for r in rows if r["setting"]["name"] == "greedy"
                       and m in r["metrics"]), None)
        lo = min(vals, key=lambda x: x[1])
        hi = max(vals, key=lambda x: x[1])
        out[m] = {"min": lo[1], "max": hi[1], "range": hi[1] - lo[1], "mean": mean,
                  "std": math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)),
                  "argmin": lo[0], "argmax": hi[0], "greedy": greedy, "n": len(xs)}
    return out


def plot_spread(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """One panel per metric: each setting's value, the greedy value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csr.io import atomic_savefig

    names = sorted({k for r in rows for k in r["metrics"]})
    settings = [r["setting"]["name"] for r in rows]
    ncols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, names):
        xs = [i for i, r in enumerate(rows) if m in r["metrics"]]
        ys = [rows[i]["metrics"][m] for i in xs]
        colours = ["tab:red" if rows[i]["setting"].get("debias") else
                   "tab:blue" if rows[i]["setting"].get("do_sample") else "tab:green" for i in xs]
        ax.scatter(xs, ys, c=colours, s=22, zorder=3)
        greedy = [rows[i]["metrics"][m] for i in xs if settings[i] == "greedy"]
        if greedy:
            ax.axhline(greedy[0], ls="--", c="grey", lw=1)
        ax.set_title(f"{m}  (range {max(ys) - min(ys):.3f})", fontsize=9)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings, rotation=70, fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title or "decoding study (green: deterministic, blue: sampled, red: debias; dashed: greedy)",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)


def run_study(model_path: str | None = None, *, pope_path=None, chair_path=None, out_dir, settings=None,
              image_root=None, synonyms_path=None, limit: int | None = None, batch_size: int = 16,
              pope_max_new_tokens: int = 8, caption_max_new_tokens: int = 96, pope_suffix: str = "",
              device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
              model=None, processor=None) -> dict:
    """Run every decoding setting on the POPE and/or CHAIR file; write study.json and study.png."""
    from csr.eval.chair import chair_metrics, load_synonyms
    from csr.eval.pope import parse_yes_no, score_pope
    from csr.eval.run import DEFAULT_CAPTION_PROMPT
    from csr.data import read_raw_records, record_image_paths
    from csr.io import atomic_write_json, write_jsonl
    from csr.models import load_policy

    if pope_path is None and chair_path is None:
        raise ValueError("the decoding study needs a POPE and/or a CHAIR file")
    if model is None:
        model, processor = load_policy(str(model_path), dtype=dtype, device=device,
                                       trust_remote_code=trust_remote_code)
    model.eval()
    settings = list(settings) if settings is not None else default_settings()
    if len({s.name for s in settings}) != len(settings):
        raise ValueError("decoding settings need distinct names")
    out_dir = Path(out_dir)

    tasks = {}
    if pope_path is not None:
        recs = read_raw_records(pope_path)[:limit]
        tasks["pope"] = (recs, record_image_paths(recs, pope_path, image_root),
                         [(r["text"] + (" " + pope_suffix if pope_suffix else "")).strip() for r in recs])
    if chair_path is not None:
        recs = read_raw_records(chair_path)[:limit]
        syn = Path(synonyms_path) if synonyms_path else Path(chair_path).parent / "synonyms.json"
        if not syn.is_file():
            raise FileNotFoundError(f"CHAIR needs a synonym table: '{syn}' does not exist (pass --synonyms)")
        table = load_synonyms(syn)
        tasks["chair"] = (recs, record_image_paths(recs, chair_path, image_root),
                          [r.get("prompt") or DEFAULT_CAPTION_PROMPT for r in recs])

    rows = []
    for s in settings:
        t0 = time.time()
        result, texts_out = {}, []
        for task, (recs, paths, questions) in tasks.items():
            mnt = pope_max_new_tokens if task == "pope" else caption_max_new_tokens
            texts = generate_texts(model, processor, paths, questions, s, max_new_tokens=mnt, batch_size=batch_size)
            if task == "pope":
                result["pope"] = score_pope(recs, texts)
                texts_out += [{"task": "pope", "question_id": r.get("question_id"), "label": r["label"],
                               "text": t, "answer": parse_yes_no(t)} for r, t in zip(recs, texts)]
            else:
                result["chair"] = chair_metrics(texts, [r["objects"] for r in recs], table)
                texts_out += [{"task": "chair", "id": r.get("id"), "caption": t} for r, t in zip(recs, texts)]
        row = {"setting": asdict(s), "metrics": flat_metrics(result), "seconds": round(time.time() - t0, 2)}
        rows.append(row)
        write_jsonl(out_dir / "texts" / f"{_safe(s.name)}.jsonl", texts_out)
        log.info("[study] %-22s %s (%.1fs)", s.name,
                 "  ".join(f"{k} {v:.3f}" for k, v in row["metrics"].items()), row["seconds"])
    summary = {"model": str(model_path) if model_path is not None else None,
               "pope": str(pope_path) if pope_path else None, "chair": str(chair_path) if chair_path else None,
               "limit": limit, "rows": rows, "spread": spread(rows), "plot": "study.png"}
    plot_spread(rows, out_dir / "study.png")
    atomic_write_json(out_dir / "study.json", summary)
    return summary
