"""Recipes and overrides: paper defaults, refusals before any model loads, every shipped recipe parses."""

from pathlib import Path

import pytest

from csr.config import ConfigError, describe_keys, load_config

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").rglob("*.yaml")
                 if "accelerate_configs" not in p.parts and not p.name.endswith("suite.yaml"))  # world suites: test_world_suite


def test_paper_defaults():
    cfg = load_config()
    g, s = cfg.generate, cfg.score
    assert (g.num_candidates, g.diversity_penalty, g.sentence_beam_width) == (5, 3.0, 5)
    assert (g.pruning, g.selection, g.max_new_tokens, g.max_response_chars) == ("official", "calibrated", 74, 1024)
    assert (s.reward_lambda, s.calibration, s.clip_clamp) == (0.9, "raw", True)
    assert (s.clip_model, s.clip_pretrained) == ("ViT-L-14-336", "openai")
    assert cfg.run.rounds == 3 and cfg.model.trust_remote_code is False


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_recipe_parses_and_starts_with_its_command(recipe, tmp_path):
    from csr.train.args import build_train_args

    cfg = load_config(recipe)
    assert cfg.run.rounds >= 1
    head = recipe.read_text().splitlines()[:6]
    assert any("csr " in line for line in head if line.startswith("#")), "a recipe starts with its launch command"
    build_train_args(cfg, tmp_path / "train", cuda_available=False)  # its train section is a valid TrainConfig


def test_overrides_are_typed_and_win(tmp_path):
    cfg = load_config(None, ["generate.num_candidates=3", "score.reward_lambda=0.5", "pairs.cleaning=none",
                             "data.max_prompts=null", "train.beta=0.2", "train.learning_rate=1e-7",
                             "train.save_strategy=no"])
    assert cfg.generate.num_candidates == 3 and cfg.score.reward_lambda == 0.5
    assert cfg.pairs.cleaning == "none" and cfg.data.max_prompts is None
    assert cfg.train == {"beta": 0.2, "learning_rate": 1e-7, "save_strategy": "no"}  # YAML 1.1 quirks undone
    recipe = tmp_path / "r.yaml"
    recipe.write_text("generate:\n  num_candidates: 4\n")
    assert load_config(recipe, ["generate.num_candidates=2"]).generate.num_candidates == 2
    assert load_config(recipe).generate.num_candidates == 4


@pytest.mark.parametrize("text, message", [
    ("generate:\n  num_candidate: 3\n", "Did you mean 'num_candidates'"),
    ("generat:\n  num_candidates: 3\n", "Did you mean 'generate'"),
    ("train:\n  learning_rte: 1.0e-7\n", "Did you mean 'learning_rate'"),
    ("train:\n  lora_rank: 8\n", "'lora_r'"),
    ("generate:\n  num_candidates: three\n", "must be an integer"),
    ("generate:\n  num_candidates: 0\n", "must be >= 1"),
    ("generate:\n  sentence_beam_width: -2\n", "must be >= 1"),
    ("score:\n  reward_lambda: 1.5\n", "must be in [0, 1]"),
    ("score:\n  calibration: ranks\n", "is not one of"),
    ("pairs:\n  drop_unexpected_scripts: maybe\n", "must be true or false"),
    ("pairs:\n  cleaning: official\n  max_repeats: 3\n", "applies only with pairs.cleaning=strict"),
    ("- just\n- a list\n", "a recipe is a mapping"),
    ("generate: [1, 2]\n", "must be a mapping"),
])
def test_bad_recipes_are_refused_naming_the_key(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert message in str(err.value)


def test_bad_overrides_and_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["num_candidates=3"])
    with pytest.raises(ConfigError, match="Did you mean 'diversity_penalty'"):
        load_config(None, ["generate.diversity=1.0"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_has_help():
    for section in ["run", "model", "data", "generate", "score", "pairs"]:
        text = describe_keys(section)
        for block in text.split(f"\n{section}.")[1:]:
            assert block.split("\n", 1)[1].strip(), f"{section}.{block.split()[0]} has no help"
    train = describe_keys("train")
    assert "train.lora_r = 128" in train and "train.learning_rate = 1e-07" in train
