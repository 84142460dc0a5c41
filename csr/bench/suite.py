"""The four measurements of `scripts/gpu_suite.py`, each against its baseline in one process.

Each `part_*` takes the suite's parsed arguments (`a`), a `record(dict)` that saves what is
measured so far (so a part killed at its time limit still leaves its finished arms behind), and a
`deadline` (time.monotonic()) that its open-ended pieces (the reference search, the per-sentence
CLIP loop, the batch probes) stop at. They return the part's result dict.

- generate: the fast sentence search against the per-node reference (official semantics), then
  the largest prompt batch the fast path completes (doubling until out of memory).
- clip: CLIP scoring batched against the official per-sentence loop.
- dpo: one arm of the DPO step loop (LoRA on the language model, TRL's DPOTrainer through the
  train stage's own `build_trainer`): step time, peak memory, tokens/s, largest per-device batch.
  The suite runs it twice, under DeepSpeed ZeRO-2 (`accelerate launch`, one process) and plain.
- merge: the share of a LoRA update at lr 1e-7 that survives a float32 merge saved in bfloat16,
  against the float32 save (METHOD.md §1.5).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from csr.bench.common import (build_clip, build_llava, clip_inputs, clip_loop_scores, doubling, free_memory,
                              memory_mb, param_count_m, peak_memory_mb, probe_largest, reset_peak, run_search,
                              same_trees, search_inputs, sync)


def _ratio(a, b, digits: int = 2):
    return round(a / b, digits) if a is not None and b else None


# ---------------------------------------------------------------------------------------------
# 1. Sentence search
# ---------------------------------------------------------------------------------------------


def part_generate(a, record, deadline: float) -> dict:
    from csr.generate.tree import TreeSettings

    settings = TreeSettings(a.sentence_beam_width, "official", 1024, a.max_sentences)
    kw = dict(num_candidates=a.num_candidates, max_new_tokens=a.max_new_tokens)
    out = {"dtype": a.dtype, "prompts": a.prompts, "num_candidates": a.num_candidates,
           "sentence_beam_width": a.sentence_beam_width, "max_sentences": a.max_sentences,
           "max_new_tokens": a.max_new_tokens}
    model, processor = build_llava(a.size, a.dtype, a.device)
    out.update(params_m=param_count_m(model), model_mem_mb=memory_mb(a.device),
               vocab_size=model.config.text_config.vocab_size)
    size = model.config.vision_config.image_size
    images, prompts = search_inputs(processor, a.prompts, size)
    # warm-up (CUDA context, kernels, allocator): one prompt, one level, a few tokens, not timed
    run_search("fast", model, processor, images[:1], prompts[:1],
               TreeSettings(a.sentence_beam_width, "official", 1024, 1), num_candidates=a.num_candidates,
               max_new_tokens=4)

    fast_trees, out["fast"] = run_search("fast", model, processor, images, prompts, settings, **kw)
    record(out)
    # the reference gets a share of what is left; the rest is for the probe
    ref_deadline = time.monotonic() + a.reference_share * max(0.0, deadline - time.monotonic())
    ref_trees, out["reference"] = run_search("reference", model, processor, images, prompts, settings,
                                             deadline=ref_deadline, **kw)
    out["trees"] = same_trees(ref_trees, fast_trees)
    out["speedup"] = _ratio(out["fast"]["candidates_per_s"], out["reference"]["candidates_per_s"])
    out["peak_mem_ratio"] = _ratio(out["fast"]["peak_mem_mb"], out["reference"]["peak_mem_mb"]) \
        if a.device.startswith("cuda") else None  # CPU's RSS high-water mark is shared by both arms
    record(out)
    del ref_trees, fast_trees
    free_memory(a.device)

    def try_size(n):
        ims, ps = search_inputs(processor, n, size)
        _, stats = run_search("fast", model, processor, ims, ps, settings, **kw)
        return {k: stats[k] for k in ("seconds", "candidates_per_s", "peak_mem_mb", "node_batch_size_after")}

    out["probe"] = probe_largest(try_size, doubling(2 * a.prompts, a.max_probe), device=a.device, deadline=deadline)
    fits = [a.prompts] + [t["size"] for t in out["probe"]["tries"] if t["ok"]]
    out["largest_prompt_batch"] = max(fits)
    record(out)
    return out


# ---------------------------------------------------------------------------------------------
# 2. CLIP
# ---------------------------------------------------------------------------------------------


def part_clip(a, record, deadline: float) -> dict:
    model = a.clip_model or ("ViT-L-14-336" if a.size == "7b" else "tiny")
    clip = build_clip(model, a.device, a.clip_batch_size)
    images, texts = clip_inputs(a.clip_images, a.clip_sentences)
    out = {"model": model, "images": a.clip_images, "sentences_per_image": a.clip_sentences,
           "batch_size": a.clip_batch_size, "dtype": "float32"}
    with torch.no_grad():
        clip.scores_many(images[:1], [texts[0][:2]])  # warm-up, both paths
        clip_loop_scores(clip, images[:1], [texts[0][:1]])
        reset_peak(a.device)
        start = time.perf_counter()
        batched = clip.scores_many(images, texts)
        sync(a.device)
        seconds = time.perf_counter() - start
        n = sum(len(t) for t in texts)
        out["batched"] = {"seconds": round(seconds, 3), "sentences": n, "sentences_per_s": round(n / seconds, 1),
                          "peak_mem_mb": peak_memory_mb(a.device)}
        record(out)
        reset_peak(a.device)
        loop, start = [], time.perf_counter()
        for image, sentences in zip(images, texts):  # image by image, so the deadline can cut it short
            loop.append(clip_loop_scores(clip, [image], [sentences])[0])
            if time.monotonic() > deadline:
                break
        sync(a.device)
        seconds = time.perf_counter() - start
    n = sum(len(s) for s in loop)
    out["per_sentence_loop"] = {"seconds": round(seconds, 3), "sentences": n, "sentences_per_s": round(n / seconds, 1),
                                "peak_mem_mb": peak_memory_mb(a.device)}
    out["speedup"] = _ratio(out["batched"]["sentences_per_s"], out["per_sentence_loop"]["sentences_per_s"])
    out["max_abs_score_diff"] = round(max(abs(x - y) for ra, rb in zip(batched, loop) for x, y in zip(ra, rb)), 6)
    record(out)
    return out


# ---------------------------------------------------------------------------------------------
# 3. DPO step loop
# ---------------------------------------------------------------------------------------------


def synthetic_pairs(processor, n: int, response_tokens: int, folder: Path) -> list[dict]:
    """n identical-shape preference pairs (TRL's conversational format, one image on disk).

    Responses are cut to `response_tokens` tokens of the model's tokenizer, so every sequence has
    the same length: image tokens + chat prompt + response (the official max_length is 1024).
    """
    from PIL import Image

    size = processor.image_processor.crop_size["height"]
    image = folder / "image.png"
    Image.new("RGB", (size, size), (200, 30, 30)).save(image)
    tok = processor.tokenizer
    words = "The image shows a red circle and a blue square on a white background near a small tree. "
    ids = tok(words * (response_tokens // 4 + 8), add_special_tokens=False)["input_ids"]
    if len(tok) > 1000:  # a 7B-shape vocabulary: spread over it, as a real one would be used
        special = set(tok.all_special_ids)  # never '<image>' in a response: it would count as an image
        ids = [x for x in ((i * 7919) % len(tok) for i in range(2 * response_tokens + 16)) if x not in special]
    chosen, rejected = tok.decode(ids[:response_tokens]), tok.decode(ids[3:3 + response_tokens])

    def turn(role, content):
        return [{"role": role, "content": content}]

    return [{"prompt": turn("user", [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]),
             "chosen": turn("assistant", [{"type": "text", "text": chosen}]),
             "rejected": turn("assistant", [{"type": "text", "text": rejected}]),
             "images": [str(image)]} for _ in range(n)]


class _CountTokens:
    """Wraps the trainer's collator: records the tokens (attention mask, image tokens included,
    chosen and rejected rows both) of every batch it builds."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, examples):
        batch = self.inner(examples)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch


def dpo_arm(a, arm: str, record, deadline: float) -> dict:
    """One arm of the DPO measurement in this process (the suite starts the zero2 arm under
    `accelerate launch`, which is what puts DeepSpeed in charge)."""
    from transformers import TrainerCallback

    from csr.config import load_config
    from csr.train.args import build_train_args
    from csr.train.data import pairs_dataset
    from csr.train.trainer import build_trainer, lora_module_names

    cuda = a.device.startswith("cuda")
    steps = a.dpo_warmup_steps + a.dpo_steps
    overrides = {"max_steps": steps, "per_device_train_batch_size": a.dpo_batch_size, "save_strategy": "no",
                 "report_to": "none", "logging_steps": 1, "disable_tqdm": True, "dataloader_num_workers": 0,
                 "activation_checkpointing": not a.dpo_no_checkpointing, "lora_r": a.lora_r,
                 "lora_alpha": a.lora_alpha, "learning_rate": a.lr}
    cfg = load_config(None, [f"train.{k}={str(v).lower() if isinstance(v, bool) else v}"
                             for k, v in overrides.items()])
    work = Path(tempfile.mkdtemp(prefix=f"csr_suite_dpo_{arm}_"))
    args = build_train_args(cfg, work / "out", cuda_available=cuda)
    model, processor = build_llava(a.size, args.resolved_model_dtype(), a.device)
    records = synthetic_pairs(processor, steps * a.dpo_batch_size, a.dpo_response_tokens, work)
    trainer = build_trainer(cfg, f"random-init {a.size}", pairs_dataset(records), args, model=model,
                            processor=processor)
    counter = _CountTokens(trainer.data_collator)
    trainer.data_collator = counter

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin, self.ends, self.compute = None, [], []

        def on_step_begin(self, *_, **__):
            sync(a.device)
            self.begin = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync(a.device)
            now = time.perf_counter()
            self.compute.append(now - self.begin)
            self.ends.append(now)

    clock = StepClock()
    trainer.add_callback(clock)
    out = {"arm": arm, "deepspeed_zero_stage": None, "size": a.size, "params_m": param_count_m(model),
           "lora_r": a.lora_r, "lora_modules": len(lora_module_names(trainer.model)),
           "activation_checkpointing": not a.dpo_no_checkpointing, "per_device_batch": a.dpo_batch_size,
           "max_length": args.max_length, "warmup_steps": a.dpo_warmup_steps, "timed_steps": a.dpo_steps}
    reset_peak(a.device)
    trainer.train()
    out["deepspeed_zero_stage"] = args.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    # a step's time: from the end of the step before it (data collation and logging included)
    gaps = [t1 - t0 for t0, t1 in zip(clock.ends, clock.ends[1:])][a.dpo_warmup_steps - 1:] \
        if a.dpo_warmup_steps >= 1 else clock.compute
    step_s = statistics.median(gaps)
    tokens = statistics.median(counter.tokens)
    out.update(step_s=round(step_s, 4), compute_s=round(statistics.median(clock.compute[a.dpo_warmup_steps:]), 4),
               step_times_s=[round(g, 4) for g in gaps], tokens_per_step=tokens,
               tokens_per_s=round(tokens / step_s, 1), pairs_per_s=round(a.dpo_batch_size / step_s, 3),
               peak_mem_mb=peak_memory_mb(a.device))
    record(out)

    def try_size(n):
        batch = trainer.data_collator([trainer.train_dataset[i % len(trainer.train_dataset)] for i in range(n)])
        reset_peak(a.device)
        start = time.perf_counter()
        trainer.training_step(trainer.model_wrapped, batch)  # under DeepSpeed this also steps the optimizer
        trainer.optimizer.step()  # plain: the AdamW step (a no-op on DeepSpeed's wrapper)
        trainer.optimizer.zero_grad()
        sync(a.device)
        seconds = time.perf_counter() - start
        return {"seconds": round(seconds, 3), "tokens_per_s": round(counter.tokens[-1] / seconds, 1),
                "peak_mem_mb": peak_memory_mb(a.device)}

    out["probe"] = probe_largest(try_size, doubling(2 * a.dpo_batch_size, a.dpo_max_probe), device=a.device,
                                 deadline=deadline)
    out["largest_batch"] = max([a.dpo_batch_size] + [t["size"] for t in out["probe"]["tries"] if t["ok"]])
    record(out)
    return out


def dpo_compare(zero2: dict | None, plain: dict | None) -> dict:
    """ZeRO-2 against the plain single-process Trainer: ratios of the two measured arms."""
    if not zero2 or not plain or "step_s" not in zero2 or "step_s" not in plain:
        return {"tokens_per_s_ratio": None, "peak_mem_ratio": None}
    return {"tokens_per_s_ratio": _ratio(zero2["tokens_per_s"], plain["tokens_per_s"]),
            "peak_mem_ratio": _ratio(zero2["peak_mem_mb"], plain["peak_mem_mb"])}


# ---------------------------------------------------------------------------------------------
# 4. Merge retention
# ---------------------------------------------------------------------------------------------


def layer_shapes(size: str) -> dict[str, tuple[int, int]]:
    """(out, in) of the 7 LoRA-adapted linear layers of one decoder layer of the `size` model."""
    from csr.bench.common import LLAVA_SHAPES

    hidden, _, _, inter = LLAVA_SHAPES[size].text
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def adam_lora_delta(out_f: int, in_f: int, *, r: int, alpha: float, lr: float, steps: int,
                    generator: torch.Generator, device: str) -> torch.Tensor:
    """The weight update of a LoRA after `steps` Adam steps from PEFT's init, float32.

    PEFT starts B = 0 and A kaiming-uniform (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))). Adam's
    bias-corrected first step is lr * g / |g| per element, so every element of B moves by about lr
    a step; held signs (the largest such update) give B = ±lr * steps. A moves by as little, which
    is negligible next to its init. The update is alpha/r * B @ A.
    """
    bound = 1.0 / math.sqrt(in_f)
    lora_a = (torch.rand(r, in_f, generator=generator, device=device) * 2 - 1) * bound
    signs = torch.rand(out_f, r, generator=generator, device=device) < 0.5
    lora_b = torch.where(signs, -1.0, 1.0) * (lr * steps)
    return (alpha / r) * (lora_b @ lora_a)


def part_merge(a, record, deadline: float) -> dict:
    from csr.train.merge import update_retention

    gen = torch.Generator(device=a.device).manual_seed(0)
    shapes = layer_shapes(a.size)
    out = {"layer_shapes": {k: list(v) for k, v in shapes.items()}, "weight_std": 0.02, "base_dtype": "bfloat16",
           "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "lr": a.lr, "by_steps": []}
    for steps in a.merge_steps:
        row_start = time.monotonic()
        sums = {dt: {"dot": 0.0, "kept_sq": 0.0, "delta_sq": 0.0, "changed": 0, "elements": 0}
                for dt in ("float32", "bfloat16")}
        for out_f, in_f in shapes.values():
            # the base as the released model stores it (bfloat16), LLaMA-like statistics
            w0 = (torch.randn(out_f, in_f, generator=gen, device=a.device) * 0.02).to(torch.bfloat16)
            delta = adam_lora_delta(out_f, in_f, r=a.lora_r, alpha=a.lora_alpha, lr=a.lr, steps=steps,
                                    generator=gen, device=a.device)
            for dt in sums:
                res = update_retention(w0, delta, getattr(torch, dt))
                for k in sums[dt]:
                    sums[dt][k] += res[k]
            del w0, delta
        row = {"steps": steps,
               "delta_rms": float(f'{math.sqrt(sums["float32"]["delta_sq"] / sums["float32"]["elements"]):.4g}')}
        for dt, s in sums.items():
            row[dt] = {"retained": round(s["dot"] / s["delta_sq"], 4),
                       "norm_ratio": round(math.sqrt(s["kept_sq"] / s["delta_sq"]), 4),
                       "changed_fraction": round(s["changed"] / s["elements"], 4)}
        out["by_steps"].append(row)
        if len(out["by_steps"]) == 1:  # the headline: the first step count
            out.update(steps=steps, float32=row["float32"], bfloat16=row["bfloat16"],
                       retained_ratio=_ratio(row["bfloat16"]["retained"], row["float32"]["retained"], 4))
        record(out)
        if time.monotonic() + (time.monotonic() - row_start) > deadline:  # the next would not finish
            break
    return out


PARTS = {"generate": part_generate, "clip": part_clip, "merge": part_merge}
