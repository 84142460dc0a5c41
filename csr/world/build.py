"""`csr world`: build the grounded world and its base models once, cached.

    csr world --out data/world [--seed 0 --n-train 3000 --n-test 200 --n-prompts 256]
              [--bias 0.9 --small-fraction 0.0 --caption-noise 0.6] [--clip-steps N --llava-steps N] [--eval] [--force]
    csr world align --world data/world [--out DIR] [--lm-steps N --align-steps N ...] [--eval]
    csr world suite build|run|table --data DIR [--suite recipes/world/suite.yaml]   (csr.world.suite)

    <out>/                 world data (csr.world.generate), finished when <out>/DONE.json exists
    <out>/models/clip/     the world CLIP (open_clip folder: open_clip_config.json + safetensors)
    <out>/models/llava/    the base LLaVA (its vision tower taken from that CLIP), SFT on train/sft.jsonl
    <out>/models/llava/base_eval/   with --eval: POPE and CHAIR of the base LLaVA on test/

Each part is built into a temporary folder and renamed into place with its DONE.json, so an
interrupted build is redone, never half-used. Each DONE.json records the settings the part was
built with (and `WORLD_VERSION`); a part finished with other settings, or by an older version of
this code, is rebuilt (with a warning), and so is everything built on it. Called without a world
config, `ensure_world` keeps whatever world of the same seed is there. The default recipe
(recipes/world/default.yaml) calls `ensure_world` before its first round.

`csr world align` builds the alignment-only LLaVA (`csr.world.train_base.train_aligned_llava`) of a
finished world into `--out` (default <world>/models/llava-aligned), the starting point of the VIG
comparison (docs/results/vig.md); it reads the world and its CLIP and writes nothing else.

For a recipe: ``model.model_name_or_path: <out>/models/llava``, ``data.prompts:
<out>/train/prompts.jsonl``, ``data.image_root: <out>/train``, ``score.clip_model: <out>/models/clip``,
eval files ``<out>/test/pope.jsonl`` and ``<out>/test/chair.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from csr.io import is_done, mark_done, read_done

log = logging.getLogger(__name__)

# Bump when generation or training changes what a finished folder holds: old folders get rebuilt.
# v3: captions name absent partners (caption_partner_noise 0.6), no tiny objects.
WORLD_VERSION = 3


def _settings_of(folder: Path) -> dict | None:
    return read_done(folder).get("settings") if is_done(folder) else None


def _build_into(target: Path, settings: dict, build, force: bool = False) -> dict:
    """Run `build(tmp_dir) -> summary` in a temp folder, mark it done, rename it to `target`.

    Skipped when `target` is done with the same `settings`.
    """
    if is_done(target) and not force:
        if _settings_of(target) == settings:
            return read_done(target)
        log.warning("[world] %s was built with other settings (or an older csr); rebuilding it", target)
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    summary = build(tmp) or {}
    summary = {**summary, "settings": settings}
    mark_done(tmp, summary)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return summary


def _world_data(out: Path, world_config, seed: int, force: bool) -> dict:
    from csr.world.generate import WorldConfig, generate_world

    existing = _settings_of(out)
    if existing is not None and not force and existing.get("version") == WORLD_VERSION:
        if world_config is None and existing["config"].get("seed") == seed:
            return read_done(out)
        if world_config is not None and existing["config"] == world_config.to_dict():
            return read_done(out)
    if existing is not None or is_done(out):
        log.warning("[world] the world in %s was built with other settings (or an older csr); rebuilding it", out)
    cfg = world_config or WorldConfig(seed=seed)
    (out / "DONE.json").unlink(missing_ok=True)
    for part in ("train", "test", "models"):
        shutil.rmtree(out / part, ignore_errors=True)
    log.info("[world] generating the world in %s", out)
    summary = generate_world(cfg, out) or {}
    summary["settings"] = {"version": WORLD_VERSION, "config": cfg.to_dict()}
    mark_done(out, summary)
    return summary


def ensure_world(out: str | Path, *, seed: int = 0, clip_steps: int | None = None,
                 llava_steps: int | None = None, world_config=None, evaluate: bool = False,
                 force: bool = False) -> dict:
    """Build whatever part of the world in `out` is missing or stale; returns the per-part summaries.

    `clip_steps` / `llava_steps` default to `csr.world.train_base`'s defaults. With `evaluate`, the
    base LLaVA's POPE and CHAIR on test/ are computed once into models/llava/base_eval/.
    """
    from csr.world.train_base import DEFAULT_CLIP, DEFAULT_LLAVA, train_clip, train_llava

    from csr.runstate import WORLD_ENTRIES, legacy_world, claim_folder

    out = claim_folder(out, "the world folder", WORLD_ENTRIES, legacy_world)  # never a user's folder
    started = time.perf_counter()
    timings = {}
    summary = {}
    t = time.perf_counter()
    summary["world"] = _world_data(out, world_config, seed, force)
    timings["world"] = time.perf_counter() - t
    world_settings = summary["world"]["settings"]
    clip_kw = {**DEFAULT_CLIP, **({"steps": clip_steps} if clip_steps else {}), "seed": seed}
    llava_kw = {**DEFAULT_LLAVA, **({"steps": llava_steps} if llava_steps else {}), "seed": seed}
    clip_settings = {"world": world_settings, "train": clip_kw}
    llava_settings = {"clip": clip_settings, "train": llava_kw}

    log.info("[world] base CLIP")
    t = time.perf_counter()
    summary["clip"] = _build_into(out / "models" / "clip", clip_settings,
                                  lambda tmp: train_clip(out, tmp, **clip_kw), force)
    timings["clip"] = time.perf_counter() - t
    log.info("[world] base LLaVA")
    t = time.perf_counter()
    summary["llava"] = _build_into(out / "models" / "llava", llava_settings,
                                   lambda tmp: train_llava(out, out / "models" / "clip", tmp, **llava_kw), force)
    timings["llava"] = time.perf_counter() - t
    if evaluate:
        eval_dir = out / "models" / "llava" / "base_eval"
        if (eval_dir / "metrics.json").is_file():
            summary["base_eval"] = json.loads((eval_dir / "metrics.json").read_text())
        else:
            from csr.eval.run import evaluate_model

            t = time.perf_counter()
            summary["base_eval"] = evaluate_model(str(out / "models" / "llava"), out / "test" / "pope.jsonl",
                                                  out / "test" / "chair.jsonl", out_dir=eval_dir)
            timings["eval"] = time.perf_counter() - t
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    log.info("[world] ready in %.0f s: %s", time.perf_counter() - started, out)
    return summary


def build_aligned(world: str | Path, out: str | Path | None = None, *, seed: int = 0, evaluate: bool = False,
                  force: bool = False, **train) -> dict:
    """The alignment-only LLaVA of a finished world in `out` (cached by its settings, like the world's parts)."""
    from csr.world.train_base import DEFAULT_ALIGNED, train_aligned_llava

    world = Path(world)
    for part in (world, world / "models" / "clip"):
        if not is_done(part):
            raise FileNotFoundError(f"'{part}' is not a finished world part (no DONE.json): build it with "
                                    f"`csr world --out {world}`")
    out = Path(out) if out else world / "models" / "llava-aligned"
    kw = {**DEFAULT_ALIGNED, **{k: v for k, v in train.items() if v is not None}, "seed": seed}
    settings = {"world": read_done(world).get("settings"), "clip": read_done(world / "models" / "clip").get("settings"),
                "train": kw}
    summary = {"aligned": _build_into(out, settings, lambda tmp: train_aligned_llava(world, world / "models" / "clip",
                                                                                      tmp, **kw), force)}
    if evaluate:
        eval_dir = out / "eval"
        if (eval_dir / "metrics.json").is_file():
            summary["eval"] = json.loads((eval_dir / "metrics.json").read_text())
        else:
            from csr.eval.run import evaluate_model

            summary["eval"] = evaluate_model(str(out), world / "test" / "pope.jsonl", world / "test" / "chair.jsonl",
                                             out_dir=eval_dir)
    return summary


def main_align(argv=None) -> int:
    from csr.world.train_base import DEFAULT_ALIGNED as D

    p = argparse.ArgumentParser(prog="csr world align",
                                description="Build the alignment-only LLaVA of a finished world (language-model "
                                            "stage, then the projector alone on captions).")
    p.add_argument("--world", required=True, help="A finished world folder (`csr world --out DIR`); only read.")
    p.add_argument("--out", help="Output model folder (default <world>/models/llava-aligned).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the model's init and batches (default 0).")
    p.add_argument("--lm-steps", type=int, help=f"language-model stage steps (default {D['lm_steps']}).")
    p.add_argument("--align-steps", type=int, help=f"projector alignment steps (default {D['align_steps']}).")
    p.add_argument("--batch-size", type=int, help=f"batch size of both stages (default {D['batch_size']}).")
    p.add_argument("--lm-lr", type=float, help=f"peak learning rate of the language-model stage (default {D['lm_lr']}).")
    p.add_argument("--align-lr", type=float, help=f"peak learning rate of the alignment stage (default {D['align_lr']}).")
    p.add_argument("--eval", action="store_true", help="evaluate it on the world's test split (POPE, CHAIR).")
    p.add_argument("--force", action="store_true", help="rebuild even when it is done with the same settings")
    a = p.parse_args(argv)
    summary = build_aligned(a.world, a.out, seed=a.seed, evaluate=a.eval, force=a.force, lm_steps=a.lm_steps,
                            align_steps=a.align_steps, batch_size=a.batch_size, lm_lr=a.lm_lr, align_lr=a.align_lr)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "settings"} if isinstance(v, dict) else v
                      for k, v in summary.items()}, indent=2, default=str)[:4000])
    return 0


def main(argv=None) -> int:
    """`csr world [options]`: build one world (`csr world align|suite` go through `csr.world.cli`)."""
    from csr.world.generate import WorldConfig

    d = WorldConfig()
    p = argparse.ArgumentParser(prog="csr world",
                                description="Build the grounded synthetic world and its base models (cached). "
                                            "`csr world align --help`: the alignment-only LLaVA; `csr world suite "
                                            "--help`: several worlds, the recipe's arms on each, one table.")
    p.add_argument("--out", default="data/world", help="World folder.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, help=f"training images (default {d.n_train})")
    p.add_argument("--n-test", type=int, help=f"test images for POPE and CHAIR (default {d.n_test})")
    p.add_argument("--n-prompts", type=int, help=f"CSR prompt images (default {d.n_prompts})")
    p.add_argument("--bias", type=float,
                   help=f"training split: probability that a shape's partner joins it (default {d.cooccur_bias})")
    p.add_argument("--small-fraction", type=float,
                   help=f"share of objects drawn tiny, their shape hard to see (default {d.small_fraction})")
    p.add_argument("--caption-noise", type=float,
                   help=f"training captions: probability of naming an absent partner (default {d.caption_partner_noise})")
    p.add_argument("--clip-steps", type=int, help="CLIP training steps (default: csr.world.train_base's).")
    p.add_argument("--llava-steps", type=int, help="LLaVA SFT steps (default: csr.world.train_base's).")
    p.add_argument("--eval", action="store_true", help="evaluate the base LLaVA on test/ (POPE, CHAIR)")
    p.add_argument("--force", action="store_true", help="rebuild every part even when it is done")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1, as `csr run`'s world recipe: the base models depend on it)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    world_config = None
    overrides = {k: v for k, v in {"n_train": args.n_train, "n_test": args.n_test, "n_prompts": args.n_prompts,
                                   "cooccur_bias": args.bias, "small_fraction": args.small_fraction,
                                   "caption_partner_noise": args.caption_noise}.items()
                 if v is not None}
    if overrides:
        world_config = WorldConfig(seed=args.seed, **overrides)
        world_config.validate()
    summary = ensure_world(args.out, seed=args.seed, clip_steps=args.clip_steps, llava_steps=args.llava_steps,
                           world_config=world_config, evaluate=args.eval, force=args.force)
    print(json.dumps({k: summary[k] for k in ("seconds", "base_eval") if k in summary}, indent=2))
    print(f"world ready: {args.out} (models in {args.out}/models)")
    return 0
