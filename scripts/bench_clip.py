"""Benchmark: CLIP scoring of tree sentences, batched (each image once) against the official
per-sentence loop (one image + one sentence per CLIP call), same model and inputs, one run.

    python scripts/bench_clip.py --model tiny --images 16 --sentences 40
    python scripts/bench_clip.py --model ViT-B-16 --images 16 --sentences 40        # random init, CPU
    python scripts/bench_clip.py --model ViT-L-14-336 --device cuda --images 64 --sentences 120

Open_clip models are built with random weights (no download): speed does not depend on them.
Results are appended to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csr.bench.common import build_clip, clip_inputs, clip_loop_scores, sync  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--sentences", type=int, default=40, help="Sentences per image (one tree's nodes).")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results.jsonl")
    args = p.parse_args(argv)

    clip = build_clip(args.model, args.device, args.batch_size)
    images, texts = clip_inputs(args.images, args.sentences)
    n = args.images * args.sentences
    with torch.no_grad():
        clip.scores_many(images[:1], [texts[0][:2]])  # warm-up
        sync(args.device)
        start = time.perf_counter()
        batched = clip.scores_many(images, texts)
        sync(args.device)
        t_batched = time.perf_counter() - start

        start = time.perf_counter()
        loop = clip_loop_scores(clip, images, texts)
        sync(args.device)
        t_loop = time.perf_counter() - start
    max_diff = max(abs(a - b) for ra, rb in zip(batched, loop) for a, b in zip(ra, rb))
    result = {"bench": "clip_score", "model": args.model, "device": args.device, "images": args.images,
              "sentences_per_image": args.sentences, "batch_size": args.batch_size,
              "batched": {"seconds": round(t_batched, 3), "sentences_per_s": round(n / t_batched, 1)},
              "per_sentence_loop": {"seconds": round(t_loop, 3), "sentences_per_s": round(n / t_loop, 1)},
              "speedup": round(t_loop / t_batched, 2), "max_abs_score_diff": round(max_diff, 6),
              "machine": platform.machine(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
