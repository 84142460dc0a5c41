"""`csr vig score`: per-token and per-sample Visual Information Gain of a dataset of (image, prompt,
answer) records, written to ``<out>/vig.jsonl`` (resumable) with a histogram and DONE.json.

    VIG_t = log p(a_t | a_<t, Q, I) − log p(a_t | a_<t, Q, I_cf)          (token level)
    VIG   = mean_t VIG_t = log( PPL(A | Q, I_cf) / PPL(A | Q, I) )         (sample level)

The pieces: `csr.vig.records` reads the samples, `csr.vig.collate` builds the examples exactly as
training collates them, `csr.vig.logprobs` runs the model with the image and with the content-free
input, `csr.vig.maths` turns the log-probs into VIG and the selection.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from csr.vig.logprobs import VIGOptions, score_items
from csr.vig.maths import TAU_MODES, selection_threshold, summarize_vigs
from csr.vig.records import read_records

log = logging.getLogger(__name__)

SCORES_FILE = "vig.jsonl"
HISTOGRAM_FILE = "vig_histogram.png"


def _batched(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def run_vig_score(model_path: str, data_path: str | Path, out_dir: str | Path, options: VIGOptions, *,
                  image_root: str | None = None, limit: int | None = None, device: str = "auto",
                  dtype: str = "auto", model=None, processor=None, turns: str = "all",
                  text_only: str = "keep") -> dict:
    """Score a dataset into `<out_dir>/vig.jsonl` (resumable), with a histogram and DONE.json."""
    from tqdm.auto import tqdm

    from csr.data import BadInput, load_image
    from csr.io import (JsonlAppender, StageSummary, is_done, iter_jsonl, mark_done, read_done,
                        repair_jsonl_tail)

    options.validate()
    out_dir = Path(out_dir)
    if is_done(out_dir):
        log.info("[vig score] %s is finished; skipping", out_dir)
        return read_done(out_dir)
    t0 = time.time()
    summary = StageSummary("vig score")
    records = read_records(data_path, image_root, limit, summary, turns=turns, text_only=text_only)
    scores_path = out_dir / SCORES_FILE
    repair_jsonl_tail(scores_path)
    finished = {r["id"] for r in iter_jsonl(scores_path)} if scores_path.exists() else set()
    todo = [r for r in records if r["id"] not in finished]
    if model is None:
        from csr.models import load_policy

        model, processor = load_policy(model_path, dtype=dtype, device=device)
    with JsonlAppender(scores_path) as sink, tqdm(total=len(todo), desc="vig score", unit="sample") as bar:
        for batch in _batched(todo, max(options.batch_size * 4, 1)):
            items = []
            for rec in batch:
                try:
                    items.append({**rec, "image_path": rec["image"],
                                  "image": load_image(rec["image"]) if rec["image"] is not None else None})
                except BadInput as e:
                    summary.skip(e.reason, f"record {rec['id']} ({e})")
            scored = score_items(model, processor, items, options, progress=bar.update)
            for it, s in zip(items, scored):
                rec = {k: v for k, v in it.items() if k not in ("image", "image_path")}
                sink.write({"id": rec.pop("id"), "image": it["image_path"], **rec, **s})
                summary.processed += 1
    all_records = [r for r in iter_jsonl(scores_path) if r.get("vig") is not None]   # text-only: no VIG
    stats = summarize_vigs([r["vig"] for r in all_records], [r["vig_tokens"] for r in all_records])
    hist = None
    if all_records:
        from csr.vig.view import histogram_png

        tau = selection_threshold([r["vig"] for r in all_records], 70.0)
        hist = str(histogram_png([r["vig"] for r in all_records], out_dir / HISTOGRAM_FILE, tau=tau,
                                 title=f"sample VIG ({options.content_free})", keep_percent=70.0))
    summary.extra.update(model=str(model_path), data=str(data_path), options=options.as_dict(),
                         scores=str(scores_path), histogram=hist, stats=stats,
                         tau_keep70={m: selection_threshold([r["vig"] for r in all_records], 70.0, m)
                                     for m in TAU_MODES} if all_records else None,
                         seconds=round(time.time() - t0, 2))
    summary.log()
    mark_done(out_dir, summary.as_dict())
    return summary.as_dict()


def read_scores(path: str | Path) -> list[dict]:
    """The records of a `csr vig score` output (its folder or its vig.jsonl)."""
    from csr.io import read_jsonl

    p = Path(path)
    if p.is_dir():
        p = p / SCORES_FILE
    if not p.is_file():
        raise FileNotFoundError(f"VIG scores '{p}' do not exist: run `csr vig score` first.")
    return read_jsonl(p)
