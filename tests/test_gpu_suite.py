"""scripts/gpu_suite.py: the CPU smoke run at tiny shape, part isolation, the probe, merge retention."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csr.bench.common import probe_largest
from csr.bench.suite import adam_lora_delta
from csr.train.merge import update_retention

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_suite.py"
_spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

COMMON_KEYS = {"bench", "part", "run_id", "status", "wall_s", "budget_s", "size", "device", "machine", "cpu_threads",
               "load_avg_1m", "torch", "transformers", "date", "command"}


def run_suite(tmp_path, *args):
    out, logs = tmp_path / "results.jsonl", tmp_path / "logs"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--out", str(out),
                           "--log-dir", str(logs), *args], capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return proc, {line["part"]: line for line in lines}, logs


@pytest.mark.slow
def test_every_part_runs_at_tiny_shape_on_cpu(tmp_path):
    proc, parts, logs = run_suite(tmp_path, "--no-zero")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(parts) == ["generate", "clip", "dpo", "merge"]
    for line in parts.values():
        assert COMMON_KEYS <= set(line) and line["status"] == "ok" and line["bench"] == "gpu_suite"
    assert len({line["run_id"] for line in parts.values()}) == 1

    gen = parts["generate"]
    fast, ref = gen["fast"], gen["reference"]
    assert fast["candidates"] > 0 and ref["candidates"] > 0 and ref["prompts"] == gen["prompts"] == 2
    assert gen["speedup"] == round(fast["candidates_per_s"] / ref["candidates_per_s"], 2)
    assert gen["trees"] == {"compared": 2, "identical": 2}  # float32 on the CPU: the same trees
    assert gen["probe"]["stopped"] == "cap" and [t["size"] for t in gen["probe"]["tries"]] == [4]
    assert gen["largest_prompt_batch"] == 4

    clip = parts["clip"]
    assert clip["batched"]["sentences"] == clip["per_sentence_loop"]["sentences"] == 3 * 6
    loop = clip["per_sentence_loop"]["sentences_per_s"]
    assert clip["speedup"] == round(clip["batched"]["sentences_per_s"] / loop, 2)
    assert clip["max_abs_score_diff"] < 1e-3

    dpo = parts["dpo"]
    assert dpo["zero2"] == {"status": "skipped", "error": "--no-zero"} and dpo["tokens_per_s_ratio"] is None
    plain = dpo["plain"]
    assert plain["status"] == "ok" and plain["deepspeed_zero_stage"] is None and plain["lora_modules"] == 14
    assert len(plain["step_times_s"]) == 5 and plain["tokens_per_step"] > 0
    assert plain["tokens_per_s"] == pytest.approx(plain["tokens_per_step"] / plain["step_s"], rel=1e-2)
    assert [t["size"] for t in plain["probe"]["tries"]] == [2, 4] and plain["largest_batch"] == 4

    merge = parts["merge"]
    assert [row["steps"] for row in merge["by_steps"]] == [1, 10, 100, 1000]
    assert merge["float32"]["retained"] == pytest.approx(1.0, abs=1e-3)
    assert merge["bfloat16"]["retained"] < 0.1
    assert merge["retained_ratio"] == round(merge["bfloat16"]["retained"] / merge["float32"]["retained"], 4)

    table = (logs / "table.md").read_text()
    assert table.splitlines()[0].startswith("| part | status | baseline")
    assert len(table.splitlines()) == 2 + 4 and table in proc.stdout
    assert "| generate | ok | reference" in table and "| merge | ok | float32 keeps 1.000" in table


@pytest.mark.slow
def test_a_failing_or_slow_part_is_recorded_and_the_others_run(tmp_path):
    proc, parts, logs = run_suite(tmp_path, "--parts", "generate,clip,merge", "--budget-generate", "1",
                                  "--clip-model", "no-such-clip", "--merge-steps", "1")
    assert proc.returncode == 1
    assert parts["generate"]["status"] == "timeout" and "budget of 1 s" in parts["generate"]["error"]
    assert parts["clip"]["status"] == "failed" and "no-such-clip" in parts["clip"]["error"]
    assert parts["merge"]["status"] == "ok"
    assert "| generate | timeout |" in proc.stdout and "| clip | failed |" in proc.stdout
    assert (logs / "clip.log").is_file()


def test_bad_arguments_are_refused_in_one_line(capsys):
    if not torch.cuda.is_available():
        assert suite.main(["--device", "cuda", "--out", "/nonexistent/x.jsonl"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gpu_suite: --device cuda but torch") and "\n" not in err
    assert suite.main(["--device", "cpu", "--size", "7b", "--parts", "merge,dpo"]) == 2
    assert "--size 7b on the CPU" in capsys.readouterr().err
    assert suite.main(["--device", "cpu", "--size", "tiny", "--parts", "generate,sing"]) == 2
    assert "choose from generate, clip, dpo, merge" in capsys.readouterr().err
    assert suite.main(["--device", "cpu", "--size", "tiny", "--parts", "dpo", "--accelerate-config", "zero9"]) == 2
    assert "--accelerate-config='zero9': no such file" in capsys.readouterr().err


def test_defaults_are_the_issue_and_paper_settings():
    from csr.train_config import TrainConfig

    a = suite.resolve(suite.make_parser().parse_args(["--device", "cpu", "--size", "tiny"]))
    paper = TrainConfig(use_cpu=True, bf16=False)
    assert (a.lora_r, a.lora_alpha, a.lr) == (paper.lora_r, paper.lora_alpha, paper.learning_rate)
    assert (a.num_candidates, a.sentence_beam_width, a.max_sentences) == (5, 5, 3)
    seven = suite.SIZE_DEFAULTS["7b"]
    assert (seven["prompts"], seven["max_new_tokens"]) == (16, 32)
    assert sum(seven[f"budget_{p}"] for p in suite.PART_NAMES) <= a.total_budget <= 480  # the 8 minutes


def test_table_renders_failed_and_partial_parts():
    lines = [{"part": "generate", "status": "timeout", "wall_s": 3.0},
             {"part": "generate", "status": "timeout", "wall_s": 9.0, "fast": {"candidates_per_s": 10.0}},
             {"part": "dpo", "status": "partial", "wall_s": 5.0, "zero2": {"status": "failed", "error": "x"},
              "plain": {"status": "ok", "tokens_per_s": 100.0, "step_s": 0.5, "peak_mem_mb": 2048.0,
                        "largest_batch": 8, "probe": {"first_oom": 16, "stopped": "oom"}},
              "tokens_per_s_ratio": None},
             {"part": "clip", "status": "failed", "wall_s": 0.0, "error": "missing"}]
    rows = suite.render_table(lines).splitlines()
    assert len(rows) == 6
    assert "fast 10.0 cand/s" in rows[3]
    assert "plain 100 tok/s (0.500 s/step)" in rows[4] and "zero2: failed" in rows[4]
    assert "plain 8 (OOM at 16) pairs" in rows[4] and "2.0 GB" in rows[4]


def test_probe_doubles_until_the_first_out_of_memory():
    def try_size(n):
        if n > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"seconds": 0.0}

    res = probe_largest(try_size, [2, 4, 8, 16, 32])
    assert res["largest_fit"] == 8 and res["first_oom"] == 16 and res["stopped"] == "oom"
    assert [t["size"] for t in res["tries"]] == [2, 4, 8, 16] and not res["tries"][-1]["ok"]

    def broken(n):
        raise ValueError("not memory")

    res = probe_largest(broken, [2, 4])
    assert res["stopped"] == "error" and res["largest_fit"] is None and "ValueError" in res["tries"][0]["error"]
    import time

    res = probe_largest(lambda n: time.sleep(0.05) or {}, [1, 2, 4], deadline=time.monotonic() + 0.06)
    assert res["stopped"] == "budget" and res["largest_fit"] == 1  # a second try would pass the deadline


def test_merge_retention_by_hand():
    # 1.0 in bfloat16: 8 significant bits, so the next value up is 1 + 2^-7. A whole step survives
    # a bfloat16 save; a quarter step rounds back to 1.0. In float32 (spacing 2^-23) both survive.
    w0 = torch.ones(4, 4, dtype=torch.bfloat16)
    whole, quarter = torch.full((4, 4), 2.0 ** -7), torch.full((4, 4), 2.0 ** -9)
    assert update_retention(w0, whole, torch.bfloat16)["retained"] == 1.0
    r = update_retention(w0, quarter, torch.bfloat16)
    assert r["retained"] == 0.0 and r["changed_fraction"] == 0.0
    r = update_retention(w0, quarter, torch.float32)
    assert r["retained"] == 1.0 and r["changed_fraction"] == 1.0


def test_one_adam_step_at_lr_1e7_is_lost_in_bfloat16():
    # LLaMA-like weights (std 0.02) sit in bfloat16 binades with a spacing of ~1.2e-4 (2^-13 for
    # |w| in [2^-6, 2^-5)). One Adam step moves each lora_B element by lr = 1e-7, so
    # delta = alpha/r * B A has rms 2 * 1e-7 * sqrt(128) / sqrt(3 * 64) ~ 1.6e-7 at in = 64: a
    # thousandth of a bfloat16 step, so all but the rare near-zero weights round back. float32's
    # spacing there is ~1.9e-9, a hundredth of the update: it keeps it all.
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(64, 64, generator=gen) * 0.02).to(torch.bfloat16)
    delta = adam_lora_delta(64, 64, r=128, alpha=256, lr=1e-7, steps=1, generator=gen, device="cpu")
    assert float(delta.pow(2).mean().sqrt()) == pytest.approx(2e-7 * 128 ** 0.5 / (3 * 64) ** 0.5, rel=0.05)
    f32, bf16 = update_retention(w0, delta, torch.float32), update_retention(w0, delta, torch.bfloat16)
    assert f32["retained"] == pytest.approx(1.0, abs=1e-3) and f32["changed_fraction"] > 0.95
    assert bf16["retained"] < 0.05 and bf16["changed_fraction"] < 0.01
