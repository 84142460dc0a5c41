"""The search benchmark refuses a busy machine (its ratios would not hold) unless told otherwise,
and reports the median of repeated runs."""

import importlib.util
import os
from pathlib import Path

from csr.bench.common import busy_reason, summarise_runs

SCRIPT = Path(__file__).parent.parent / "scripts" / "bench_generate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_busy_machine_is_refused_before_any_run(monkeypatch, tmp_path, capsys):
    bench = load_script()
    monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count() or 1) + 0.5, 1.0, 1.0))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    out = tmp_path / "results.jsonl"
    assert bench.main(["--size", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "refusing to record" in err and "--allow-busy" in err
    assert not out.exists()


def test_busy_reason_and_medians():
    assert busy_reason(2.5, 2) is not None and "2.50" in busy_reason(2.5, 2)
    assert busy_reason(2.0, 2) is None
    runs = [{"seconds": s, "candidates_per_s": c, "peak_mem_mb": m, "candidates": 10}
            for s, c, m in [(3.0, 1.0, 900.0), (1.0, 3.0, 700.0), (2.0, 2.5, 800.0)]]
    summary = summarise_runs(runs)
    assert summary["candidates_per_s"] == 2.5 and summary["peak_mem_mb"] == 800.0 and summary["seconds"] == 2.0
    assert summary["runs_candidates_per_s"] == [1.0, 3.0, 2.5]
