"""The command line as a new user meets it: version, usage lines, `csr config train`, quiet logs, the API."""

import logging

import pytest

from csr.cli import main as cli


def test_version(capsys):
    from csr import __version__

    assert cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"csr {__version__}"


@pytest.mark.parametrize("command", ["generate", "score", "pairs", "run", "view", "plan", "config"])
def test_each_usage_names_its_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: csr {command} ")


def test_config_train_shows_csrs_fields_and_the_common_trl_ones(capsys):
    assert cli(["config", "train"]) == 0
    short = capsys.readouterr().out
    assert cli(["config", "train", "--all"]) == 0
    everything = capsys.readouterr().out
    for key in ("train.lora_r", "train.train_projector", "train.learning_rate", "train.beta", "train.max_length"):
        assert key in short
    assert "train.hub_model_id" not in short and "train.hub_model_id" in everything
    assert "csr config train --all" in short and short.count("\n") * 3 < everything.count("\n")
    assert max(len(line) for line in short.splitlines()) <= 100


def test_third_party_logs_are_quiet_unless_verbose(capsys):
    from csr.cli import setup_logging

    root = logging.getLogger()
    before = root.level
    try:
        setup_logging()
        assert not root.isEnabledFor(logging.INFO)  # open_clip's logging.info lines: dropped
        assert logging.getLogger("csr.loop").isEnabledFor(logging.INFO)  # csr's own: shown
        setup_logging(verbose=True)
        assert root.isEnabledFor(logging.INFO)
    finally:
        root.setLevel(before)


def test_the_python_api():
    import csr
    from csr import load_config, run
    from csr.config import load_config as config_load
    from csr.loop import run as loop_run

    assert load_config is config_load and run is loop_run and "load_config" in csr.__all__
    assert load_config(None, ["run.rounds=2"]).run.rounds == 2
