"""Multi-process launches: refused before work when the machine cannot serve them; a real
2-process CPU round (generate sharded, DPO under DeepSpeed ZeRO-2) when it can."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from csr.config import ConfigError, load_config
from csr.launch import check_launch, stage_command

ROOT = Path(__file__).parent.parent


def test_bad_launches_are_refused_before_work(tmp_path):
    cfg = load_config(None, ["run.num_processes=4096", f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="run.num_processes=4096 but this machine has"):
        check_launch(cfg)
    cfg = load_config(None, ["run.num_processes=2", "run.accelerate_config=zero7"])
    with pytest.raises(ConfigError, match="ddp, zero2, zero2_offload, zero3"):
        check_launch(cfg)
    assert check_launch(load_config(None, ["run.num_processes=1"])) is None
    assert check_launch(load_config(None, ["run.num_processes=2"])).endswith("zero2.yaml")
    cmd = stage_command("recipes/accelerate_configs/zero2.yaml", 2, "train", ["--out", "x"])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-4:] == ["csr.cli", "train", "--out", "x"]


@pytest.mark.slow  # subprocesses: ~15-25 s
def test_cli_reports_a_bad_launch_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "csr.cli", "run", "--config", str(ROOT / "recipes/tiny/csr.yaml"),
                          "run.num_processes=4096", f"run.output_dir={tmp_path}"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "csr run: error: run.num_processes=4096" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "round_1").exists()


@pytest.mark.slow
def test_one_round_on_two_cpu_processes_with_zero2(tiny_llava_dir, tiny_clip_dir, tmp_path):
    cmd = [sys.executable, "-m", "csr.cli", "run", "--config", str(ROOT / "recipes/tiny/csr.yaml"),
           f"model.model_name_or_path={tiny_llava_dir}", f"score.clip_model={tiny_clip_dir}",
           f"data.prompts={ROOT / 'data/tiny/prompts.json'}", f"data.image_root={ROOT / 'data/tiny/images'}",
           f"run.output_dir={tmp_path / 'run'}", "run.rounds=1", "run.num_processes=2",
           "run.accelerate_config=zero2", "train.per_device_train_batch_size=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rd = tmp_path / "run" / "round_1"
    gen = json.loads((rd / "generate" / "DONE.json").read_text())
    assert gen["world_size"] == 2 and gen["trees"] == 4
    assert sorted(len(s) for s in [(rd / "generate/shards/trees.rank0.jsonl").read_text().splitlines(),
                                   (rd / "generate/shards/trees.rank1.jsonl").read_text().splitlines()]) == [2, 2]
    train = json.loads((rd / "train" / "DONE.json").read_text())
    assert train["world_size"] == 2 and train["deepspeed_zero_stage"] == 2 and train["steps"] >= 1
    assert train["reference_unchanged"] is True
    assert (rd / "merge" / "model.safetensors").is_file()
