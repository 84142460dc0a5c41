"""`csr world`: build the grounded world and its base models once, cached.

    <out>/                 world data (csr.world.generate), finished when <out>/DONE.json exists
    <out>/models/clip/     the world CLIP (open_clip folder: open_clip_config.json + safetensors)
    <out>/models/llava/    the base LLaVA (its vision tower taken from that CLIP), SFT on train/sft.jsonl

Each part is built into a temporary folder and renamed into place with its DONE.json, so an
interrupted build is redone, never half-used. The default recipe (recipes/world/default.yaml)
calls `ensure_world` before its first round.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from csr.io import is_done, mark_done, read_done

log = logging.getLogger(__name__)


def _build_into(target: Path, build) -> dict:
    """Run `build(tmp_dir) -> summary` in a temp folder, mark it done, rename it to `target`."""
    if is_done(target):
        return read_done(target)
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    summary = build(tmp) or {}
    mark_done(tmp, summary)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return summary


def ensure_world(out: str | Path, *, seed: int = 0, clip_steps: int | None = None,
                 llava_steps: int | None = None, world_config=None) -> dict:
    """Build whatever part of the world in `out` is missing; returns the per-part summaries."""
    from csr.world.generate import WorldConfig, generate_world
    from csr.world.train_base import train_clip, train_llava

    out = Path(out)
    started = time.perf_counter()
    summary = {}
    if is_done(out):
        summary["world"] = read_done(out)
    else:
        log.info("[world] generating the world in %s", out)
        summary["world"] = generate_world(world_config or WorldConfig(seed=seed), out) or {}
        mark_done(out, summary["world"])
    clip_kw = {"steps": clip_steps} if clip_steps else {}
    llava_kw = {"steps": llava_steps} if llava_steps else {}
    log.info("[world] base CLIP")
    summary["clip"] = _build_into(out / "models" / "clip",
                                  lambda tmp: train_clip(out, tmp, seed=seed, **clip_kw))
    log.info("[world] base LLaVA")
    summary["llava"] = _build_into(out / "models" / "llava",
                                   lambda tmp: train_llava(out, out / "models" / "clip", tmp, seed=seed, **llava_kw))
    log.info("[world] ready in %.0f s: %s", time.perf_counter() - started, out)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build the grounded synthetic world and its base models (cached).")
    p.add_argument("--out", default="data/world", help="World folder.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-steps", type=int, help="CLIP training steps (default: csr.world.train_base's).")
    p.add_argument("--llava-steps", type=int, help="LLaVA SFT steps (default: csr.world.train_base's).")
    args = p.parse_args(argv)
    ensure_world(args.out, seed=args.seed, clip_steps=args.clip_steps, llava_steps=args.llava_steps)
    print(f"world ready: {args.out} (models in {args.out}/models)")
    return 0
