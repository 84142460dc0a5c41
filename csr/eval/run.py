"""`csr eval`: POPE and CHAIR for any LLaVA-compatible model folder.

    csr eval --model DIR [--pope pope.jsonl] [--chair chair.jsonl] --out DIR
             [--synonyms FILE] [--image-root DIR] [--batch-size 32] [--limit N]

- POPE file: ``{question_id, image, text, label, category?}`` per line. The question is asked as is
  (LLaVA's own POPE script appends "Answer the question using a single word or phrase."; pass it
  with ``--pope-suffix`` to match), greedy, up to 8 new tokens; scored with LLaVA's rule
  (`csr.eval.pope`).
- CHAIR file: ``{id, image, objects, prompt?}`` per line; the caption prompt is the record's
  ``prompt`` (default "Describe this image in detail."), greedy, up to 96 new tokens; scored with a
  synonym table (`csr.eval.chair`): ``--synonyms``, else ``synonyms.json`` beside the CHAIR file.
- Images: a record's ``image`` is resolved against ``--image-root``, else against the folder that
  holds the file (the layout `csr world` writes).

Outputs in ``--out``: ``metrics.json`` (written atomically), ``pope_answers.jsonl`` and
``chair_captions.jsonl`` (one line per record with the model's text). The Python entry point is
`evaluate_model`, which the round loop calls after every round. Beside CHAIR, always: recall,
words per caption and ``n_hit_token_limit`` (captions cut at the token limit: CHAIR falls when
captions get shorter).

The standard protocols (`csr.eval.presets`) and answers from other tools (no model):

    csr eval --preset coco-chair,coco-pope --model DIR --image-root val2014/ \
             --coco-annotations annotations/ --synonyms synonyms.txt --pope-dir pope/ --out DIR
    csr eval --chair-captions caps.jsonl --coco-annotations annotations/ [--synonyms FILE]
             [--chair-mode reference|corrected] --out DIR            (`csr.eval.coco_chair`)
    csr eval --pope-questions coco_pope_*.json --pope-answers A1 A2 A3 --out DIR   (`csr.eval.pope`)

Scoring existing answers prints the metrics as one JSON object on stdout and writes them to
``metrics.json`` (with, for CHAIR, the mentioned and hallucinated objects of each caption).

The command line is `csr.eval.cli` (it also composes the debiasing package's calibration); this
module is the library the round loop, the presets and the debias tools call.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from csr.data import BadInput, read_raw_records, record_image_paths
from csr.eval.chair import chair_metrics, load_synonyms
from csr.eval.pope import parse_yes_no, score_pope
from csr.io import atomic_write_json, write_jsonl


log = logging.getLogger(__name__)

DEFAULT_CAPTION_PROMPT = "Describe this image in detail."


def _eos_ids(model, tok) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    return ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def generate_answers(model, processor, image_paths: list, questions: list[str], *, max_new_tokens: int,
                     batch_size: int = 32, desc: str = "eval", hit_limit: list | None = None) -> list[str]:
    """Greedy answers, batched with left padding, in input order.

    With a list as `hit_limit`, one bool per answer is appended to it: True when the answer was cut
    at `max_new_tokens` (it holds no end-of-sequence token).
    """
    import torch

    from csr.data import load_image
    from csr.models import build_chat_prompt

    tok = processor.tokenizer
    eos = _eos_ids(model, tok)
    old_side = tok.padding_side
    tok.padding_side = "left"
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    answers: list[str] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(questions), desc=desc, unit="answer")
    try:
        with torch.no_grad():
            for start in range(0, len(questions), batch_size):
                qs = questions[start:start + batch_size]
                images = [load_image(p) for p in image_paths[start:start + batch_size]]
                prompts = [build_chat_prompt(processor, q) for q in qs]
                enc = processor(text=prompts, images=images, padding=True, return_tensors="pt")
                enc = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in enc.items()}
                out = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
                if hit_limit is not None:
                    hit_limit += [new.shape[1] >= max_new_tokens and not eos.intersection(row.tolist()) for row in new]
                bar.update(len(qs))
    finally:
        bar.close()
        tok.padding_side = old_side
    return answers


def check_pope_records(path: Path, recs: list) -> list[dict]:
    """POPE records checked before any generation: not empty, objects with a question, an image and a
    yes/no label, and no question id given twice with different labels."""
    if not recs:
        raise BadInput("empty_file", f"{path} holds no POPE question: nothing to score.")
    seen: dict = {}
    for n, r in enumerate(recs, 1):
        if not isinstance(r, dict) or not {"text", "image", "label"} <= set(r):
            raise BadInput("bad_record", f"{path}:{n}: a POPE record needs text, image and label.")
        if str(r["label"]).strip().lower() not in ("yes", "no"):
            raise BadInput("bad_label", f"{path}:{n}: label {r['label']!r} is not yes or no.")
        qid = r.get("question_id")
        if qid is not None:
            if qid in seen and seen[qid] != r["label"]:
                raise BadInput("duplicate_id", f"{path}:{n}: question_id {qid!r} appears twice with different "
                                               f"labels; the file is inconsistent.")
            seen[qid] = r["label"]
    return recs


def check_chair_records(path: Path, recs: list) -> list[dict]:
    """CHAIR records checked before any generation: not empty, an image and a list of objects each."""
    if not recs:
        raise BadInput("empty_file", f"{path} holds no caption record: nothing to score.")
    for n, r in enumerate(recs, 1):
        if not isinstance(r, dict) or "image" not in r:
            raise BadInput("bad_record", f"{path}:{n}: a CHAIR record needs an image and its objects.")
        if not isinstance(r.get("objects"), list) or not all(isinstance(o, str) for o in r["objects"]):
            raise BadInput("bad_objects", f"{path}:{n}: 'objects' must be a list of object names, not "
                                          f"{type(r.get('objects')).__name__} (a string would be read letter by letter).")
    return recs


def evaluate_model(model_path: str | None = None, pope_path: str | Path | None = None,
                   chair_path: str | Path | None = None, *, out_dir: str | Path | None = None,
                   image_root: str | Path | None = None, synonyms_path: str | Path | None = None,
                   batch_size: int = 32, pope_max_new_tokens: int = 8, caption_max_new_tokens: int = 96,
                   caption_prompt: str | None = None, pope_suffix: str = "", limit: int | None = None,
                   device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                   model=None, processor=None) -> dict:
    """POPE and/or CHAIR metrics of a model folder (or an already loaded `model`, `processor`).

    Returns ``{"model", "pope": {category: metrics, "all": ...}, "chair": {...}, "seconds"}``
    (keys only for the files given). With `out_dir`, also writes metrics.json and the answers.
    """
    from csr.models import load_policy

    if limit is not None and limit < 1:
        raise BadInput("bad_limit", f"limit={limit} must be at least 1 (or none for every record).")
    if batch_size < 1:
        raise BadInput("bad_batch_size", f"batch_size={batch_size} must be at least 1.")
    pope_recs = (check_pope_records(Path(pope_path), read_raw_records(pope_path)[:limit])
                 if pope_path is not None else None)
    chair_recs = (check_chair_records(Path(chair_path), read_raw_records(chair_path)[:limit])
                  if chair_path is not None else None)
    if chair_path is not None:  # the synonym table too, before anything is generated
        syn = Path(synonyms_path) if synonyms_path else Path(chair_path).parent / "synonyms.json"
        if not syn.is_file():
            raise FileNotFoundError(f"CHAIR needs a synonym table: '{syn}' does not exist "
                                    f"(pass --synonyms FILE: JSON {{object: [forms]}} or CHAIR's synonyms.txt).")
        table = load_synonyms(syn)
        if not table.canonicals:
            raise BadInput("empty_synonyms", f"{syn} defines no object: CHAIR would score nothing. Pass the "
                                             f"synonym table of the caption set.")
    t0 = time.time()
    if model is None:
        if model_path is None:
            raise ValueError("evaluate_model needs model_path or model")
        model, processor = load_policy(str(model_path), dtype=dtype, device=device,
                                       trust_remote_code=trust_remote_code)
    model.eval()
    out_dir = Path(out_dir) if out_dir is not None else None
    result: dict = {"model": str(model_path) if model_path is not None else None}

    if pope_path is not None:
        pope_path = Path(pope_path)
        recs = pope_recs
        questions = [(r["text"] + (" " + pope_suffix if pope_suffix else "")).strip() for r in recs]
        answers = generate_answers(model, processor, record_image_paths(recs, pope_path, image_root), questions,
                                   max_new_tokens=pope_max_new_tokens, batch_size=batch_size, desc="pope")
        if out_dir is not None:  # what was generated is saved before it is scored
            write_jsonl(out_dir / "pope_answers.jsonl",
                        [{"question_id": r.get("question_id"), "category": r.get("category"), "label": r["label"],
                          "text": a, "answer": parse_yes_no(a)} for r, a in zip(recs, answers)])
        result["pope"] = score_pope(recs, answers)
        a = result["pope"]["all"]
        log.info("POPE: accuracy %.3f  F1 %.3f  yes-ratio %.3f (n=%d)", a["accuracy"], a["f1"],
                 a["yes_ratio"], a["n"])

    if chair_path is not None:
        chair_path = Path(chair_path)
        recs = chair_recs
        prompts = [caption_prompt or r.get("prompt") or DEFAULT_CAPTION_PROMPT for r in recs]
        hits: list[bool] = []
        captions = generate_answers(model, processor, record_image_paths(recs, chair_path, image_root), prompts,
                                    max_new_tokens=caption_max_new_tokens, batch_size=batch_size, desc="chair",
                                    hit_limit=hits)
        if out_dir is not None:  # what was generated is saved before it is scored (rewritten with the details below)
            write_jsonl(out_dir / "chair_captions.jsonl",
                        [{"id": r.get("id"), "image": r["image"], "caption": c, "objects": r["objects"],
                          "hit_token_limit": h} for r, c, h in zip(recs, captions, hits)])
        metrics = chair_metrics(captions, [r["objects"] for r in recs], table, return_per_caption=True)
        per = metrics.pop("per_caption")
        metrics["n_hit_token_limit"] = sum(hits)      # CHAIR falls when captions are cut short
        result["chair"] = metrics
        if out_dir is not None:
            write_jsonl(out_dir / "chair_captions.jsonl",
                        [{"id": r.get("id"), "image": r["image"], "caption": c, "objects": r["objects"],
                          "mentions": p["mentions"], "hallucinated": p["hallucinated"], "hit_token_limit": h}
                         for r, c, p, h in zip(recs, captions, per, hits)])
        log.info("CHAIR: CHAIR_S %.3f  CHAIR_I %.3f  recall %.3f  %.1f words/caption, %d cut at %d tokens "
                 "(n=%d)", metrics["chair_s"], metrics["chair_i"], metrics["recall"], metrics["words_per_caption"],
                 metrics["n_hit_token_limit"], caption_max_new_tokens, metrics["n_captions"])

    result["seconds"] = round(time.time() - t0, 1)
    if out_dir is not None:
        atomic_write_json(out_dir / "metrics.json", result)
    return result
