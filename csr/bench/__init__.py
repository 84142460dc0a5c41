"""Benchmark helpers for `scripts/bench_*.py` and `scripts/gpu_suite.py`.

`common`: random-init LLaVA models at named shapes (tiny ... LLaVA-1.5-7B), the sentence search run
with either implementation, the CLIP per-sentence loop, memory and machine facts, the
largest-batch probe. `suite`: the four measurements of the GPU suite, each runnable on its own.
Nothing here downloads weights: every model is built from its config with random weights (speed
and memory do not depend on the weights).
"""
