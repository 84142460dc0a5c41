"""`csr debias`: post-hoc calibration, debias sampling and the decoding study (docs/method.md §2).

    csr debias calibrate --model DIR (--pope FILE | --mc FILE) --out DIR [--recipe toolkit|authors]
                         [--cf none,unk,blank,noise] [--mode diag|bias] [--per-sample|--dataset-mean] ...
    csr debias sample    --model DIR (--chair FILE | --pope FILE) --out DIR [--recipe toolkit|authors]
                         [--alpha 1.0] [--beta 0.1] [--cf none|unk|mean] [--do-sample|--greedy ...]
    csr debias study     --model DIR (--pope FILE | --chair FILE) --out DIR [--seeds 0,1,2] [--debias]

Calibration is the paper's W = diag(p_cf)^-1 with a per-question p_cf; debias sampling uses α = 1,
β = 0.1. `--recipe` names the other settings (csr.debias.recipes): `toolkit` (default) or `authors`
(the authors' code as it runs). A flag given explicitly overrides the recipe's value.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from csr.content_free import CALIBRATION_INPUTS, SAMPLING_INPUTS

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


def _recipe_help(table: dict) -> str:
    return "; ".join(f"{name}: {r.reproduces}" for name, r in table.items())


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
    from csr.debias.recipes import CALIBRATION_RECIPES, SAMPLING_RECIPES

    c.add_argument("--recipe", default="toolkit",
                   help="named settings, overridden by any flag given explicitly: " + _recipe_help(CALIBRATION_RECIPES)
                        + " (default toolkit).")
    c.add_argument("--cf", default=None,
                   help="content-free inputs for p_cf, any subset of none (placeholder removed), "
                        "unk (placeholder -> <unk>), blank (white image), noise (uniform noise image) "
                        "(toolkit: all four; authors: none,unk).")
    c.add_argument("--cf-combine", default=None, choices=("mean", "sum"),
                   help="mean: equal-weight mean of each input's renormalised label scores (toolkit); sum: raw "
                        "label scores summed, then renormalised (authors' code).")
    c.add_argument("--cf-epsilon", type=float, default=None,
                   help="added to p_cf after it is formed (toolkit: 0; authors' code: 1e-4).")
    c.add_argument("--label-top-k", type=int, default=None,
                   help="0: a label's score sums its first tokens (toolkit); k: the probability of the exact label "
                        "token among the top k first tokens, variants not summed (authors' code: 10).")
    c.add_argument("--mode", default=None, choices=("diag", "bias"),
                   help="diag: W = diag(p_cf)^-1, b = 0 (paper's and authors' default); bias: softmax(p - p_cf), "
                        "Zhao et al.'s offset form (the authors' code's W = I, b = -p_cf divides by a sum near "
                        "zero and is not reproduced).")
    pm = c.add_mutually_exclusive_group()
    pm.add_argument("--per-sample", dest="per_sample", action="store_const", const=True, default=None,
                    help="one p_cf per question (paper's default, both recipes).")
    pm.add_argument("--dataset-mean", dest="per_sample", action="store_const", const=False,
                    help="one p_cf for the whole file: the mean of the per-question p_cf.")
    c.add_argument("--suffix", default=None,
                   help="text appended to each question (POPE: toolkit none, authors \"Please answer this "
                        "question with one word.\"; multiple choice with options: LLaVA's \"Answer with the "
                        "option's letter from the given choices directly.\").")
    c.add_argument("--no-merge-variants", dest="merge_variants", action="store_const", const=False, default=None,
                   help="with --label-top-k 0: score each label by its own first token only (toolkit: case and "
                        "leading-space variants merged by summing their first-token probabilities).")
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
    s.add_argument("--recipe", default="toolkit",
                   help="named settings, overridden by any flag given explicitly: " + _recipe_help(SAMPLING_RECIPES)
                        + " (default toolkit).")
    s.add_argument("--alpha", type=float, default=None, help="contrast strength alpha (paper's default 1.0, both "
                                                             "recipes).")
    s.add_argument("--beta", type=float, default=None, help="adaptive plausibility beta in [0, 1] for captions "
                                                            "(paper's default 0.1; 0 switches the cutoff off).")
    s.add_argument("--pope-beta", type=float, default=None,
                   help="beta for POPE answers (toolkit 0.1; authors' POPE scripts 0.2).")
    s.add_argument("--pope-suffix", default=None,
                   help="text appended to each POPE question (toolkit none; authors \"Please answer this question "
                        "with one word.\").")
    s.add_argument("--cf", default=None, choices=SAMPLING_INPUTS,
                   help="content-free branch: none (image placeholder removed; toolkit), unk (placeholder "
                        "-> <unk>), mean (the mean of both branches' logits; authors).")
    dm = s.add_mutually_exclusive_group()
    dm.add_argument("--do-sample", dest="do_sample", action="store_const", const=True, default=None,
                    help="sample (authors' code).")
    dm.add_argument("--greedy", dest="do_sample", action="store_const", const=False,
                    help="greedy arg-max (toolkit's default).")
    s.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0).")
    s.add_argument("--top-k", type=int, default=None, help="top-k when sampling (default 0: off).")
    s.add_argument("--top-p", type=float, default=None, help="top-p when sampling (default 1.0: off).")
    s.add_argument("--max-new-tokens", type=int, default=96, help="caption length limit (default 96, as csr eval).")
    s.add_argument("--pope-max-new-tokens", type=int, default=8, help="POPE answer length limit (default 8).")
    s.add_argument("--caption-prompt", help="override the CHAIR records' prompt "
                                            "(default: the record's, else 'Describe this image in detail.').")
    s.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the baselines (the same decoding with alpha = 0, beta = 0, and when sampling also "
                        "greedy; default: run them).")

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
    st.add_argument("--cf", default="none", choices=SAMPLING_INPUTS,
                    help="content-free branch of the debias rows (default none).")
    st.add_argument("--max-new-tokens", type=int, default=96, help="caption length limit (default 96).")
    st.add_argument("--pope-max-new-tokens", type=int, default=8, help="POPE answer length limit (default 8).")
    st.add_argument("--pope-suffix", default="", help="text appended to each POPE question (default none).")
    return ap


# ---------------------------------------------------------------------------------------------


def _pick(explicit, recipe_value):
    return recipe_value if explicit is None else explicit


def calibration_settings(args) -> dict:
    """The calibration settings: the recipe's, with every explicitly given flag overriding it."""
    from csr.debias.recipes import calibration_recipe

    try:
        r = calibration_recipe(args.recipe)
    except ValueError as e:
        raise SystemExit(f"csr debias calibrate: {e}")
    cf = list(r.cf) if args.cf is None else [x.strip() for x in args.cf.split(",") if x.strip()]
    if not cf or any(x not in CALIBRATION_INPUTS for x in cf):
        raise SystemExit(f"csr debias calibrate: --cf takes a subset of {','.join(CALIBRATION_INPUTS)}, "
                         f"got {args.cf!r}")
    top_k = _pick(args.label_top_k, r.label_top_k)
    if top_k < 0:
        raise SystemExit(f"csr debias calibrate: --label-top-k must be >= 0, got {top_k}")
    eps = _pick(args.cf_epsilon, r.epsilon)
    if eps < 0:
        raise SystemExit(f"csr debias calibrate: --cf-epsilon must be >= 0, got {eps}")
    suffix = args.suffix
    if suffix is None and args.pope:
        suffix = r.pope_suffix or None
    return {"recipe": args.recipe, "cf_inputs": cf, "combine": _pick(args.cf_combine, r.combine), "epsilon": eps,
            "label_top_k": top_k, "merge_variants": _pick(args.merge_variants, r.merge_variants),
            "mode": _pick(args.mode, r.mode), "per_sample": _pick(args.per_sample, r.per_sample), "suffix": suffix}


def cmd_calibrate(args) -> dict:
    from csr.debias.closed_set import calibrate_file
    from csr.io import atomic_write_json
    from csr.models import load_policy

    st = calibration_settings(args)
    kind, path = ("pope", args.pope) if args.pope else ("mc", args.mc)
    model, processor = load_policy(args.model, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code)
    result = calibrate_file(model, processor, path, kind, out_dir=args.out, image_root=args.image_root,
                            labels=args.labels, suffix=st["suffix"], limit=args.limit, cf_inputs=st["cf_inputs"],
                            mode=st["mode"], per_sample=st["per_sample"], batch_size=args.batch_size, seed=args.seed,
                            merge_variants=st["merge_variants"], grid=args.grid, combine=st["combine"],
                            epsilon=st["epsilon"], label_top_k=st["label_top_k"])
    result = {"model": args.model, "recipe": st["recipe"], **result}
    if kind == "pope" and args.greedy_baseline:
        from csr.debias.closed_set import load_closed_set
        from csr.eval.pope import score_pope
        from csr.eval.run import generate_answers

        data = load_closed_set(path, kind, image_root=args.image_root, labels=args.labels, suffix=st["suffix"],
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


def sampling_settings(args) -> dict:
    """The debias-sampling settings: the recipe's, with every explicitly given flag overriding it."""
    from csr.debias.recipes import sampling_recipe

    try:
        r = sampling_recipe(args.recipe)
    except ValueError as e:
        raise SystemExit(f"csr debias sample: {e}")
    st = {"recipe": args.recipe, "alpha": _pick(args.alpha, r.alpha), "beta": _pick(args.beta, r.beta),
          "pope_beta": _pick(args.pope_beta, r.pope_beta), "pope_suffix": _pick(args.pope_suffix, r.pope_suffix),
          "cf": _pick(args.cf, r.cf), "do_sample": _pick(args.do_sample, r.do_sample),
          "temperature": _pick(args.temperature, r.temperature), "top_k": _pick(args.top_k, r.top_k),
          "top_p": _pick(args.top_p, r.top_p), "seed": args.seed}
    for key in ("beta", "pope_beta"):
        if not 0.0 <= st[key] <= 1.0:
            raise SystemExit(f"csr debias sample: --{key.replace('_', '-')} must lie in [0, 1], got {st[key]}")
    return st


def cmd_sample(args) -> dict:
    from csr.debias.sampling import debiased_generate
    from csr.eval.chair import caption_report, load_synonyms
    from csr.eval.pope import parse_yes_no
    from csr.eval.run import DEFAULT_CAPTION_PROMPT
    from csr.data import read_raw_records, record_image_paths
    from csr.io import atomic_write_json, write_jsonl
    from csr.models import load_policy

    if not args.chair and not args.pope:
        raise SystemExit("csr debias sample: give --chair and/or --pope")
    st = sampling_settings(args)
    model, processor = load_policy(args.model, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code)
    out = Path(args.out)
    decoding = {k: st[k] for k in ("do_sample", "temperature", "top_k", "top_p")}
    result = {"model": args.model, "settings": st}
    for task, path in (("chair", args.chair), ("pope", args.pope)):
        if not path:
            continue
        path = Path(path)
        recs = read_raw_records(path)[:args.limit]
        images = record_image_paths(recs, path, args.image_root)
        table = None
        if task == "chair":
            syn = Path(args.synonyms) if args.synonyms else path.parent / "synonyms.json"
            if not syn.is_file():
                raise FileNotFoundError(f"CHAIR needs a synonym table: '{syn}' does not exist (pass --synonyms)")
            table = load_synonyms(syn)
            questions = [args.caption_prompt or r.get("prompt") or DEFAULT_CAPTION_PROMPT for r in recs]
            mnt, beta = args.max_new_tokens, st["beta"]
        else:
            sfx = st["pope_suffix"]
            questions = [(r["text"] + (" " + sfx if sfx else "")).strip() for r in recs]
            mnt, beta = args.pope_max_new_tokens, st["pope_beta"]
        # the debiased run, the same decoding without the content-free branch, and (when sampling) greedy
        runs = [("debiased", st["alpha"], beta, decoding)]
        if args.baseline:
            runs.append(("baseline", 0.0, 0.0, decoding))
            if decoding["do_sample"]:
                runs.append(("greedy", 0.0, 0.0, {**decoding, "do_sample": False}))
        result[task] = {}
        for name, alpha, b, dec in runs:
            texts = debiased_generate(model, processor, images, questions, alpha=alpha, beta=b,
                                      max_new_tokens=mnt, cf_mode=st["cf"], batch_size=args.batch_size,
                                      seed=args.seed, **dec)
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
