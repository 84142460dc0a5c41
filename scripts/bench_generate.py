"""Benchmark: sentence-level search, the per-node reference against the two cached paths, one run.

    python scripts/bench_generate.py --size tiny --prompts 8
    python scripts/bench_generate.py --size mid --prompts 4 --threads 1   # ~0.8 GB random LLaVA, CPU
    python scripts/bench_generate.py --size 7b --dtype bfloat16 --device cuda --prompts 16   # GPU

Three paths grow the same trees (same model, prompts, settings, machine): "reference" (the
official semantics: every node re-encoded, one at a time), "fast" (the cached path with a prompt
copy per row, generate.prefix_attention=copies) and "cascade" (one prompt copy per tree,
prefix_attention=cascade). Each path runs `--repeats` times, interleaved (ref, fast, cascade, ref,
...), each run in its own process so its peak memory is its own; the JSON line holds each path's
median candidates (sentences) per second and peak memory, the token-rows each path ran per tree
(`token_rows`: prefill, node, decode), the ratios against the reference, the load average before
and after, and the thread count. The trees of every run must match.

A busy machine gives ratios that do not hold (the reference suffers more from contention): with
the 1-minute load average above the core count the script refuses to start unless --allow-busy.
Models are random-initialised from config (no download): `7b` has LLaVA-1.5-7B's shape (CLIP
ViT-L/14-336 tower, 576 image tokens, Llama-7B language model). The line is appended to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csr.bench.common import (LLAVA_SHAPES, build_llava, busy_reason, machine_info, param_count_m,  # noqa: E402
                              peak_memory_mb, run_search, search_inputs, summarise_runs)
from csr.generate.tree import TreeSettings  # noqa: E402

# JSON key -> run_search implementation ("fast" keeps its name from earlier records: the copies path)
PATHS = {"reference": "reference", "fast": "copies", "cascade": "cascade"}


def run_one(path: str, args, settings: TreeSettings) -> tuple[list, dict]:
    """Grow the trees with one path; (trees, stats). Run in its own process for memory."""
    model, processor = build_llava(args.size, args.dtype, args.device)
    images, prompts = search_inputs(processor, args.prompts, model.config.vision_config.image_size)
    model_mb = peak_memory_mb(args.device)
    trees, stats = run_search(PATHS[path], model, processor, images, prompts, settings,
                              num_candidates=args.num_candidates, max_new_tokens=args.max_new_tokens)
    return trees, {"seconds": round(stats["seconds"], 2), "candidates": stats["candidates"],
                   "candidates_per_s": stats["candidates_per_s"], "peak_mem_mb": stats["peak_mem_mb"],
                   "model_mem_mb": model_mb, "params_m": param_count_m(model), "threads": torch.get_num_threads(),
                   "token_rows": stats["token_rows"]}


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
    p.add_argument("--repeats", type=int, default=3, help="runs of each path, interleaved; the median is reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    p.add_argument("--skip-reference", action="store_true", help="leave the reference out (no ratios)")
    p.add_argument("--allow-busy", action="store_true",
                   help="run even when the 1-minute load average is above the core count (not for the record)")
    p.add_argument("--out", default="benchmarks/results.jsonl")
    p.add_argument("--only", choices=sorted(PATHS), help=argparse.SUPPRESS)  # child process
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TreeSettings(args.sentence_beam_width, "official", 1024, args.max_sentences)
    if args.only:
        trees, stats = run_one(args.only, args, settings)
        Path(args.dump).write_text(json.dumps({"trees": trees, "stats": stats}))
        return 0

    paths = [x for x in args.paths.split(",") if x and not (args.skip_reference and x == "reference")]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown or not paths:
        p.error(f"--paths {args.paths!r}: choose from {', '.join(PATHS)}")
    load_before = [round(x, 2) for x in os.getloadavg()]
    busy = busy_reason(load_before[0], os.cpu_count() or 1)
    if busy and not args.allow_busy:
        print(f"bench_generate: refusing to record: {busy}. Wait for a quiet machine, or pass --allow-busy "
              f"(and do not record the figures).", file=sys.stderr)
        return 2

    runs: dict[str, list] = {path: [] for path in paths}
    child = list(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for path in paths:  # interleaved: a change in the machine's load hits every path alike
                dump = Path(tmp) / f"{path}{i}.json"
                subprocess.run([sys.executable, __file__, *child, "--only", path, "--dump", str(dump)], check=True)
                runs[path].append(json.loads(dump.read_text()))
                stats = runs[path][-1]["stats"]
                print(f"run {i + 1}/{args.repeats} {path}: {stats['candidates_per_s']} cand/s, "
                      f"peak {stats['peak_mem_mb']} MB, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    load_after = [round(x, 2) for x in os.getloadavg()]

    first = runs[paths[0]][0]
    texts = [[n["text"] for n in tree] for tree in first["trees"]]
    identical = all([[n["text"] for n in tree] for tree in run["trees"]] == texts
                    for path in paths for run in runs[path])
    result = {"bench": "generate", "size": args.size, "params_m": first["stats"]["params_m"], "device": args.device,
              "dtype": args.dtype, "prompts": args.prompts, "num_candidates": args.num_candidates,
              "sentence_beam_width": args.sentence_beam_width, "max_new_tokens": args.max_new_tokens,
              "max_sentences": args.max_sentences, "repeats": args.repeats, "threads": first["stats"]["threads"]}
    for path in paths:
        result[path] = summarise_runs([run["stats"] for run in runs[path]])
    if "reference" in runs:
        ref = result["reference"]
        for path in paths:
            if path != "reference":
                key = "" if path == "fast" else f"{path}_"
                result[f"{key}speedup"] = round(result[path]["candidates_per_s"] / ref["candidates_per_s"], 2)
                result[f"{key}peak_mem_ratio"] = round(result[path]["peak_mem_mb"] / ref["peak_mem_mb"], 2)
    result.update(trees_identical=identical, load_avg_before=load_before, load_avg_after=load_after,
                  busy=bool(busy), **machine_info(args.device))
    result["cpu_threads"] = result["threads"]  # the runs' own count, not this parent's
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
