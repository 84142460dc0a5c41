"""`csr vig`: Visual Information Gain (docs/method.md §3).

    csr vig score  --model DIR --data FILE --out DIR [--content-free blur|none|blank] [--blur-radius R]
                   [--blur-units fraction|pixels] [--blank-color R,G,B] [--batch-size N] [--limit N]
    csr vig view   --scores DIR [--id ID | --index N] [--html FILE] [--terminal] [--histogram FILE]
                   [--keep-percent 70] [--tau-mode keep_boundary|percentile]
    csr vig train  --model DIR --scores DIR --out DIR [--selection vig|none] [--keep-percent 70]
                   [--tau-mode ...] [--no-token-mask] [--full] [key=value ...]
    csr vig rescore       --scored DIR --policy DIR --out DIR --config RECIPE [--vig-weight W] ...
                          (W and the scale: the recipe's score.vig_weight / vig_scale unless given)
    csr vig filter-pairs  --pairs DIR --policy DIR --out DIR [--min-gap G] ...

`score` writes vig.jsonl (one line per sample: token ids and strings, log-probs under the image and
under the content-free input, per-token and sample VIG), vig_histogram.png and DONE.json. `train`
runs VIG-selective SFT with TRL's SFTTrainer (see `csr.vig.train`). `rescore` and `filter-pairs`
apply the CSR reward term and pair filter (`csr.vig.reward`) to finished score / pairs stages.
"""

from __future__ import annotations

import argparse
import json
import sys

from csr.content_free import BLUR_UNITS, VIG_INPUTS
from csr.score.reward import VIG_SCALES
from csr.vig.collate import BOS_MODES
from csr.vig.maths import TAU_MODES
from csr.vig.records import TEXT_ONLY_MODES, TURN_MODES


def _color(text: str) -> tuple:
    parts = [int(x) for x in text.replace(" ", "").split(",")]
    if len(parts) != 3 or not all(0 <= x <= 255 for x in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not R,G,B with values 0-255")
    return tuple(parts)


def _add_vig_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("content-free input and batching")
    g.add_argument("--content-free", choices=VIG_INPUTS, default="blur",
                   help="I_cf: blur (paper: Gaussian-blurred copy), none (no image), blank (plain image).")
    g.add_argument("--blur-radius", type=float, default=0.1,
                   help="Gaussian blur radius (sigma); see --blur-units (default 0.1 of the shorter side: the "
                        "toolkit's choice, the paper does not state its blur strength).")
    g.add_argument("--blur-units", choices=BLUR_UNITS, default="fraction",
                   help="fraction: of the image's shorter side; pixels: of the original image.")
    g.add_argument("--blank-color", type=_color, default=(255, 255, 255), help="Colour of the blank image (R,G,B).")
    g.add_argument("--batch-size", type=int, default=8, help="Samples per forward (out of memory halves it).")
    g.add_argument("--max-length", type=int, default=None,
                   help="Truncate as SFTConfig.max_length does (default: no truncation).")
    g.add_argument("--add-bos", choices=BOS_MODES, default="auto",
                   help="BOS before the chat prompt as generation has it (auto: when the tokenizer adds one; "
                        "never: TRL's collation unchanged). Use the same value for `csr vig train`.")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))


def _options(a):
    from csr.vig.logprobs import VIGOptions

    return VIGOptions(content_free=a.content_free, blur_radius=a.blur_radius, blur_units=a.blur_units,
                      blank_color=a.blank_color, batch_size=a.batch_size, max_length=a.max_length,
                      add_bos=a.add_bos).validate()


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Model folder to fine-tune (the one that scored the data).")
    p.add_argument("--scores", required=True, help="A `csr vig score` output folder (or its vig.jsonl).")
    p.add_argument("--out", required=True, help="Output folder (adapter/, model/, selection.jsonl, DONE.json).")
    p.add_argument("--selection", choices=("vig", "none"), default=None, help="vig (default) or none (plain SFT).")
    p.add_argument("--keep-percent", type=float, default=None, help="p: keep the top p%% samples (default 70).")
    p.add_argument("--tau-mode", choices=TAU_MODES, default=None, help="Reading of τ (default keep_boundary).")
    p.add_argument("--no-token-mask", action="store_true", help="Sample selection only, no token masking.")
    p.add_argument("--full", action="store_true", help="Full fine-tuning instead of LoRA.")
    p.add_argument("overrides", nargs="*", help="key=value for any SelectiveSFTConfig / trl.SFTConfig field, "
                                                "e.g. max_steps=200 learning_rate=1e-4 activation_checkpointing=false")



def _score(a) -> int:
    from csr.vig.score import run_vig_score

    summary = run_vig_score(a.model, a.data, a.out, _options(a), image_root=a.image_root, limit=a.limit,
                            device=a.device, dtype=a.dtype, turns=a.turns, text_only=a.text_only)
    print(json.dumps(summary, indent=2))
    return 0


def _view(a) -> int:
    from csr.vig.maths import selection_threshold
    from csr.vig.score import read_scores
    from csr.vig.view import heatmap_html, heatmap_terminal, histogram_png

    records = read_scores(a.scores)
    if not records:
        print("csr vig view: no scored samples", file=sys.stderr)
        return 2
    tau = selection_threshold([r["vig"] for r in records], a.keep_percent, a.tau_mode)
    if a.histogram:
        print(f"histogram: {histogram_png([r['vig'] for r in records], a.histogram, tau=tau, keep_percent=a.keep_percent)}")
    if a.id is not None:
        matches = [r for r in records if str(r["id"]) == a.id]
        if not matches:
            print(f"csr vig view: no sample with id '{a.id}'", file=sys.stderr)
            return 2
        rec = matches[0]
    else:
        if not -len(records) <= a.index < len(records):
            print(f"csr vig view: --index {a.index} is out of range ({len(records)} samples)", file=sys.stderr)
            return 2
        rec = records[a.index]
    if a.html:
        heatmap_html(rec, a.html, tau=tau)
        print(f"heat map: {a.html}")
    if a.terminal or not (a.html or a.histogram):
        print(heatmap_terminal(rec, tau=tau, color=sys.stdout.isatty() and not a.no_color))
    return 0


def _train(a) -> int:
    from csr.vig.train import main_train

    return main_train(a)


def _rescore(a) -> int:
    import dataclasses

    from csr.config import load_config
    from csr.vig.reward import run_rescore

    cfg = load_config(a.config, a.overrides)
    flags = {k: v for k, v in (("vig_weight", a.vig_weight), ("vig_scale", a.vig_scale)) if v is not None}
    score_cfg = dataclasses.replace(cfg.score, **flags)  # a flag given on the command line beats the recipe
    score_cfg.validate()
    if score_cfg.vig_weight == 0:
        print("csr vig rescore: the VIG weight is 0 (score.vig_weight of the recipe): node VIG is stored but the "
              "reward stays CSR's; set score.vig_weight or pass --vig-weight W to add the term.", file=sys.stderr)
    summary = run_rescore(a.scored, a.out, a.policy, _options(a), score_cfg, device=a.device, dtype=a.dtype)
    print(json.dumps(summary, indent=2))
    return 0


def _filter_pairs(a) -> int:
    from csr.vig.reward import run_filter_pairs

    summary = run_filter_pairs(a.pairs, a.out, a.policy, _options(a), min_gap=a.min_gap, device=a.device,
                               dtype=a.dtype)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csr vig", description="Visual Information Gain: score, view, selective SFT.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="Per-token and per-sample VIG of (image, prompt, answer) data.")
    s.add_argument("--model", required=True, help="Model folder (or hub id) that scores.")
    s.add_argument("--data", required=True, help="JSON/JSONL of {id, image, prompt, answer} (also LLaVA "
                                                 "conversations, TRL prompt/completion).")
    s.add_argument("--out", required=True, help="Output folder (vig.jsonl, vig_histogram.png, DONE.json).")
    s.add_argument("--image-root", default=None, help="Folder image paths are relative to (default: the data file's).")
    s.add_argument("--limit", type=int, default=None, help="Score the first N records only.")
    s.add_argument("--turns", choices=TURN_MODES, default="all",
                   help="all: every assistant turn of a multi-turn conversation is scored (paper; LLaVA-665K is "
                        "multi-turn); first: the first human/assistant pair only.")
    s.add_argument("--text-only", choices=TEXT_ONLY_MODES, default="keep",
                   help="keep: a record with no image is a text-only sample, no VIG, kept unmasked by `train` "
                        "(paper); skip: such records are skipped (counted).")
    _add_vig_options(s)
    s.set_defaults(func=_score)

    v = sub.add_parser("view", help="Histogram of sample VIG; one sample's per-token VIG as a heat map.")
    v.add_argument("--scores", required=True, help="A `csr vig score` folder or its vig.jsonl.")
    v.add_argument("--id", default=None, help="Sample id to show.")
    v.add_argument("--index", type=int, default=0, help="Sample index to show (default 0) when --id is not given.")
    v.add_argument("--html", default=None, help="Write the heat map as a self-contained HTML file.")
    v.add_argument("--terminal", action="store_true", help="Print the heat map with terminal colours.")
    v.add_argument("--no-color", action="store_true", help="Terminal view without colours: [token|VIG].")
    v.add_argument("--histogram", default=None, help="Write a histogram PNG of sample VIG.")
    v.add_argument("--keep-percent", type=float, default=70.0, help="p for the τ shown (default 70).")
    v.add_argument("--tau-mode", choices=TAU_MODES, default="keep_boundary")
    v.set_defaults(func=_view)

    t = sub.add_parser("train", help="VIG-selective SFT (TRL SFTTrainer, LoRA or full).")
    add_train_arguments(t)
    t.set_defaults(func=_train)

    r = sub.add_parser("rescore", help="Add node VIG and the VIG reward term to a finished score stage.")
    r.add_argument("--scored", required=True, help="Folder of a finished score stage.")
    r.add_argument("--policy", required=True, help="The round's policy (the model that generated the trees).")
    r.add_argument("--out", required=True, help="Output folder (scored.jsonl, DONE.json) for `csr pairs --scored`.")
    r.add_argument("--config", default=None, help="Recipe (score.reward_lambda, calibration, self_reward, clip_clamp, "
                                                 "vig_weight, vig_scale).")
    r.add_argument("--vig-weight", type=float, default=None,
                   help="w_vig in R = λR_I + (1-λ)R_T + w_vig·R_VIG. Default: the recipe's score.vig_weight (0 "
                        "without --config or a score.vig_weight override: node VIG is stored, the reward is "
                        "CSR's); given, it overrides the recipe.")
    r.add_argument("--vig-scale", choices=VIG_SCALES, default=None,
                   help="contrast: R_VIG = 100·tanh(VIG/2); nats: VIG itself. Default: the recipe's "
                        "score.vig_scale (contrast); given, it overrides the recipe.")
    r.add_argument("overrides", nargs="*", help="section.key=value recipe overrides, e.g. score.reward_lambda=0.5")
    _add_vig_options(r)
    r.set_defaults(func=_rescore)

    f = sub.add_parser("filter-pairs", help="Drop pairs whose chosen response has lower VIG than the rejected.")
    f.add_argument("--pairs", required=True, help="Folder of a finished pairs stage.")
    f.add_argument("--policy", required=True, help="The round's policy.")
    f.add_argument("--out", required=True, help="Output folder (pairs.jsonl, DONE.json) for `csr train --pairs`.")
    f.add_argument("--min-gap", type=float, default=0.0, help="Drop when chosen_vig < rejected_vig + min_gap.")
    _add_vig_options(f)
    f.set_defaults(func=_filter_pairs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    from csr.cli import setup_logging

    setup_logging()
    sys.exit(main())
