"""How much of a CSR round's LoRA update survives saving the merged weights in bf16 (or fp16).

    python scripts/bf16_retention.py            # the paper's settings, LLaMA-7B layer shapes (~1 min on CPU)

The paper's DPO (recipes/llava-1.5-7b/csr_paper.yaml): lr 1e-7, cosine with 3% warmup, one epoch of
~13k pairs at 8 GPUs x batch 1 = 1625 steps, LoRA r 128 / alpha 256. For one LLaMA-7B projection
(q_proj 4096x4096, down_proj 4096x11008) with LLaMA's weight statistics (std 0.02, the base stored
in bf16 or fp16), LoRA A initialised as PEFT does (kaiming-uniform, bound 1/sqrt(fan_in)) and B
grown by Adam: each step moves a B entry by at most the step's lr, so after the run
|B| <= sum_t lr_t. `coherence` c scales that bound (1: every step pushed each entry the same way,
the largest update DPO can make; real gradients are noisier, c < 1).

Printed per layer, coherence and saved dtype:
- changed: the fraction of the adapted weights whose saved value differs from the base's;
- kept: the fraction of the update the saved weights carry, <Q(W0 + D) - W0, D> / <D, D>
  (1 = all of it, 0 = none; rounding W0 + D to the dtype's grid).
"""

from __future__ import annotations

import argparse
import math

import torch


def lr_sum(steps: int, lr: float, warmup: float) -> float:
    """Sum of the learning rates of transformers' cosine schedule with linear warmup."""
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(warmup * steps), steps)
    total = 0.0
    for _ in range(steps):
        total += opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return total


def retention(out_features: int, in_features: int, *, r: int, alpha: int, b_size: float, dtype: torch.dtype,
              seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(dtype).float()  # base as stored
    bound = 1.0 / math.sqrt(in_features)  # PEFT: kaiming_uniform_(a=sqrt(5)) on A (r x in)
    a = (torch.rand(r, in_features, generator=gen) * 2 - 1) * bound
    b = torch.where(torch.rand(out_features, r, generator=gen) < 0.5, -b_size, b_size)
    delta = (alpha / r) * (b @ a)
    saved = (w0 + delta).to(dtype).float()
    moved = saved - w0
    return {"changed": float((moved != 0).float().mean()),
            "kept": float((moved * delta).sum() / (delta * delta).sum()),
            "delta_std": float(delta.std()), "half_ulp_at_std": _half_ulp(0.02, dtype)}


def _half_ulp(x: float, dtype: torch.dtype) -> float:
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    return 2.0 ** (math.floor(math.log2(x)) - mantissa) / 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=13000)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (GPUs x batch x accumulation)")
    p.add_argument("--lr", type=float, default=1e-7)
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--alpha", type=int, default=256)
    p.add_argument("--coherence", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = math.ceil(args.pairs / args.batch)
    total = lr_sum(steps, args.lr, 0.03)
    print(f"{steps} steps at lr {args.lr:g} (cosine, 3% warmup): sum of lr = {total:.3e} = the largest |B| entry")
    print("| layer (out x in) | coherence | dtype | |D| std | half a step at |w| = 0.02 | changed | kept |")
    print("|---|---|---|---|---|---|---|")
    for name, (out_f, in_f) in {"q_proj": (4096, 4096), "down_proj": (4096, 11008)}.items():
        for c in args.coherence:
            for dtype in (torch.bfloat16, torch.float16):
                s = retention(out_f, in_f, r=args.r, alpha=args.alpha, b_size=c * total, dtype=dtype)
                print(f"| {name} ({out_f}x{in_f}) | {c:g} | {str(dtype).replace('torch.', '')} | "
                      f"{s['delta_std']:.2e} | {s['half_ulp_at_std']:.2e} | {s['changed']:.3f} | {s['kept']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
