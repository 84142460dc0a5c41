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
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csr.generate.expander import CachedLlavaExpander, LlavaExpander  # noqa: E402
from csr.generate.tree import TreeSettings, grow_tree, grow_trees  # noqa: E402
from csr.models import build_chat_prompt, sentence_end_ids  # noqa: E402

SIZES = {
    # name: (vision (hidden, layers, heads, image, patch), text (hidden, layers, heads, intermediate))
    "tiny": ((32, 2, 2, 32, 8), (64, 2, 4, 128)),
    "mid": ((512, 6, 8, 224, 14), (1024, 12, 16, 4096)),
    "7b": ((1024, 24, 16, 336, 14), (4096, 32, 32, 11008)),
}

QUESTIONS = ["Describe this image in detail.", "What is happening in this picture?",
             "Describe the objects in the image and where they are.", "What do you see?"]


def build_model(size: str, dtype: torch.dtype, device: str):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from csr.tiny import LLAVA_CHAT_TEMPLATE, build_tokenizer

    (vh, vl, vheads, img, patch), (th, tl, theads, inter) = SIZES[size]
    tokenizer = build_tokenizer(vocab_size=400)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vh, intermediate_size=vh * 4, num_hidden_layers=vl,
                                       num_attention_heads=vheads, image_size=img, patch_size=patch),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=th, intermediate_size=inter,
                                num_hidden_layers=tl, num_attention_heads=theads, num_key_value_heads=theads,
                                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": img},
                                                                  crop_size={"height": img, "width": img}),
                               tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark


def run_one(impl: str, size: str, n_prompts: int, dtype_name: str, device: str, settings: TreeSettings,
            num_candidates: int, max_new_tokens: int) -> tuple[list, dict]:
    """Grow the trees with one implementation; (trees, stats). Run in its own process for memory."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    model, processor = build_model(size, dtype, device)
    img = model.config.vision_config.image_size
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 20)]
    images = [Image.new("RGB", (img, img), colours[i % 4]) for i in range(n_prompts)]
    prompts = [build_chat_prompt(processor, QUESTIONS[i % 4]) for i in range(n_prompts)]
    kw = dict(num_candidates=num_candidates, diversity_penalty=3.0, max_new_tokens=max_new_tokens,
              stop_ids=sentence_end_ids(processor.tokenizer))

    def score(siblings):
        return [n["logprob_sum"] for n in siblings]

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mb = peak_memory_mb(device)
    start = time.perf_counter()
    with torch.no_grad():
        if impl == "fast":
            fast = CachedLlavaExpander(model, processor, **kw)
            cache = fast.encode_prompts(images, prompts)
            trees = grow_trees(lambda req: fast.expand_many(cache, req), [score] * n_prompts, settings)
        else:
            ref = LlavaExpander(model, processor, node_batch_size=1, **kw)
            trees = [grow_tree(lambda r, i=i: ref.expand(images[i], prompts[i], r), score, settings)
                     for i in range(n_prompts)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = sum(len(t) - 1 for t in trees)
    return trees, {"seconds": round(seconds, 2), "candidates": n, "candidates_per_s": round(n / seconds, 3),
                   "peak_mem_mb": round(peak_memory_mb(device), 1),
                   "model_mem_mb": round(base_mb, 1),
                   "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
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
