"""Pieces every benchmark shares: models at named shapes, the two search implementations, the
CLIP per-sentence loop, memory and machine facts, and the largest-batch probe."""

from __future__ import annotations

import gc
import os
import platform
import resource
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

import torch

from csr.models import DTYPES, is_oom


@dataclass(frozen=True)
class LlavaShape:
    vision: tuple[int, int, int, int, int]  # hidden, layers, heads, image size, patch size
    text: tuple[int, int, int, int]         # hidden, layers, heads, MLP width
    vocab_size: int | None = None           # None: the tiny tokenizer's own; else padded up to this


LLAVA_SHAPES = {
    "tiny": LlavaShape((32, 2, 2, 32, 8), (64, 2, 4, 128)),
    "mid": LlavaShape((512, 6, 8, 224, 14), (1024, 12, 16, 4096)),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 tower (576 image tokens), Llama-7B, llava-hf's 32064-token vocabulary
    "7b": LlavaShape((1024, 24, 16, 336, 14), (4096, 32, 32, 11008), vocab_size=32064),
}

QUESTIONS = ["Describe this image in detail.", "What is happening in this picture?",
             "Describe the objects in the image and where they are.", "What do you see?"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 20)]


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def pad_vocab(tokenizer, size: int) -> None:
    """Add tokens '<0>', '<1>', ... until the tokenizer has `size` entries.

    The tiny trained tokenizer has 400; a 7B-shape model needs the real vocabulary size for honest
    LM-head and logits cost. Random weights pick the added tokens most of the time; they decode
    to 3-5 characters and tokenise back to themselves, so sentences keep a realistic length in text.
    """
    vocab, names, i = tokenizer.get_vocab(), [], 0
    while len(tokenizer) + len(names) < size:
        name = f"<{_base36(i)}>"
        if name not in vocab:  # '<s>' is already BOS
            names.append(name)
        i += 1
    tokenizer.add_tokens(names)


def build_llava(size: str, dtype: torch.dtype | str, device: str):
    """(model, processor): a LlavaForConditionalGeneration at shape `size`, random init, eval mode.

    The weights are created on `device` in `dtype` directly (a 7B model never exists in float32).
    """
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from csr.tiny import LLAVA_CHAT_TEMPLATE, build_tokenizer

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    shape = LLAVA_SHAPES[size]
    (vh, vl, vheads, img, patch), (th, tl, theads, inter) = shape.vision, shape.text
    tokenizer = build_tokenizer(vocab_size=400)
    if shape.vocab_size:
        pad_vocab(tokenizer, shape.vocab_size)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vh, intermediate_size=vh * 4, num_hidden_layers=vl,
                                       num_attention_heads=vheads, image_size=img, patch_size=patch),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=th, intermediate_size=inter,
                                num_hidden_layers=tl, num_attention_heads=theads, num_key_value_heads=theads,
                                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": img},
                                                                  crop_size={"height": img, "width": img}),
                               tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def param_count_m(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)


# ---------------------------------------------------------------------------------------------
# Memory and machine
# ---------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float:
    """CUDA: the allocator's peak since the last reset. CPU: the process's RSS high-water mark
    (it cannot be reset: compare CPU figures only between separate processes)."""
    if str(device).startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def memory_mb(device: str) -> float | None:
    """Memory held right now (CUDA allocator); None on CPU."""
    if str(device).startswith("cuda"):
        return round(torch.cuda.memory_allocated() / 2**20, 1)
    return None


def free_memory(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def package_versions(names=("transformers", "trl", "peft", "accelerate", "datasets", "deepspeed",
                            "open_clip_torch")) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_info() -> dict:
    """GPU name, memory and driver from nvidia-smi (no CUDA context in the caller); {} without it."""
    import subprocess

    try:
        row = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30).stdout.strip().splitlines()[0]
        name, mem_mib, driver = [x.strip() for x in row.split(",")]
        return {"gpu": name, "gpu_mem_gb": round(float(mem_mib) / 1024, 1), "driver": driver}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {}


def machine_info(device: str) -> dict:
    """Where a figure was measured: machine, load, threads, versions, GPU."""
    cuda = str(device).startswith("cuda")
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "gpu": None, "gpu_mem_gb": None, "driver": None,
            **(gpu_info() if cuda else {}), **package_versions(), "date": time.strftime("%Y-%m-%d")}
    return info


def busy_reason(load_1m: float, cores: int) -> str | None:
    """Why the machine is too busy for a figure worth recording (1-minute load above the cores), or None."""
    if load_1m > cores:
        return f"the 1-minute load average is {load_1m:.2f}, above the {cores} cores"
    return None


def summarise_runs(runs: list[dict]) -> dict:
    """Repeated runs of one path: the median of each figure, and every run's rate."""
    import statistics

    out = {key: round(statistics.median(run[key] for run in runs), 3)
           for key in ("seconds", "candidates_per_s", "peak_mem_mb", "model_mem_mb") if key in runs[0]}
    out.update(candidates=runs[0]["candidates"], runs_candidates_per_s=[run["candidates_per_s"] for run in runs])
    if "token_rows" in runs[0]:  # the same in every run (the same trees): the first run's
        out["token_rows"] = runs[0]["token_rows"]
    return out


# ---------------------------------------------------------------------------------------------
# Largest batch that fits
# ---------------------------------------------------------------------------------------------


def doubling(start: int, cap: int) -> list[int]:
    sizes, n = [], max(1, start)
    while n <= cap:
        sizes.append(n)
        n *= 2
    return sizes


def probe_largest(try_size: Callable[[int], dict], sizes: list[int], *, device: str = "cpu",
                  deadline: float | None = None, growth: float = 2.2) -> dict:
    """Run `try_size(n)` for each n in `sizes` (ascending) until one runs out of memory.

    Returns {"tries": [...], "largest_fit", "first_oom", "stopped"}; `stopped` says why the probe
    ended: "oom", "cap" (every size fitted), "budget" (the next try would likely pass `deadline`,
    a time.monotonic() value: a try is guessed to take `growth` times the last one) or "error"
    (another exception, recorded, not raised). Memory is freed between tries.
    """
    tries, largest, first_oom, stopped, last_s = [], None, None, "cap", None
    for n in sizes:
        if deadline is not None and last_s is not None and time.monotonic() + growth * last_s > deadline:
            stopped = "budget"
            break
        start = time.monotonic()
        error = None
        try:
            stats = try_size(n)
        except Exception as err:  # noqa: BLE001 - recorded, and the probe ends
            error = ("oom" if is_oom(err) else "error", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                     if str(err) else type(err).__name__)
        # outside the except block: the traceback (and the tensors its frames hold) is gone
        free_memory(device)
        last_s = time.monotonic() - start
        if error is None:
            tries.append({"size": n, "ok": True, **stats})
            largest = n
            continue
        tries.append({"size": n, "ok": False, "error": error[1], "seconds": round(last_s, 2)})
        stopped = error[0]
        if stopped == "oom":
            first_oom = n
        break
    return {"tries": tries, "largest_fit": largest, "first_oom": first_oom, "stopped": stopped}


# ---------------------------------------------------------------------------------------------
# Sentence search: the fast path and the per-node reference
# ---------------------------------------------------------------------------------------------


FAST_PATHS = ("fast", "copies", "cascade")


def search_inputs(processor, n: int, image_size: int):
    """n solid-colour images and chat prompts (4 questions in turn)."""
    from PIL import Image

    from csr.models import build_chat_prompt

    images = [Image.new("RGB", (image_size, image_size), COLOURS[i % 4]) for i in range(n)]
    prompts = [build_chat_prompt(processor, QUESTIONS[i % 4]) for i in range(n)]
    return images, prompts


def run_search(impl: str, model, processor, images: list, prompts: list[str], settings, *,
               num_candidates: int, max_new_tokens: int, diversity_penalty: float = 3.0,
               node_batch_size: int = 0, deadline: float | None = None) -> tuple[list, dict]:
    """Grow one tree per (image, prompt) with `impl`; (trees, stats).

    fast: every tree in lockstep over cached prompts (`CachedLlavaExpander`, its default
    `prefix_attention`); copies / cascade: the same with that `prefix_attention` (every row its own
    prompt copy / one copy per tree, `csr.generate.cascade`); reference: one tree
    after another, one node per forward, everything re-encoded (the official semantics). Trees
    score siblings by their summed log-probs. With a `deadline` (time.monotonic()) the reference
    stops after the tree that passes it, so its rate covers the trees it finished. `token_rows`:
    the token-rows the language model ran per tree (prefill, node and decode, as the expander counts
    them) and the nodes whose decode keys/values were reused or re-encoded.
    """
    from csr.generate.expander import CachedLlavaExpander, LlavaExpander
    from csr.generate.tree import grow_tree, grow_trees
    from csr.models import sentence_end_ids

    device = str(model.device)
    kw = dict(num_candidates=num_candidates, diversity_penalty=diversity_penalty, max_new_tokens=max_new_tokens,
              stop_ids=sentence_end_ids(processor.tokenizer))

    def score(siblings):
        return [node["logprob_sum"] for node in siblings]

    reset_peak(device)
    start_mb = memory_mb(device)
    start = time.perf_counter()
    with torch.no_grad():
        if impl in FAST_PATHS:
            if impl != "fast":
                kw["prefix_attention"] = impl
            expander = CachedLlavaExpander(model, processor, node_batch_size=node_batch_size, **kw)
            cache = expander.encode_prompts(images, prompts)
            trees = grow_trees(lambda req: expander.expand_many(cache, req), [score] * len(prompts), settings)
            del cache
        elif impl == "reference":
            expander = LlavaExpander(model, processor, node_batch_size=1, **kw)
            trees = []
            for image, prompt in zip(images, prompts):
                trees.append(grow_tree(lambda r, im=image, p=prompt: expander.expand(im, p, r), score, settings))
                if deadline is not None and time.monotonic() > deadline:
                    break
        else:
            raise ValueError(f"impl={impl!r}: one of {', '.join(FAST_PATHS)}, reference")
    sync(device)
    seconds = time.perf_counter() - start
    n = sum(len(t) - 1 for t in trees)
    token_rows = {key: round(value / len(trees), 1) for key, value in sorted(expander.counts.items())}
    return trees, {"prompts": len(trees), "seconds": round(seconds, 3), "candidates": n, "token_rows": token_rows,
                   "candidates_per_s": round(n / seconds, 3), "peak_mem_mb": peak_memory_mb(device),
                   "start_mem_mb": start_mb, "node_batch_size_after": expander.node_batch_size}


def same_trees(a: list, b: list) -> dict:
    """How many of the trees both lists hold are identical in text, node for node."""
    pairs = list(zip(a, b))
    same = sum([n["text"] for n in x] == [n["text"] for n in y] for x, y in pairs)
    return {"compared": len(pairs), "identical": same}


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


def build_clip(model: str, device: str, batch_size: int):
    """A ClipScorer with random weights: "tiny" (csr.tiny's open_clip) or an open_clip model name."""
    from csr.score.clip import load_clip

    if model == "tiny":
        import tempfile
        from pathlib import Path

        from csr.tiny import build_tiny_clip

        folder = Path(tempfile.mkdtemp(prefix="csr_bench_clip_")) / "clip"
        build_tiny_clip(folder)
        return load_clip("open_clip", str(folder), device=device, batch_size=batch_size)
    return load_clip("open_clip", model, "", device=device, batch_size=batch_size)


def clip_loop_scores(clip, images: list, texts: list[list[str]]) -> list[list[float]]:
    """The official scoring: one CLIP call per (image, sentence), the image re-encoded every time."""
    return [[float(100.0 * clip.text_features([t])[0] @ clip.image_features([im])[0]) for t in ts]
            for im, ts in zip(images, texts)]


def clip_inputs(n_images: int, n_sentences: int, seed: int = 0):
    """Random-colour 256 px images and random 5-19 word sentences (CLIP's cost depends on length only)."""
    import random

    from PIL import Image

    words = ("a the red blue green small large circle square triangle star near left right top bottom of "
             "is there").split()
    rng = random.Random(seed)
    images = [Image.new("RGB", (256, 256), tuple(rng.randrange(256) for _ in range(3))) for _ in range(n_images)]
    texts = [[" ".join(rng.choice(words) for _ in range(rng.randrange(5, 20))) + "." for _ in range(n_sentences)]
             for _ in range(n_images)]
    return images, texts

