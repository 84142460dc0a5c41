"""Multi-node: the accelerate command of each machine, the recipe fields, rank > 0 waiting for rank 0."""

import threading
import time

import pytest

from csr.config import ConfigError, load_config
from csr.io import mark_done
from csr.launch import check_launch, stage_command, wait_for


def test_stage_command_for_two_machines_of_eight():
    cmd = stage_command("zero2.yaml", 8, "train", ["--config", "c.yaml"], num_machines=2, machine_rank=1,
                        main_process_ip="10.0.0.1", main_process_port=29501)
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--num_processes"] == "16"  # accelerate counts the processes of all machines
    assert (flags["--num_machines"], flags["--machine_rank"]) == ("2", "1")
    assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("10.0.0.1", "29501")
    assert cmd[-4:] == ["csr.cli", "train", "--config", "c.yaml"]
    one = stage_command("zero2.yaml", 8, "train", [])
    assert "--num_machines" not in one and one[one.index("--num_processes") + 1] == "8"


def test_multinode_fields_are_checked():
    cfg = load_config(None, ["run.num_machines=2", "run.machine_rank=1", "run.main_process_ip=10.0.0.1"])
    assert check_launch(cfg).endswith("zero2.yaml")  # one process a machine still launches through accelerate
    with pytest.raises(ConfigError, match="run.machine_rank=2"):
        load_config(None, ["run.num_machines=2", "run.machine_rank=2", "run.main_process_ip=h"])
    with pytest.raises(ConfigError, match="run.main_process_ip"):
        load_config(None, ["run.num_machines=2"])


def test_a_machine_of_rank_1_waits_for_rank_0(tmp_path):
    stage = tmp_path / "round_1" / "pairs"
    threading.Timer(0.3, lambda: mark_done(stage, {"stage": "pairs", "pairs": 3})).start()
    started = time.monotonic()
    assert wait_for(stage, "pairs", poll_s=0.05, timeout_s=10)["pairs"] == 3
    assert time.monotonic() - started >= 0.25
    with pytest.raises(TimeoutError, match="merge"):
        wait_for(tmp_path / "round_1" / "merge", "merge", poll_s=0.05, timeout_s=0.2)


def test_a_round_on_rank_1_joins_train_and_takes_rank_0s_merge(tmp_path, monkeypatch):
    from csr import loop

    cfg = load_config(None, ["run.num_machines=2", "run.machine_rank=1", "run.main_process_ip=h"])
    rd = tmp_path / "round_1"
    for stage in ("pairs", "train", "merge"):  # what machine 0 wrote
        mark_done(rd / stage, {"stage": stage})
    calls = []
    policy = loop.follow_round(cfg, "base", rd, lambda stage, out, in_process, extra: calls.append((stage, out, extra)))
    assert calls == [("train", rd / "train", ["--pairs", str(rd / "pairs")])]  # no score, pairs or merge here
    assert policy == str(rd / "merge")
