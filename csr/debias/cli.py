"""`csr debias`: post-hoc calibration, debias sampling and the decoding study (docs/method.md §2).

    csr debias calibrate --model DIR (--pope FILE | --mc FILE) --out DIR
                         [--cf none,unk,blank,noise] [--mode diag|bias] [--per-sample|--dataset-mean]
    csr debias sample    --model DIR (--chair FILE | --pope FILE) --out DIR
                         [--alpha 1.0] [--beta 0.1] [--cf none|unk|mean] [--do-sample ...]
    csr debias study     --model DIR (--pope FILE | --chair FILE) --out DIR [--seeds 0,1,2] [--debias]

Defaults are the paper's (Zhang et al. 2024): calibration with W = diag(p_cf)^-1 and a per-sample
p_cf averaged over the content-free inputs; debias sampling with α = 1, β = 0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder or hub id (any LLaVA-compatible model).")
    p.add_argument("--out", required=True, help="output folder (metrics.json and per-record files).")
    p.add_argument("--image-root", help="folder the files' image fields are relative to "
                                        "(default: the folder holding each file).")
    p.add_argument("--limit", type=int, help="use only the first N records of each file (default: all).")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward batch (default 16).")
    p.add_argument("--seed", type=int, default=0, help="seed for noise images and sampling (default 0).")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default auto).")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="model dtype (default auto: bfloat16 on GPU, float32 on CPU).")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder.")


def _float_list(text: str) -> list:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="csr debias", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("calibrate", help="post-hoc calibration of closed-set answers (POPE, multiple choice).",
                       description="Score each label from the first answer token, for the real image and the "
                                   "content-free inputs, and calibrate q ∝ p / p_cf (or softmax(p - p_cf)).")
    _model_args(c)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--pope", help="POPE-format JSONL {question_id, image, text, label: yes|no, category?}.")
    src.add_argument("--mc", help="multiple-choice JSONL {question_id, image, text, answer, options?, labels?, "
                                  "category?}; options (list or {letter: text}) are appended as 'A. ...' lines.")
    c.add_argument("--labels", help="label set: yesno, letters (A-D), abcde or a comma list "
                                    "(default: yesno for --pope, the options' letters or A-D for --mc).")
    c.add_argument("--cf", default="none,unk,blank,noise",
                   help="content-free inputs to average into p_cf, any subset of none (placeholder removed), "
                        "unk (placeholder -> <unk>), blank (white image), noise (uniform noise image) "
                        "(default: all four, equal weights).")
    c.add_argument("--mode", default="diag", choices=("diag", "bias"),
                   help="diag: W = diag(p_cf)^-1, b = 0 (paper's default); bias: W = I, b = -p_cf.")
    pm = c.add_mutually_exclusive_group()
    pm.add_argument("--per-sample", dest="per_sample", action="store_true", default=True,
                    help="one p_cf per question (paper's default).")
    pm.add_argument("--dataset-mean", dest="per_sample", action="store_false",
                    help="one p_cf for the whole file: the mean of the per-question p_cf.")
    c.add_argument("--suffix", help="text appended to each question (POPE default: none; multiple choice "
                                    "with options: LLaVA's \"Answer with the option's letter from the given "
                                    "choices directly.\").")
    c.add_argument("--no-merge-variants", dest="merge_variants", action="store_false",
                   help="score each label by its own first token only (default: case and leading-space "
                        "variants merged by summing their first-token probabilities).")
    c.add_argument("--no-greedy-baseline", dest="greedy_baseline", action="store_false",
                   help="skip the greedy generation baseline (POPE only: `csr eval`'s answers parsed with "
                        "LLaVA's rule; default: run it).")
    c.add_argument("--no-grid", dest="grid", action="store_false",
                   help="skip the metrics of every single content-free input x mode x p_cf estimate "
                        "(default: report them).")

    s = sub.add_parser("sample", help="debias sampling for CHAIR captions and/or POPE answers, beside a "
                                      "baseline with the same decoding settings.",
                       description="l' = (1 + alpha) l - alpha l_cf; drop tokens whose original logit is "
                                   "below log(beta) + max(l); then temperature / top-k / top-p.")
    _model_args(s)
    s.add_argument("--chair", help="CHAIR JSONL {id, image, objects, prompt?}.")
    s.add_argument("--synonyms", help="CHAIR synonym table (default: synonyms.json beside --chair).")
    s.add_argument("--pope", help="POPE-format JSONL (answers generated with debias sampling, LLaVA's parse rule).")
    s.add_argument("--alpha", type=float, default=1.0, help="contrast strength alpha (paper's default 1.0).")
    s.add_argument("--beta", type=float, default=0.1, help="adaptive plausibility beta in [0, 1] "
                                                           "(paper's default 0.1; 0 switches the cutoff off).")
    s.add_argument("--cf", default="none", choices=("none", "unk", "mean"),
                   help="content-free branch: none (image placeholder removed; default), unk (placeholder "
                        "-> <unk>), mean (the mean of both branches' logits).")
    s.add_argument("--do-sample", action="store_true", help="sample (default: greedy arg-max).")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0).")
    s.add_argument("--top-k", type=int, default=0, help="top-k when sampling (default 0: off).")
    s.add_argument("--top-p", type=float, default=1.0, help="top-p when sampling (default 1.0: off).")
    s.add_argument("--max-new-tokens", type=int, default=96, help="caption length limit (default 96, as csr eval).")
    s.add_argument("--pope-max-new-tokens", type=int, default=8, help="POPE answer length limit (default 8).")
    s.add_argument("--caption-prompt", help="override the CHAIR records' prompt "
                                            "(default: the record's, else 'Describe this image in detail.').")
    s.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the baseline (the same decoding with alpha = 0, beta = 0; default: run it).")

    st = sub.add_parser("study", help="decoding sweep: greedy, beam, temperature, top-p, top-k; each metric's "
                                      "spread and a plot.")
    _model_args(st)
    st.add_argument("--pope", help="POPE-format JSONL.")
    st.add_argument("--chair", help="CHAIR JSONL.")
    st.add_argument("--synonyms", help="CHAIR synonym table (default: synonyms.json beside --chair).")
    st.add_argument("--settings", default="default",
                    help="'default' (greedy; beam 3, 5; T 0.2, 0.5, 1.0; top-p 0.5, 0.9; top-k 5, 20) or a JSON "
                         "list of settings {name, do_sample, temperature, top_k, top_p, num_beams, debias, alpha, "
                         "beta, cf_mode}.")
    st.add_argument("--seeds", default="0", help="comma list of seeds; each sampled setting runs once per seed "
                                                 "(default 0).")
    st.add_argument("--debias", action="store_true", help="add debias-sampling rows (greedy and T = 1) to the "
                                                          "default settings.")
    st.add_argument("--alpha", type=float, default=1.0, help="alpha of the debias rows (default 1.0).")
    st.add_argument("--beta", type=float, default=0.1, help="beta of the debias rows (default 0.1).")
    st.add_argument("--cf", default="none", choices=("none", "unk", "mean"),
                    help="content-free branch of the debias rows (default none).")
    st.add_argument("--max-new-tokens", type=int, default=96, help="caption length limit (default 96).")
    st.add_argument("--pope-max-new-tokens", type=int, default=8, help="POPE answer length limit (default 8).")
    st.add_argument("--pope-suffix", default="", help="text appended to each POPE question (default none).")
    return ap


# ---------------------------------------------------------------------------------------------


def cmd_calibrate(args) -> dict:
    from csr.debias.calibration import CONTENT_FREE_INPUTS, calibrate_file
    from csr.io import atomic_write_json
    from csr.models import load_policy

    cf = [x.strip() for x in args.cf.split(",") if x.strip()]
    if not cf or any(x not in CONTENT_FREE_INPUTS for x in cf):
        raise SystemExit(f"csr debias calibrate: --cf takes a subset of {','.join(CONTENT_FREE_INPUTS)}, "
                         f"got {args.cf!r}")
    kind, path = ("pope", args.pope) if args.pope else ("mc", args.mc)
    model, processor = load_policy(args.model, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code)
    result = calibrate_file(model, processor, path, kind, out_dir=args.out, image_root=args.image_root,
                            labels=args.labels, suffix=args.suffix, limit=args.limit, cf_inputs=cf, mode=args.mode,
                            per_sample=args.per_sample, batch_size=args.batch_size, seed=args.seed,
                            merge_variants=args.merge_variants, grid=args.grid)
    result = {"model": args.model, **result}
    if kind == "pope" and args.greedy_baseline:
        from csr.debias.calibration import load_closed_set
        from csr.eval.pope import score_pope
        from csr.eval.run import generate_answers

        data = load_closed_set(path, kind, image_root=args.image_root, labels=args.labels, suffix=args.suffix,
                               limit=args.limit)

        texts = generate_answers(model, processor, data.images, data.questions, max_new_tokens=8,
                                 batch_size=args.batch_size, desc="pope-greedy")
        result["greedy_generation"] = score_pope(data.records, texts)
    atomic_write_json(Path(args.out) / "metrics.json", result)
    return result


def _score(task: str, recs, texts, table=None) -> dict:
    if task == "pope":
        from csr.eval.pope import score_pope

        return score_pope(recs, texts)
    from csr.eval.chair import chair_metrics

    return chair_metrics(texts, [r["objects"] for r in recs], table)


def cmd_sample(args) -> dict:
    from csr.debias.sampling import debiased_generate
    from csr.eval.chair import caption_report, load_synonyms
    from csr.eval.pope import parse_yes_no
    from csr.eval.run import DEFAULT_CAPTION_PROMPT
    from csr.io import atomic_write_json, read_jsonl, write_jsonl
    from csr.models import load_policy

    if not args.chair and not args.pope:
        raise SystemExit("csr debias sample: give --chair and/or --pope")
    model, processor = load_policy(args.model, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code)
    out = Path(args.out)
    decoding = {"do_sample": args.do_sample, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed}
    result = {"model": args.model, "settings": {"alpha": args.alpha, "beta": args.beta, "cf": args.cf, **decoding}}
    for task, path in (("chair", args.chair), ("pope", args.pope)):
        if not path:
            continue
        path = Path(path)
        recs = read_jsonl(path)[:args.limit]
        root = Path(args.image_root) if args.image_root else path.parent
        images = [p if p.is_absolute() else root / p for p in (Path(r["image"]) for r in recs)]
        table = None
        if task == "chair":
            syn = Path(args.synonyms) if args.synonyms else path.parent / "synonyms.json"
            if not syn.is_file():
                raise FileNotFoundError(f"CHAIR needs a synonym table: '{syn}' does not exist (pass --synonyms)")
            table = load_synonyms(syn)
            questions = [args.caption_prompt or r.get("prompt") or DEFAULT_CAPTION_PROMPT for r in recs]
            mnt = args.max_new_tokens
        else:
            questions = [r["text"] for r in recs]
            mnt = args.pope_max_new_tokens
        runs = [("debiased", args.alpha, args.beta)] + ([("baseline", 0.0, 0.0)] if args.baseline else [])
        result[task] = {}
        for name, alpha, beta in runs:
            texts = debiased_generate(model, processor, images, questions, alpha=alpha, beta=beta,
                                      max_new_tokens=mnt, cf_mode=args.cf, batch_size=args.batch_size,
                                      do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                                      top_p=args.top_p, seed=args.seed)
            result[task][name] = _score(task, recs, texts, table)
            if task == "chair":
                write_jsonl(out / f"chair_captions_{name}.jsonl", [
                    {"id": r.get("id"), "image": r["image"], "caption": t, "objects": r["objects"],
                     **{k: v for k, v in caption_report(t, r["objects"], table).items()
                        if k in ("mentions", "hallucinated")}} for r, t in zip(recs, texts)])
                m = result[task][name]
                log.info("[%s] CHAIR_S %.3f CHAIR_I %.3f recall %.3f", name, m["chair_s"], m["chair_i"], m["recall"])
            else:
                write_jsonl(out / f"pope_answers_{name}.jsonl", [
                    {"question_id": r.get("question_id"), "label": r["label"], "text": t,
                     "answer": parse_yes_no(t)} for r, t in zip(recs, texts)])
                m = result[task][name]["all"]
                log.info("[%s] POPE accuracy %.3f F1 %.3f yes-ratio %.3f", name, m["accuracy"], m["f1"], m["yes_ratio"])
    atomic_write_json(out / "metrics.json", result)
    return result


def cmd_study(args) -> dict:
    from csr.debias.study import default_settings, load_settings, run_study

    seeds = [int(x) for x in _float_list(args.seeds)]
    if args.settings == "default":
        settings = default_settings(seeds, debias=args.debias, alpha=args.alpha, beta=args.beta, cf_mode=args.cf)
    else:
        settings = load_settings(args.settings, seeds)
    if not args.pope and not args.chair:
        raise SystemExit("csr debias study: give --pope and/or --chair")
    summary = run_study(args.model, pope_path=args.pope, chair_path=args.chair, out_dir=args.out,
                        settings=settings, image_root=args.image_root, synonyms_path=args.synonyms,
                        limit=args.limit, batch_size=args.batch_size, pope_max_new_tokens=args.pope_max_new_tokens,
                        caption_max_new_tokens=args.max_new_tokens, pope_suffix=args.pope_suffix,
                        device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    return {"spread": summary["spread"], "plot": str(Path(args.out) / "study.png")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = {"calibrate": cmd_calibrate, "sample": cmd_sample, "study": cmd_study}[args.command](args)
    text = json.dumps(result, indent=2)
    print(text if len(text) < 20000 else text[:20000] + "\n... (see metrics in --out)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
