"""Benchmark: sentence-level search, fast path against the official per-node reference, one run.

    python scripts/bench_generate.py --size tiny --prompts 4
    python scripts/bench_generate.py --size mid --prompts 4          # ~0.8 GB random LLaVA, CPU
    python scripts/bench_generate.py --size 7b --dtype bfloat16 --device cuda --prompts 16   # GPU

Both implementations grow the same trees (same model, prompts, settings, machine); the script
checks that the trees match and reports candidates (sentences) per second, peak memory and the
ratio. Models are random-initialised from config (no download): `7b` has LLaVA-1.5-7B's shape
(CLIP ViT-L/14-336 tower, 576 image tokens, Llama-7B language model). Results are appended to
benchmarks/results.jsonl (and printed as a Markdown row for benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csr.bench.common import (LLAVA_SHAPES, build_llava, param_count_m, peak_memory_mb, run_search,  # noqa: E402
                               search_inputs)
from csr.generate.tree import TreeSettings  # noqa: E402


def run_one(impl: str, size: str, n_prompts: int, dtype_name: str, device: str, settings: TreeSettings,
            num_candidates: int, max_new_tokens: int) -> tuple[list, dict]:
    """Grow the trees with one implementation; (trees, stats). Run in its own process for memory."""
    model, processor = build_llava(size, dtype_name, device)
    images, prompts = search_inputs(processor, n_prompts, model.config.vision_config.image_size)
    model_mb = peak_memory_mb(device)
    trees, stats = run_search(impl, model, processor, images, prompts, settings,
                              num_candidates=num_candidates, max_new_tokens=max_new_tokens)
    return trees, {"seconds": round(stats["seconds"], 2), "candidates": stats["candidates"],
                   "candidates_per_s": stats["candidates_per_s"], "peak_mem_mb": stats["peak_mem_mb"],
                   "model_mem_mb": model_mb, "params_m": param_count_m(model)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(LLAVA_SHAPES), default="tiny")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-candidates", type=int, default=5)
    p.add_argument("--sentence-beam-width", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-sentences", type=int, default=3)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", default="benchmarks/results.jsonl")
    p.add_argument("--only", choices=["fast", "reference"], help=argparse.SUPPRESS)  # child process
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    settings = TreeSettings(args.sentence_beam_width, "official", 1024, args.max_sentences)
    if args.only:
        trees, stats = run_one(args.only, args.size, args.prompts, args.dtype, args.device, settings,
                               args.num_candidates, args.max_new_tokens)
        Path(args.dump).write_text(json.dumps({"trees": trees, "stats": stats}))
        return 0

    # each implementation in a fresh process, so peak memory is its own
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ["fast"] + ([] if args.skip_reference else ["reference"]):
            dump = Path(tmp) / f"{impl}.json"
            child = [a for a in (argv if argv is not None else sys.argv[1:])]
            subprocess.run([sys.executable, __file__, *child, "--only", impl, "--dump", str(dump)], check=True)
            results[impl] = json.loads(dump.read_text())
    fast = results["fast"]["stats"]
    result = {"bench": "generate", "size": args.size, "params_m": fast.pop("params_m"), "device": args.device,
              "dtype": args.dtype, "prompts": args.prompts, "num_candidates": args.num_candidates,
              "sentence_beam_width": args.sentence_beam_width, "max_new_tokens": args.max_new_tokens,
              "max_sentences": args.max_sentences, "fast": fast}
    if "reference" in results:
        ref = results["reference"]["stats"]
        ref.pop("params_m")
        same = all([n["text"] for n in a] == [n["text"] for n in b]
                   for a, b in zip(results["reference"]["trees"], results["fast"]["trees"]))
        result.update(reference=ref, trees_identical=same,
                      speedup=round(fast["candidates_per_s"] / ref["candidates_per_s"], 2),
                      peak_mem_ratio=round(fast["peak_mem_mb"] / ref["peak_mem_mb"], 2))
    result.update(machine=platform.machine(), cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                  gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                  date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
