"""The `csr eval` command line: argument parsing over `csr.eval.run` (see its docstring for the formats).

An entry point above the eval library: `--calibrate` composes the debias package's closed-set
calibration (`csr.debias.closed_set`), so the library modules of `csr.eval` never import another stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from csr.content_free import CALIBRATION_INPUTS
from csr.eval.run import evaluate_model
from csr.io import atomic_write_json


def make_parser() -> argparse.ArgumentParser:
    from csr.eval.coco_chair import MODES
    from csr.eval.presets import PRESETS

    ap = argparse.ArgumentParser(prog="csr eval", description="POPE and CHAIR: for a model folder, for the "
                                 "standard protocols (--preset), or for answers another tool wrote (no model).")
    ap.add_argument("--model", help="model folder or hub id (LLaVA-compatible); not needed to score existing answers")
    ap.add_argument("--pope", help="POPE-format JSONL {question_id, image, text, label, category?}")
    ap.add_argument("--chair", help="CHAIR JSONL {id, image, objects, prompt?} (the world's format)")
    ap.add_argument("--synonyms", help="synonym table for CHAIR: with --chair, JSON or CHAIR's synonyms.txt "
                                       "(default: synonyms.json beside --chair); with --chair-captions or the "
                                       "coco-chair preset, the reference synonyms.txt (default: synonyms.txt in "
                                       "--coco-annotations)")
    ap.add_argument("--image-root", help="folder image fields are relative to (default: each file's folder); for the "
                                         "presets, COCO's val2014 image folder")
    ap.add_argument("--out", required=True, help="output folder for metrics.json and the answers")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, help="use only the first N records of each file (presets: of each set)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="caption length limit for CHAIR (default: 96 for --chair, the preset's for coco-chair: 512)")
    ap.add_argument("--caption-prompt", help="override the CHAIR records' prompt")
    ap.add_argument("--pope-suffix", default="", help="text appended to each POPE question")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--trust-remote-code", action="store_true")
    g = ap.add_argument_group("existing answers (no model)")
    g.add_argument("--chair-captions", help="captions from any tool: a JSON list or JSONL of {image_id: <int>, "
                                            "caption: <str>} (optional finish_reason or hit_token_limit)")
    g.add_argument("--coco-annotations", help="folder with COCO's instances_{train,val}2014.json and "
                                              "captions_{train,val}2014.json (CHAIR's ground truth)")
    g.add_argument("--chair-mode", default="reference", choices=MODES,
                   help="reference (default): the reference CHAIR script's rules and quirks, numbers compare with "
                        "papers; corrected: its quirks fixed (csr/eval/coco_chair.py lists them)")
    g.add_argument("--pope-questions", nargs="+", help="official POPE question files (one JSON a line: "
                                                       "question_id, image, text, label), one per split")
    g.add_argument("--pope-answers", nargs="+", help="one answer file per question file, same order: LLaVA's answer "
                                                     "JSONL {question_id, text} or one answer a line in question order")
    g = ap.add_argument_group("standard protocols")
    g.add_argument("--preset", help=f"comma-separated: {', '.join(PRESETS)} (csr/eval/presets.py); needs --model, "
                                    f"--image-root (COCO val2014) and --coco-annotations / --pope-dir")
    g.add_argument("--pope-dir", help="folder holding the official coco_pope_{random,popular,adversarial}.json")
    g = ap.add_argument_group("closed-set scoring")
    g.add_argument("--mc", help="multiple-choice JSONL {id, image, question, options, answer} (closed-set accuracy)")
    g.add_argument("--calibrate", action="store_true",
                   help="also score --pope / --mc closed-set from first-token label probabilities, before and "
                        "after post-hoc calibration against content-free inputs (Zhang et al. 2024)")
    g.add_argument("--cf", default=",".join(CALIBRATION_INPUTS),
                   help="content-free inputs averaged into p_cf (paper: no image, <unk>, blank, noise)")
    g.add_argument("--calibration-mode", default="diag", choices=("diag", "bias"),
                   help="diag: W = diag(p_cf)^-1 (paper); bias: W = I, b = -p_cf")
    g.add_argument("--dataset-mean", action="store_true", help="one p_cf for the dataset (default: per sample)")
    return ap


def score_existing(args, ap) -> dict:
    """`csr eval --chair-captions ... / --pope-questions ...`: metrics of answers another tool wrote."""
    from csr.eval.coco_chair import score_caption_file
    from csr.eval.pope import score_pope_files

    result: dict = {}
    per = None
    if args.chair_captions:
        if not args.coco_annotations:
            ap.error("--chair-captions needs --coco-annotations DIR (COCO 2014 instances and captions files)")
        result["chair"] = score_caption_file(args.chair_captions, args.coco_annotations, args.synonyms,
                                             args.chair_mode)
        per = result["chair"].pop("per_caption")
    if args.pope_questions:
        if not args.pope_answers or len(args.pope_answers) != len(args.pope_questions):
            ap.error("give one --pope-answers file per --pope-questions file, in the same order")
        result["pope"] = score_pope_files(args.pope_questions, args.pope_answers)
    saved = json.loads(json.dumps(result))
    if per is not None:
        saved["chair"]["per_caption"] = per
    atomic_write_json(Path(args.out) / "metrics.json", saved)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    existing = bool(args.chair_captions or args.pope_questions)
    with_model = bool(args.pope or args.chair or args.mc or args.preset)
    if existing and (with_model or args.model):
        ap.error("--chair-captions / --pope-questions score existing answers without a model: run them apart "
                 "from --model, --pope, --chair, --mc and --preset")
    if args.pope_answers and not args.pope_questions:
        ap.error("--pope-answers needs --pope-questions")
    if existing:
        print(json.dumps(score_existing(args, ap), indent=2))
        return 0
    if not with_model:
        ap.error("give --pope, --chair, --mc or --preset (with --model), or --chair-captions / --pope-questions")
    if not args.model:
        ap.error("--model is needed to generate answers")
    if args.mc and not args.calibrate:
        ap.error("--mc is scored closed-set: add --calibrate")
    if args.preset:
        from csr.eval.presets import parse_presets

        kinds = {p.kind for p in parse_presets(args.preset)}   # an unknown name fails before a model loads
        if ("chair" in kinds and args.chair) or ("pope" in kinds and args.pope):
            ap.error("a preset and --chair / --pope both give CHAIR or POPE metrics: use one of them")
    from csr.models import load_policy

    model, processor = load_policy(args.model, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code)
    result = {"model": args.model}
    if args.pope or args.chair:
        result = evaluate_model(args.model, args.pope, args.chair, out_dir=args.out, image_root=args.image_root,
                                synonyms_path=args.synonyms, batch_size=args.batch_size, limit=args.limit,
                                caption_max_new_tokens=args.max_new_tokens or 96, caption_prompt=args.caption_prompt,
                                pope_suffix=args.pope_suffix, model=model, processor=processor)
    if args.preset:
        from csr.eval.presets import run_presets

        result.update(run_presets(args.preset, args.model, model=model, processor=processor, out_dir=args.out,
                                  coco_annotations=args.coco_annotations, synonyms=args.synonyms,
                                  image_root=args.image_root, pope_dir=args.pope_dir, limit=args.limit,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  chair_mode=args.chair_mode))
        atomic_write_json(Path(args.out) / "metrics.json", result)
    if args.calibrate:
        from csr.debias.closed_set import calibrate_file

        cf = [x.strip() for x in args.cf.split(",") if x.strip()]
        for kind, path in (("pope", args.pope), ("mc", args.mc)):
            if path:
                result[f"{kind}_calibrated"] = calibrate_file(
                    model, processor, path, kind, out_dir=Path(args.out) / f"{kind}_calibration",
                    image_root=args.image_root, limit=args.limit, cf_inputs=cf, mode=args.calibration_mode,
                    per_sample=not args.dataset_mean, batch_size=args.batch_size)
        atomic_write_json(Path(args.out) / "metrics.json", result)
    print(json.dumps(result, indent=2))
    return 0
