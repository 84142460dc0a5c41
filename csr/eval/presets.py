"""The standard evaluation protocols, by name: ``csr eval --preset NAME`` and ``run.eval_presets``.

- ``coco-chair``: CHAIR on COCO as OPERA and the CSR authors run it: 500 val2014 images drawn with
  a fixed seed, "Please describe this image in detail.", greedy, up to 512 new tokens, scored with
  the reference CHAIR rules (`csr.eval.coco_chair`, mode ``reference``). The draw: the image ids of
  ``instances_val2014.json``, sorted, ``random.Random(0).sample(ids, 500)``, sorted again. The
  papers do not publish their 500 ids, so no draw matches theirs; the ids are written to the
  output (``chair_captions.jsonl``) so that runs compare with each other.
- ``coco-pope``: the three official POPE files (``coco_pope_{random,popular,adversarial}.json``),
  each question followed by LLaVA's answer suffix "Answer the question using a single word or
  phrase.", greedy, up to 128 new tokens (LLaVA's default), scored with LLaVA's rule per split.

Inputs: the COCO val2014 images (``image_root``), for coco-chair the COCO 2014 annotation folder
and the reference synonym list, for coco-pope the folder holding the official files. The answers
are written in the formats the no-model scorers read (``chair_captions.jsonl``,
``pope_answers_<split>.jsonl``), so ``csr eval --chair-captions`` / ``--pope-questions`` rescore
them exactly.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from csr.data import BadInput, resolve_image_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str                      # chair | pope
    max_new_tokens: int
    prompt: str = ""               # chair: the caption prompt
    suffix: str = ""               # pope: appended to each question
    n_images: int = 0              # chair: images drawn from val2014
    seed: int = 0
    chair_mode: str = "reference"
    files: tuple = ()              # pope: the official question files


PRESETS = {
    "coco-chair": Preset("coco-chair", "chair", max_new_tokens=512, prompt="Please describe this image in detail.",
                         n_images=500, seed=0),
    "coco-pope": Preset("coco-pope", "pope", max_new_tokens=128,
                        suffix="Answer the question using a single word or phrase.",
                        files=("coco_pope_random.json", "coco_pope_popular.json", "coco_pope_adversarial.json")),
}


def parse_presets(names: str | list) -> list[Preset]:
    """'coco-chair,coco-pope' -> the presets; an unknown name is refused with the list."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise BadInput("unknown_preset", f"unknown eval preset '{unknown[0]}': choose from {', '.join(PRESETS)}.")
    return [PRESETS[n] for n in names]


def val2014_images(ann_dir: str | Path, n: int | None, seed: int) -> list[tuple[int, str]]:
    """(image id, file name) of `n` val2014 images drawn with `seed` (all when n is None)."""
    from csr.eval.coco_chair import _load_json, check_annotation_dir

    inst = _load_json(check_annotation_dir(ann_dir) / "instances_val2014.json")
    names = {im["id"]: im["file_name"] for im in inst.get("images", [])}
    ids = sorted(names)
    if n is not None and n < len(ids):
        ids = sorted(random.Random(seed).sample(ids, n))
    return [(i, names[i]) for i in ids]


def run_chair_preset(preset: Preset, model, processor, *, coco_annotations, image_root, synonyms=None,
                     out_dir=None, limit=None, batch_size: int = 32, max_new_tokens: int | None = None,
                     chair_mode: str | None = None) -> dict:
    from csr.eval.coco_chair import CocoChair, coco_ground_truth, score_captions
    from csr.eval.run import generate_answers
    from csr.io import write_jsonl

    if not coco_annotations or not image_root:
        raise BadInput("missing_input", f"preset {preset.name} needs the COCO 2014 annotation folder "
                                        f"(--coco-annotations / run.eval_coco_annotations) and the val2014 images "
                                        f"(--image-root / run.eval_image_root).")
    from csr.eval.coco_chair import check_annotation_dir

    check_annotation_dir(coco_annotations)
    synonyms = Path(synonyms) if synonyms else Path(coco_annotations) / "synonyms.txt"
    chair = CocoChair(synonyms, chair_mode or preset.chair_mode)
    images = val2014_images(coco_annotations, preset.n_images, preset.seed)[:limit]
    tokens = max_new_tokens or preset.max_new_tokens
    hits: list[bool] = []
    paths = [resolve_image_path(f, image_root, allow_absolute=True, resolve=False, record=f"COCO image {i}")
             for i, f in images]
    captions = generate_answers(model, processor, paths,
                                [preset.prompt] * len(images), max_new_tokens=tokens, batch_size=batch_size,
                                desc=preset.name, hit_limit=hits)
    records = [{"image_id": i, "caption": c, "hit_token_limit": h} for (i, _), c, h in zip(images, captions, hits)]
    gt = coco_ground_truth(coco_annotations, [i for i, _ in images], chair, source=preset.name)
    out = score_captions(records, gt, chair)
    per = out.pop("per_caption")
    out.update(preset=preset.name, prompt=preset.prompt, max_new_tokens=tokens)
    if out_dir is not None:
        write_jsonl(Path(out_dir) / "chair_captions.jsonl", records)
        write_jsonl(Path(out_dir) / "chair_per_caption.jsonl", per)
    log.info("%s: CHAIR_S %.3f  CHAIR_I %.3f  recall %.3f  %.1f words/caption, %d of %d cut at %d tokens",
             preset.name, out["chair_s"], out["chair_i"], out["recall"], out["words_per_caption"],
             out["n_hit_token_limit"], out["n_captions"], tokens)
    return out


def run_pope_preset(preset: Preset, model, processor, *, pope_dir, image_root, out_dir, limit=None,
                    batch_size: int = 32, max_new_tokens: int | None = None) -> dict:
    from csr.eval.pope import read_pope_questions, score_pope_files, split_name
    from csr.eval.run import generate_answers
    from csr.io import write_jsonl

    if not pope_dir or not image_root:
        raise BadInput("missing_input", f"preset {preset.name} needs the folder of the official POPE files "
                                        f"(--pope-dir / run.eval_pope_dir) and the val2014 images "
                                        f"(--image-root / run.eval_image_root).")
    missing = [f for f in preset.files if not (Path(pope_dir) / f).is_file()]
    if missing:
        raise FileNotFoundError(f"POPE folder '{pope_dir}' lacks {', '.join(missing)}: pass the folder holding the "
                                f"official files (POPE's output/coco/).")
    tokens = max_new_tokens or preset.max_new_tokens
    questions, answers = [], []
    for f in preset.files:
        qs = read_pope_questions(Path(pope_dir) / f)[:limit]
        paths = [resolve_image_path(q["image"], image_root, allow_absolute=True, resolve=False, record=f"{f}:{n}")
                 for n, q in enumerate(qs, 1)]
        texts = generate_answers(model, processor, paths,
                                 [f"{q['text']} {preset.suffix}".strip() for q in qs], max_new_tokens=tokens,
                                 batch_size=batch_size, desc=f"{preset.name} {split_name(f)}")
        # the questions asked and LLaVA-format answers, so `csr eval --pope-questions` rescores them
        qpath = Path(out_dir) / f
        apath = Path(out_dir) / f"pope_answers_{split_name(f)}.jsonl"
        write_jsonl(qpath, qs)
        write_jsonl(apath, [{"question_id": q["question_id"], "prompt": f"{q['text']} {preset.suffix}".strip(),
                             "text": t} for q, t in zip(qs, texts)])
        questions.append(qpath)
        answers.append(apath)
    out = score_pope_files(questions, answers)
    for k in ("random", "popular", "adversarial", "mean"):
        if k in out and "f1" in out[k]:
            log.info("%s %s: accuracy %.3f  F1 %.3f  yes-ratio %.3f", preset.name, k, out[k]["accuracy"],
                     out[k]["f1"], out[k]["yes_ratio"])
    return out


def run_presets(names, model_path=None, *, model=None, processor=None, out_dir, coco_annotations=None,
                synonyms=None, image_root=None, pope_dir=None, limit=None, batch_size: int = 32,
                max_new_tokens: int | None = None, chair_mode: str | None = None, device: str = "auto",
                dtype: str = "auto", trust_remote_code: bool = False) -> dict:
    """Run presets on a model folder (or a loaded model); ``{"chair": ..., "pope": ...}``.

    `max_new_tokens` and `chair_mode` override the CHAIR preset's (None: the preset's)."""
    presets = parse_presets(names)
    if model is None:
        from csr.models import load_policy

        model, processor = load_policy(str(model_path), dtype=dtype, device=device,
                                       trust_remote_code=trust_remote_code)
    model.eval()
    out_dir = Path(out_dir)
    result: dict = {}
    for p in presets:
        if p.kind == "chair":
            result["chair"] = run_chair_preset(p, model, processor, coco_annotations=coco_annotations,
                                               image_root=image_root, synonyms=synonyms, out_dir=out_dir, limit=limit,
                                               batch_size=batch_size, max_new_tokens=max_new_tokens,
                                               chair_mode=chair_mode)
        else:
            result["pope"] = run_pope_preset(p, model, processor, pope_dir=pope_dir, image_root=image_root,
                                             out_dir=out_dir, limit=limit, batch_size=batch_size)
    result["presets"] = [p.name for p in presets]
    return result

