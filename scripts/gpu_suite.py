"""The GPU figures in one command: four measurements, each side by side with its baseline.

    python scripts/gpu_suite.py --device cuda --size 7b                # LLaVA-1.5-7B shape, < 8 min
    python scripts/gpu_suite.py --device cpu --size tiny --no-zero     # the CPU smoke run (tests)

Parts (`--parts`, default all, in this order):
  generate  sentence search, fast path vs the per-node reference (official semantics): 16 prompts,
            K = 5, N = 5, 3 levels, 32 tokens a sentence; candidates/s, peak memory, and the
            largest prompt batch the fast path completes (doubling until out of memory)
  clip      CLIP (ViT-L/14-336 at 7b) scoring, batched vs the official per-sentence loop
  dpo       the DPO step loop (LoRA r = 128 on the language model, TRL through csr's train stage)
            under DeepSpeed ZeRO-2 (`accelerate launch`, one process) vs the plain Trainer: step
            time, tokens/s, peak memory, largest per-device batch
  merge     the share of a LoRA update at lr 1e-7 that survives a bfloat16 save vs float32

Models are random-initialised from config at the named shape (nothing is downloaded), bfloat16 on
CUDA. Each part runs in its own process under its own time budget; a part that fails or runs out
of time is recorded as such and the others still run. One JSON line per part is appended to
--out as the part finishes, and a table of all parts is printed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# random-init models only: nothing may reach for a hub (the GPU machine has no network; a lookup
# would wait for its timeout), and no tracker; the parts' processes inherit these
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

PART_NAMES = ("generate", "clip", "dpo", "merge")
NEEDS = {"generate": ["transformers"], "clip": ["open_clip"], "dpo": ["transformers", "trl", "peft", "datasets"],
         "merge": []}

# per-size defaults of the flags left at None; 7b: the budgets sum to 450 s of the 8 minutes
SIZE_DEFAULTS = {
    "7b": dict(prompts=16, max_new_tokens=32, max_probe=256, clip_images=32, clip_sentences=40,
               dpo_response_tokens=400, dpo_max_probe=64, budget_generate=160, budget_clip=45,
               budget_dpo=220, budget_merge=25),
    "tiny": dict(prompts=2, max_new_tokens=8, max_probe=4, clip_images=3, clip_sentences=6,
                 dpo_response_tokens=24, dpo_max_probe=4, budget_generate=120, budget_clip=60,
                 budget_dpo=180, budget_merge=30),
}
SIZE_DEFAULTS["mid"] = SIZE_DEFAULTS["tiny"]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="Where to measure (default: cuda).")
    g.add_argument("--size", default="7b", choices=["7b", "mid", "tiny"],
                   help="Model shape: 7b = LLaVA-1.5-7B (CLIP ViT-L/14-336, 576 image tokens, Llama-7B); "
                        "tiny for the CPU smoke run (default: 7b).")
    g.add_argument("--parts", default=",".join(PART_NAMES),
                   help=f"Comma-separated subset of {', '.join(PART_NAMES)} (default: all).")
    g.add_argument("--out", default=str(ROOT / "benchmarks" / "results.jsonl"),
                   help="JSONL file the parts' lines are appended to (default: benchmarks/results.jsonl).")
    g.add_argument("--log-dir", help="Folder for each part's own output (<part>.log) and table.md "
                                     "(default: a new temporary folder).")
    g.add_argument("--total-budget", type=float, default=470.0,
                   help="Seconds for the whole suite; a part never gets more than what is left (default: 470, "
                        "under the 8 minutes with room for the parent's own start).")
    for part in PART_NAMES:
        g.add_argument(f"--budget-{part}", type=float,
                       help=f"Seconds for the {part} part, startup included; it is killed after that "
                            f"(default: per size, 7b: {SIZE_DEFAULTS['7b']['budget_' + part]:.0f}).")

    g = p.add_argument_group("generate")
    g.add_argument("--prompts", type=int, help="Trees grown together (default: 16 at 7b, 2 at tiny).")
    g.add_argument("--num-candidates", type=int, default=5, help="K: candidate sentences per node (default: 5).")
    g.add_argument("--sentence-beam-width", type=int, default=5, help="N: official pruning width (default: 5).")
    g.add_argument("--max-sentences", type=int, default=3, help="Tree levels (default: 3).")
    g.add_argument("--max-new-tokens", type=int, help="Tokens a sentence at most (default: 32 at 7b, 8 at tiny).")
    g.add_argument("--dtype", help="Search dtype (default: bfloat16 on CUDA, float32 on CPU).",
                   choices=["float32", "bfloat16", "float16"])
    g.add_argument("--reference-share", type=float, default=0.6,
                   help="Share of the part's time left after the fast run that the reference may use; it "
                        "stops after the tree that passes it and reports the rate over the trees it grew "
                        "(default: 0.6).")
    g.add_argument("--max-probe", type=int,
                   help="Largest prompt batch the probe tries (doubling from 2x --prompts; default: 256 at "
                        "7b, 4 at tiny).")

    g = p.add_argument_group("clip")
    g.add_argument("--clip-model", help="open_clip model name (random weights; default: ViT-L-14-336 at 7b, a "
                                        "tiny open_clip otherwise).")
    g.add_argument("--clip-images", type=int, help="Images (default: 32 at 7b, 3 at tiny).")
    g.add_argument("--clip-sentences", type=int, help="Sentences per image (default: 40 at 7b, 6 at tiny).")
    g.add_argument("--clip-batch-size", type=int, default=64, help="Batched path's batch size (default: 64).")

    g = p.add_argument_group("dpo")
    g.add_argument("--no-zero", action="store_true",
                   help="Skip the DeepSpeed ZeRO-2 arm (run only the plain Trainer). DeepSpeed JIT-compiles "
                        "ops for 30-50 s on a CPU: the CPU test turns it off.")
    g.add_argument("--zero-share", type=float, default=0.55,
                   help="Share of the dpo budget for the ZeRO-2 arm; the plain arm gets the rest (default: 0.55).")
    g.add_argument("--accelerate-config", default="zero2",
                   help="accelerate config for the ZeRO arm: a path or a shipped name (default: zero2).")
    g.add_argument("--dpo-batch-size", type=int, default=1,
                   help="Pairs per device for the timed steps (official: 1; default: 1).")
    g.add_argument("--dpo-warmup-steps", type=int, default=2, help="Untimed first steps (default: 2).")
    g.add_argument("--dpo-steps", type=int, default=5, help="Timed steps; the median is reported (default: 5).")
    g.add_argument("--dpo-response-tokens", type=int,
                   help="Tokens of each chosen/rejected response (default: 400 at 7b: 576 image + prompt + "
                        "400 fills the official 1024; 24 at tiny).")
    g.add_argument("--dpo-max-probe", type=int, help="Largest per-device batch (pairs) the probe tries "
                                                     "(default: 64 at 7b, 4 at tiny).")
    g.add_argument("--dpo-no-checkpointing", action="store_true",
                   help="Turn activation checkpointing off (paper and default: on).")

    g = p.add_argument_group("LoRA and merge (defaults: the paper's, csr.train_config.TrainConfig)")
    g.add_argument("--lora-r", type=int, default=128, help="LoRA rank (paper: 128).")
    g.add_argument("--lora-alpha", type=int, default=256, help="LoRA alpha (paper: 256).")
    g.add_argument("--lr", type=float, default=1e-7, help="Learning rate (paper: 1e-7).")
    g.add_argument("--merge-steps", type=int, nargs="+", default=[1, 10, 100, 1000],
                   help="Adam steps of LoRA update to test; the first is the headline figure "
                        "(default: 1 10 100 1000).")

    # internal: a part (or a dpo arm) running in its own process
    p.add_argument("--child", choices=PART_NAMES, help=argparse.SUPPRESS)
    p.add_argument("--arm", choices=["zero2", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    p.add_argument("--child-deadline", type=float, help=argparse.SUPPRESS)  # a time.monotonic() value
    return p


class SuiteError(ValueError):
    """Bad input; the message is one line."""


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-size defaults and check the arguments; raises SuiteError."""
    import torch

    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PART_NAMES]
    if unknown or not parts:
        raise SuiteError(f"--parts {a.parts!r}: choose from {', '.join(PART_NAMES)}.")
    a.parts = [x for x in PART_NAMES if x in parts]
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SuiteError(f"--device cuda but torch {torch.__version__} sees no CUDA device (CUDA build: "
                         f"{torch.version.cuda or 'none'}); run on a GPU machine or use --device cpu --size tiny.")
    if a.device == "cpu" and a.size == "7b" and a.parts != ["merge"]:  # merge is arithmetic on 7 layers
        raise SuiteError("--size 7b on the CPU would build 7B-parameter models (hours); use --device cuda, "
                         "--size tiny on the CPU, or --parts merge alone.")
    for key, value in SIZE_DEFAULTS[a.size].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.dtype is None:
        a.dtype = "bfloat16" if a.device == "cuda" else "float32"
    for key in ("prompts", "num_candidates", "sentence_beam_width", "max_sentences", "max_new_tokens",
                "clip_images", "clip_sentences", "clip_batch_size", "dpo_batch_size", "dpo_steps", "lora_r"):
        if getattr(a, key) < 1:
            raise SuiteError(f"--{key.replace('_', '-')} must be at least 1 (got {getattr(a, key)}).")
    if a.dpo_warmup_steps < 1:
        raise SuiteError("--dpo-warmup-steps must be at least 1 (the first step builds optimizer state).")
    if "dpo" in a.parts and not a.no_zero:
        from csr.config import ConfigError
        from csr.launch import resolve_accelerate_config

        try:
            a.accelerate_config = resolve_accelerate_config(a.accelerate_config)
        except ConfigError as e:
            raise SuiteError(str(e).replace("run.accelerate_config", "--accelerate-config")) from None
    return a


# ---------------------------------------------------------------------------------------------
# Child: one part (or one dpo arm) in this process
# ---------------------------------------------------------------------------------------------


def run_child(a: argparse.Namespace) -> int:
    from csr.io import atomic_write_json

    deadline = a.child_deadline
    state: dict = {}

    def record(result: dict) -> None:
        state.update(result)
        atomic_write_json(a.dump, {"result": state, "done": False})

    try:
        from csr.bench import suite

        if a.child == "dpo":
            result = suite.dpo_arm(a, a.arm, record, deadline)
        else:
            result = suite.PARTS[a.child](a, record, deadline)
        state.update(result)
        atomic_write_json(a.dump, {"result": state, "done": True})
        return 0
    except BaseException as err:  # recorded for the parent, which goes on with the other parts
        traceback.print_exc()
        first = str(err).splitlines()[0][:500] if str(err) else ""
        atomic_write_json(a.dump, {"result": state, "done": False, "error": f"{type(err).__name__}: {first}"})
        return 1


# ---------------------------------------------------------------------------------------------
# Parent: the parts in turn, each in a process of its own
# ---------------------------------------------------------------------------------------------


def missing_packages(names: list[str]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def spawn(cmd: list[str], budget: float, log_path: Path, dump: Path) -> dict:
    """Run a child under `budget` seconds; its dump, with status ok / failed / timeout."""
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        # its own process group, so a timeout also ends what it started (accelerate -> torchrun -> worker)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
        status = None
        try:
            rc = proc.wait(timeout=max(1.0, budget))
        except subprocess.TimeoutExpired:
            status = "timeout"
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            rc = proc.returncode
    data = json.loads(dump.read_text()) if dump.is_file() else {"result": {}, "done": False}
    if status is None:
        status = "ok" if rc == 0 and data.get("done") else "failed"
    out = {"status": status, "wall_s": round(time.monotonic() - start, 1), **data["result"]}
    if status == "failed":
        out["error"] = data.get("error") or f"exit code {rc}; see {log_path}"
    elif status == "timeout":
        out["error"] = f"killed after its budget of {budget:.0f} s; what it finished is kept"
    return out


def child_argv(argv: list[str], part: str, dump: Path, budget: float, arm: str | None = None) -> list[str]:
    # the child's open-ended pieces stop at this deadline (CLOCK_MONOTONIC is shared by the processes
    # of one machine), leaving a tenth of the budget to finish the try in flight and write it down
    deadline = time.monotonic() + budget - max(3.0, 0.1 * budget)
    extra = ["--child", part, "--dump", str(dump), "--child-deadline", f"{deadline:.2f}"]
    return [str(Path(__file__).resolve()), *argv, *extra, *(["--arm", arm] if arm else [])]


def run_part(a, argv: list[str], part: str, budget: float, log_dir: Path, tmp: Path) -> dict:
    missing = missing_packages(NEEDS[part])
    if missing:
        return {"status": "failed", "wall_s": 0.0,
                "error": f"missing Python package(s) {', '.join(missing)}: install them (on the GPU machine, carry "
                         f"them as wheels: scripts/gpu_wheels.sh)"}
    log = log_dir / f"{part}.log"
    if part != "dpo":
        dump = tmp / f"{part}.json"
        return spawn([sys.executable, *child_argv(argv, part, dump, budget)], budget, log, dump)

    from csr.bench.suite import dpo_compare
    from csr.launch import accelerate_command

    start, arms = time.monotonic(), {}
    if a.no_zero:
        arms["zero2"] = {"status": "skipped", "error": "--no-zero"}
    elif missing_packages(["deepspeed", "accelerate"]):
        arms["zero2"] = {"status": "failed", "error": "missing Python package(s) "
                         f"{', '.join(missing_packages(['deepspeed', 'accelerate']))}: the ZeRO-2 arm needs them"}
    else:
        share = budget * a.zero_share
        dump = tmp / "dpo_zero2.json"
        cmd = accelerate_command(a.accelerate_config, 1, child_argv(argv, "dpo", dump, share, "zero2"))
        arms["zero2"] = spawn(cmd, share, log_dir / "dpo_zero2.log", dump)
    left = budget - (time.monotonic() - start)
    dump = tmp / "dpo_plain.json"
    arms["plain"] = spawn([sys.executable, *child_argv(argv, "dpo", dump, left, "plain")], left,
                          log_dir / "dpo_plain.log", dump)
    ran = [s for s in arms.values() if s["status"] != "skipped"]
    status = "ok" if all(s["status"] == "ok" for s in ran) else \
        "partial" if any(s["status"] == "ok" for s in ran) else ran[0]["status"]
    out = {"status": status, "wall_s": round(time.monotonic() - start, 1), **arms,
           **dpo_compare(arms["zero2"], arms["plain"])}
    if status != "ok":
        out["error"] = "; ".join(f"{k}: {v['error']}" for k, v in arms.items()
                                 if v.get("error") and v["status"] != "skipped")
    return out


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _mem(mb) -> str:
    if mb is None:
        return "–"
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _x(r) -> str:
    if r is None:
        return "–"
    return f"{r:.1f}×" if r >= 10 else f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def table_row(line: dict) -> list[str]:
    part, status = line["part"], line["status"]
    base = new = ratio = mem = largest = "–"
    if part == "generate" and "fast" in line:
        f, r = line["fast"], line.get("reference")
        new = f"fast {f['candidates_per_s']:.1f} cand/s"
        if r:
            base = f"reference {r['candidates_per_s']:.2f} cand/s ({r['prompts']} trees)"
            ratio = _x(line.get("speedup"))
            mem = f"{_mem(r['peak_mem_mb'])} → {_mem(f['peak_mem_mb'])}" if line.get("peak_mem_ratio") else \
                f"{_mem(f['peak_mem_mb'])} (process)"
        if "probe" in line:
            pr = line["probe"]
            largest = f"{line['largest_prompt_batch']} prompts" + (
                f" (OOM at {pr['first_oom']})" if pr["first_oom"] else f" ({pr['stopped']})")
    elif part == "clip" and "batched" in line:
        new = f"batched {line['batched']['sentences_per_s']:.1f} sent/s"
        if "per_sentence_loop" in line:
            base = f"loop {line['per_sentence_loop']['sentences_per_s']:.1f} sent/s"
            ratio = _x(line.get("speedup"))
            mem = f"{_mem(line['per_sentence_loop']['peak_mem_mb'])} → {_mem(line['batched']['peak_mem_mb'])}"
    elif part == "dpo":
        def arm(name):
            s = line.get(name, {})
            if "step_s" not in s:
                return f"{name}: {s.get('status', '–')}"
            return f"{name} {s['tokens_per_s']:.0f} tok/s ({s['step_s']:.3f} s/step)"
        base, new = arm("plain"), arm("zero2")
        ratio = _x(line.get("tokens_per_s_ratio"))
        mem = " → ".join(_mem(line.get(n, {}).get("peak_mem_mb")) for n in ("plain", "zero2"))
        largest = ", ".join(f"{n} {line[n]['largest_batch']}" + (
            f" (OOM at {line[n]['probe']['first_oom']})" if line[n]["probe"]["first_oom"] else
            f" ({line[n]['probe']['stopped']})") for n in ("plain", "zero2") if "largest_batch" in line.get(n, {}))
        largest = (largest + " pairs") if largest else "–"
    elif part == "merge" and "float32" in line:
        base = f"float32 keeps {line['float32']['retained']:.3f}"
        new = f"bfloat16 keeps {line['bfloat16']['retained']:.3f} ({line['steps']} step)"
        ratio = _x(line.get("retained_ratio"))
    return [part, status, base, new, ratio, mem, largest, f"{line.get('wall_s', 0):.0f}"]


def render_table(lines: list[dict]) -> str:
    head = ["part", "status", "baseline", "measured", "ratio", "peak memory (baseline → measured)",
            "largest batch", "wall s"]
    rows = [head, ["---"] * len(head)] + [table_row(line) for line in lines]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = make_parser().parse_args(argv)
    try:
        a = resolve(a)
    except SuiteError as e:
        print(f"gpu_suite: {e}", file=sys.stderr)
        return 2
    if a.child:
        return run_child(a)

    from csr.bench.common import machine_info
    from csr.io import JsonlAppender

    log_dir = Path(a.log_dir) if a.log_dir else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_dumps_"))
    info = machine_info(a.device)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    command = "python scripts/gpu_suite.py " + " ".join(argv)
    end = time.monotonic() + a.total_budget
    print(f"gpu_suite {run_id}: {', '.join(a.parts)} at {a.size} on {a.device} ({info['gpu'] or 'CPU'}); "
          f"logs in {log_dir}", flush=True)
    lines = []
    with JsonlAppender(a.out) as sink:
        for part in a.parts:
            left = end - time.monotonic()
            budget = min(getattr(a, f"budget_{part}"), left)
            info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # as the part starts
            if left < 5:
                result = {"status": "skipped", "wall_s": 0.0, "error": "the suite's --total-budget is spent"}
            else:
                print(f"[{part}] budget {budget:.0f} s ...", flush=True)
                try:
                    result = run_part(a, argv, part, budget, log_dir, tmp)
                except Exception as err:  # noqa: BLE001 - the suite's own fault: record it, go on
                    result = {"status": "failed", "wall_s": 0.0, "error": f"gpu_suite: {type(err).__name__}: {err}"}
            line = {"bench": "gpu_suite", "part": part, "run_id": run_id, "size": a.size, "device": a.device,
                    "budget_s": round(budget, 1), **result, **info, "command": command}
            sink.write(line)  # now: a later timeout or crash cannot lose it
            lines.append(line)
            print(f"[{part}] {line['status']} in {line['wall_s']} s" +
                  (f": {line['error']}" if line.get("error") else ""), flush=True)
            if line["status"] not in ("ok", "skipped"):
                for log in sorted(log_dir.glob(f"{part}*.log")):
                    tail = log.read_text(errors="replace").splitlines()[-12:]
                    print(f"--- last lines of {log} ---\n" + "\n".join(tail), flush=True)
    table = render_table(lines)
    (log_dir / "table.md").write_text(table + "\n")
    print(f"\n{table}\n\n{len(lines)} line(s) appended to {a.out}", flush=True)
    return 0 if all(line["status"] == "ok" for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
