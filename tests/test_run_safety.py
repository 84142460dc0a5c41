"""A user's data is never lost or mixed (issue 18): csr writes only into folders it owns, one process
writes a run, a changed recipe never mixes with kept results, and a recipe is checked before work."""

import json
import os
import signal
from pathlib import Path

import pytest

from csr.config import ConfigError, load_config
from csr.io import read_done, read_jsonl
from csr.loop import run
from csr.runstate import MARKER, FolderLock, RunLocked, SettingsChanged

ROOT = Path(__file__).parent.parent


@pytest.fixture
def recipe(tiny_llava_dir, tiny_clip_dir, tmp_path):
    def make(out=None, *extra):
        return load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [
            f"model.model_name_or_path={tiny_llava_dir}", f"score.clip_model={tiny_clip_dir}",
            f"data.prompts={ROOT / 'data' / 'tiny' / 'prompts.json'}",
            f"data.image_root={ROOT / 'data' / 'tiny' / 'images'}", "data.max_prompts=2",
            f"run.output_dir={out if out is not None else tmp_path / 'run'}", "run.rounds=1", *extra])
    return make


# ---------------------------------------------------------------------------------------------
# Output folders are csr's own
# ---------------------------------------------------------------------------------------------


def test_a_folder_holding_a_users_files_is_refused_untouched(recipe, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my: own config\n")
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already holds files csr did not write.*'notes.txt'"):
        run(recipe(project))
    assert (project / "config.yaml").read_text() == "my: own config\n" and sorted(os.listdir(project)) == \
        ["config.yaml", "notes.txt"]


@pytest.mark.parametrize("out", ["", ".", "./"])
def test_the_current_folder_is_never_a_run_folder(recipe, tmp_path, out, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="current folder"):
        run(recipe(out))
    assert os.listdir(tmp_path) == []


def test_a_world_build_never_deletes_a_users_folder(tmp_path):
    from csr.world.build import ensure_world

    out = tmp_path / "mine"
    for part in ("train", "test", "models"):
        (out / part).mkdir(parents=True)
        (out / part / "data.csv").write_text("precious")
    with pytest.raises(ConfigError, match="csr did not write"):
        ensure_world(out, seed=0)
    assert all((out / part / "data.csv").read_text() == "precious" for part in ("train", "test", "models"))


# ---------------------------------------------------------------------------------------------
# One writer
# ---------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(recipe, tmp_path):
    run_dir = tmp_path / "run"
    with FolderLock(run_dir):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            run(recipe())
    assert not (run_dir / "round_1").exists()


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "run"
    code = ("import os, signal, sys; from csr.runstate import FolderLock; l = FolderLock(sys.argv[1]).__enter__(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    res = subprocess.run([sys.executable, "-c", code, str(folder)])
    assert res.returncode == -signal.SIGKILL and (folder / ".csr-lock").is_file()  # the file stays behind...
    with FolderLock(folder):  # ...but the system released the lock with the process
        assert (folder / ".csr-lock").read_text() == str(os.getpid())


# ---------------------------------------------------------------------------------------------
# A changed recipe never mixes with kept results
# ---------------------------------------------------------------------------------------------


def test_a_changed_recipe_is_refused_then_redone_from_the_stage(recipe, tmp_path):
    search = "generate.selection=self"  # the search does not use λ, so only score and after depend on it
    run(recipe(None, search))
    rd = tmp_path / "run" / "round_1"
    kept = {s: read_done(rd / s) for s in ("generate", "score", "pairs")}
    with pytest.raises(SettingsChanged, match=r"round_1/score: score.reward_lambda: 0.9 -> 0.1\n.*--redo-from score"):
        run(recipe(None, search, "score.reward_lambda=0.1"))
    assert {s: read_done(rd / s) for s in kept} == kept  # nothing touched
    run(recipe(None, search, "score.clip_batch_size=3"))  # a memory knob is no result: still finished
    assert {s: read_done(rd / s) for s in kept} == kept
    summary = run(recipe(None, search, "score.reward_lambda=0.1"), redo_from="score")
    assert read_done(rd / "generate") == kept["generate"]  # before the redone stage: kept
    assert read_done(rd / "score")["settings"]["score.reward_lambda"] == 0.1
    stale = list((tmp_path / "run" / "stale").glob("*/round_1/score"))
    assert len(stale) == 1 and read_done(stale[0]) == kept["score"]  # moved aside, not deleted
    assert summary["rounds"][0]["stages"]["train"]["settings"]  # train redone on the new pairs


def test_a_stage_recorded_when_a_speed_key_still_counted_is_finished(recipe, tmp_path):
    from csr.generate.stage import run_generate
    from csr.io import atomic_write_json
    from csr.runstate import StageGuard, _digest

    cfg = recipe()
    done = run_generate(cfg, cfg.model.model_name_or_path, tmp_path / "gen")
    assert "generate.prefix_attention" not in done["settings"]          # a speed key: not a result
    # as an older csr recorded it: the speed key among the settings, in the fingerprint
    old = {**done["settings"], "generate.prefix_attention": "copies"}
    inputs = StageGuard(tmp_path / "gen", "generate", cfg, inputs=(cfg.model.model_name_or_path,)).inputs
    atomic_write_json(tmp_path / "gen" / "DONE.json", {**done, "settings": old,
                                                       "fingerprint": _digest({"settings": old, "inputs": inputs})})
    assert run_generate(cfg, cfg.model.model_name_or_path, tmp_path / "gen")["settings"] == old  # kept, not redone
    from csr.runstate import changed_keys
    assert changed_keys(old, done["settings"]) == []                    # the run's resume check agrees
    changed = recipe(None, "generate.num_candidates=2")                 # a result key still refuses
    with pytest.raises(SettingsChanged, match="generate.num_candidates: 3 -> 2"):
        run_generate(changed, changed.model.model_name_or_path, tmp_path / "gen")


def test_a_stage_alone_refuses_a_half_finished_folder_made_with_other_settings(recipe, tmp_path):
    from csr.generate.stage import run_generate

    cfg = recipe()
    run_generate(cfg, cfg.model.model_name_or_path, tmp_path / "gen")
    (tmp_path / "gen" / "DONE.json").unlink()  # as if killed before the end
    changed = recipe(None, "generate.num_candidates=2")
    with pytest.raises(SettingsChanged, match=r"half-finished with other settings: generate.num_candidates: 3 -> 2"):
        run_generate(changed, changed.model.model_name_or_path, tmp_path / "gen")


@pytest.mark.slow
def test_kill_then_resume_with_a_changed_key_is_refused_then_redone(tiny_llava_dir, tiny_clip_dir, tmp_path):
    from test_faults import csr_run, overrides

    args = [*overrides(tiny_llava_dir, tiny_clip_dir, tmp_path / "run"), "generate.selection=self"]
    out = csr_run(args, "score.tree_written:2")
    assert out.returncode == -signal.SIGKILL
    out = csr_run([*args, "score.reward_lambda=0.5"])
    assert out.returncode == 2 and "score.reward_lambda: 0.9 -> 0.5" in out.stderr and "Traceback" not in out.stderr
    out = csr_run([*args, "score.reward_lambda=0.5", "--redo-from", "score"])
    assert out.returncode == 0, out.stderr[-2000:]
    trees = read_jsonl(tmp_path / "run" / "round_1" / "score" / "scored.jsonl")
    assert len(trees) == 4 and len({t["id"] for t in trees}) == 4  # whole, no half from the old λ
    assert read_done(tmp_path / "run" / "round_1" / "score")["settings"]["score.reward_lambda"] == 0.5


# ---------------------------------------------------------------------------------------------
# Checks before work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.lora_r=0", "train.lora_r=0 must be >= 1"),
    ("train.learning_rate=-1", "train.learning_rate=-1.0 must be > 0"),
    ("train.beta=-0.5", "train.beta=-0.5 must be > 0"),
    ("train.per_device_train_batch_size=0", "per_device_train_batch_size=0 must be >= 1"),
])
def test_the_train_section_is_checked_before_any_work(recipe, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(recipe(None, override))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("data.max_prompts=0", "data.max_prompts=0 must be >= 1"),
    ("data.max_prompts=-2", "data.max_prompts=-2 must be >= 1"),
    ("generate.max_response_chars=-1", "max_response_chars=-1 must be >= 1"),
    ("model.device=cuda:7", "model.device='cuda:7', but this machine has"),
    ("model.device=tpu", "use auto, cpu, cuda or cuda:N"),
])
def test_bad_values_are_refused_when_the_recipe_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("score:\n  reward_lambda: 0.2\n  reward_lambda: 0.9\n")
    with pytest.raises(ConfigError, match=r"line 3: key 'reward_lambda' is given twice"):
        load_config(path)


def test_the_marker_is_written_once_and_adopts_an_older_run(recipe, tmp_path):
    old = tmp_path / "old"
    (old / "round_1").mkdir(parents=True)
    (old / "config.yaml").write_text(json.dumps({"run": {"rounds": 1}}))  # what an older csr left
    from csr.runstate import claim_folder

    assert claim_folder(old, "run.output_dir") == old and (old / MARKER).is_file()


def test_config_check_runs_the_checks_csr_run_runs(tmp_path, capsys):
    from csr.cli import main as csr_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora_r: 0\n")
    assert csr_main(["config", "--check", str(bad)]) == 2
    assert "train.lora_r=0 must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# One bad record never blocks a stage
# ---------------------------------------------------------------------------------------------


def test_a_record_the_tokenizer_refuses_is_skipped_not_the_batch(recipe, tmp_path):
    from csr.generate.stage import run_generate
    from csr.io import StageInputMissing

    records = json.loads((ROOT / "data" / "tiny" / "prompts.json").read_text())
    records[1]["input"] = "Describe \ud800 this.\n<image>"  # a lone surrogate: no tokenizer encodes it
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(records))
    cfg = recipe(None, f"data.prompts={prompts}", "data.max_prompts=4")
    summary = run_generate(cfg, cfg.model.model_name_or_path, tmp_path / "gen")
    ids = [t["id"] for t in read_jsonl(tmp_path / "gen" / "trees.jsonl")]
    assert len(ids) == len(records) - 1 and records[1]["id"] not in ids
    assert summary["skipped"] == {"record_error": 1}
    # a file where no record can be grown is not marked done (a fixed file is used on the next run)
    for r in records:
        r["input"] = "Describe \ud800.\n<image>"
    prompts.write_text(json.dumps(records))
    with pytest.raises(StageInputMissing, match="no tree was grown"):
        run_generate(cfg, cfg.model.model_name_or_path, tmp_path / "gen2")
    assert not (tmp_path / "gen2" / "DONE.json").exists()


# ---------------------------------------------------------------------------------------------
# Eval refuses nothing-to-score inputs before generating
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, lines, kwargs, message", [
    ("pope", [], {}, "holds no POPE question"),
    ("pope", [{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "maybe"}], {}, "is not yes or no"),
    ("pope", [{"question_id": 1, "image": "a.png", "text": "Q?", "label": "yes"},
              {"question_id": 1, "image": "a.png", "text": "Q?", "label": "no"}], {}, "appears twice with different"),
    ("pope", [{"question_id": 1, "image": "a.png", "text": "Q?", "label": "yes"}], {"limit": -1}, "limit=-1"),
    ("chair", [], {}, "holds no caption record"),
    ("chair", [{"id": "a", "image": "a.png", "objects": "dog"}], {}, "read letter by letter"),
])
def test_eval_refuses_bad_sets_before_loading_a_model(tmp_path, kind, lines, kwargs, message):
    from csr.data import BadInput
    from csr.eval.run import evaluate_model
    from csr.io import write_jsonl

    path = tmp_path / f"{kind}.jsonl"
    write_jsonl(path, lines)
    # a model path that does not exist: the check must come first
    with pytest.raises(BadInput, match=message):
        evaluate_model(str(tmp_path / "no-model"), **{f"{kind}_path": path}, **kwargs)


def test_eval_refuses_an_empty_synonym_table(tmp_path):
    from csr.data import BadInput
    from csr.eval.run import evaluate_model
    from csr.io import write_jsonl

    write_jsonl(tmp_path / "chair.jsonl", [{"id": "a", "image": "a.png", "objects": ["dog"]}])
    (tmp_path / "synonyms.json").write_text("{}")
    with pytest.raises(BadInput, match="defines no object"):
        evaluate_model(str(tmp_path / "no-model"), chair_path=tmp_path / "chair.jsonl")


# ---------------------------------------------------------------------------------------------
# Damaged files end in one line naming them
# ---------------------------------------------------------------------------------------------


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("torn_config", "config.json' is not valid JSON"),
    ("truncated_weights", "cannot load the weights"),
    ("hostile_header", "cannot load the weights"),
])
def test_a_damaged_model_folder_is_one_line(tiny_llava_dir, tmp_path, damage, message):
    from csr.models import ModelLoadError, load_policy

    model = _copy_model(tiny_llava_dir, tmp_path / "model")
    weights = next(model.glob("*.safetensors"))
    if damage == "torn_config":
        text = (model / "config.json").read_text()
        (model / "config.json").write_text(text[: len(text) // 2])
    elif damage == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 3])
    else:  # a header that claims to be 2**60 bytes long
        weights.write_bytes((2 ** 60).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match=message):
        load_policy(str(model), device="cpu")


def test_a_torn_done_file_and_a_read_only_folder_are_one_line(recipe, tmp_path):
    import stat

    from csr.cli import main as csr_main
    from csr.io import StageInputMissing, mark_done
    from csr.io import read_done as read

    mark_done(tmp_path / "stage", {"stage": "x"})
    (tmp_path / "stage" / "DONE.json").write_text("")  # 0 bytes
    with pytest.raises(StageInputMissing, match="unreadable.*delete it to redo"):
        read(tmp_path / "stage")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps({"run": {"output_dir": str(locked / "run")}}))
    assert csr_main(["run", "--config", str(recipe_file)]) == 2


def test_a_tree_clip_cannot_read_is_skipped_not_the_batch(recipe, tmp_path, monkeypatch):
    from csr.generate.stage import run_generate
    from csr.score import stage as score_stage

    cfg = recipe(None, "generate.selection=self", "data.max_prompts=3", "score.tree_batch_size=3")
    run_generate(cfg, cfg.model.model_name_or_path, tmp_path / "gen")
    trees = read_jsonl(tmp_path / "gen" / "trees.jsonl")
    bad = trees[1]["id"]
    real = score_stage.add_clip_scores

    def fussy(batch, images, clip):  # a CLIP tokenizer that fails on one tree's text
        if any(t["id"] == bad for t in batch):
            raise ValueError("cannot tokenize")
        return real(batch, images, clip)
    monkeypatch.setattr(score_stage, "add_clip_scores", fussy)
    summary = score_stage.run_score(cfg, tmp_path / "gen", tmp_path / "score")
    scored = [t["id"] for t in read_jsonl(tmp_path / "score" / "scored.jsonl")]
    assert bad not in scored and len(scored) == len(trees) - 1 and summary["skipped"] == {"record_error": 1}


def test_an_unexpected_error_is_one_line_and_the_traceback_comes_with_v(monkeypatch, capsys):
    import csr.config
    from csr.cli import main as csr_main

    def broken(argv=None):
        raise RuntimeError("something deep broke\nsecond line")
    monkeypatch.setattr(csr.config, "main", broken)
    assert csr_main(["config"]) == 1
    err = capsys.readouterr().err
    assert "csr config: error: RuntimeError: something deep broke (rerun with -v" in err and "Traceback" not in err
    with pytest.raises(RuntimeError):
        csr_main(["-v", "config"])


def test_records_that_are_not_objects_are_skipped_and_counted(tmp_path):
    from csr.data import load_prompts
    from csr.io import StageSummary

    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["just a string", 7, {"id": "p", "image": "a.png", "input": "Describe."}]))
    summary = StageSummary("generate")
    records = load_prompts(path, str(tmp_path), summary=summary)
    assert [r.id for r in records] == ["p"] and summary.skipped == {"not_a_record": 2}


def test_an_image_pattern_naming_an_unknown_field_is_refused():
    with pytest.raises(ConfigError, match=r"names \{img\}; only \{image\}"):
        load_config(None, ["data.image_pattern=COCO_{img}"])


def test_pickle_weights_beside_an_unrelated_safetensors_are_refused(tiny_llava_dir, tmp_path):
    from csr.models import ModelLoadError, check_model_source

    model = _copy_model(tiny_llava_dir, tmp_path / "model")
    next(model.glob("model*.safetensors")).rename(model / "pytorch_model.bin")  # the weights as a pickle name
    (model / "adapter_model.safetensors").write_bytes(b"{}")                    # and an unrelated safetensors
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        check_model_source(str(model))


def test_a_huge_chat_template_is_refused_at_once(tiny_llava_dir, tmp_path):
    from csr.models import ModelLoadError, load_processor

    model = _copy_model(tiny_llava_dir, tmp_path / "model")
    for f in list(model.glob("chat_template*")):
        f.unlink()
    (model / "chat_template.jinja").write_text("{{ 'x' }}" * 600_000)  # 5.4 million characters
    with pytest.raises(ModelLoadError, match="5,400,000 characters long"):  # refused before it is compiled
        load_processor(str(model))


def test_a_calibrated_search_depends_on_every_reward_term_weight():
    """The calibrated search ranks by the stored reward, VIG term included (csr.score.reward): a generate
    stage made at one VIG weight is not the one another weight would make."""
    from csr.config import load_config
    from csr.runstate import stage_settings

    calibrated = stage_settings(load_config(None, ["generate.selection=calibrated"]), "generate")
    weighted = stage_settings(load_config(None, ["generate.selection=calibrated", "score.vig_weight=1.0"]), "generate")
    assert calibrated["score.vig_weight"] == 0.0 and weighted["score.vig_weight"] == 1.0
    assert "score.clip_batch_size" not in calibrated  # speed, not results
    plain = stage_settings(load_config(None, ["generate.selection=self", "score.vig_weight=1.0"]), "generate")
    assert not any(k.startswith("score.") for k in plain)
