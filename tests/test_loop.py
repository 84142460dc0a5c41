"""`csr run` on the tiny recipe: two rounds end to end, the round-2 model differs from round 1's,
a rerun skips finished work, and a longer rerun continues from the last finished round."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from csr.config import load_config
from csr.io import read_done
from csr.loop import run

ROOT = Path(__file__).parent.parent


@pytest.fixture
def tiny_recipe(tiny_llava_dir, tiny_clip_dir, tmp_path):
    def make(*extra):
        return load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [
            f"model.model_name_or_path={tiny_llava_dir}", f"score.clip_model={tiny_clip_dir}",
            f"data.prompts={ROOT / 'data' / 'tiny' / 'prompts.json'}",
            f"data.image_root={ROOT / 'data' / 'tiny' / 'images'}",
            f"run.output_dir={tmp_path / 'run'}", *extra])
    return make


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.mark.slow  # two tiny rounds, then a resume: ~6-9 s (one round stays in the fast suite)
def test_two_rounds_end_to_end_then_resume(tiny_recipe, tmp_path, tiny_llava_dir):
    summary = run(tiny_recipe("run.rounds=1"))
    assert [r["round"] for r in summary["rounds"]] == [1]
    r1 = Path(summary["rounds"][0]["model"])
    assert r1 == tmp_path / "run" / "round_1" / "merge"
    base, w1 = weights(tiny_llava_dir), weights(r1)
    lm = [k for k in base if "language_model" in k and k.endswith("q_proj.weight")]
    assert lm and all(not (base[k] == w1[k]).all() for k in lm)  # DPO moved the LM through LoRA
    vision = [k for k in base if "vision_tower" in k]
    assert all((base[k] == w1[k]).all() for k in vision)  # ...and nothing else

    # a second, longer run keeps round 1 as it is and adds round 2 from round 1's model
    done_before = {s: read_done(tmp_path / "run" / "round_1" / s) for s in ("generate", "pairs", "train")}
    summary = run(tiny_recipe("run.rounds=2"))
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert {s: read_done(tmp_path / "run" / "round_1" / s) for s in done_before} == done_before
    assert summary["rounds"][1]["stages"]["train"]["policy"] == str(r1)
    w2 = weights(summary["rounds"][1]["model"])
    assert any(not (w1[k] == w2[k]).all() for k in lm)  # round 2's model differs from round 1's
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "summary.json").is_file()


def test_a_round_exports_its_model_in_the_recipe_dtype_with_a_card(tiny_recipe, tmp_path, tiny_llava_dir):
    from transformers import AutoModelForImageTextToText

    from csr.card import front_matter

    run(tiny_recipe("run.rounds=1", "run.export_dtype=bfloat16", "run.max_shard_size=300KB"))
    rd = tmp_path / "run" / "round_1"
    assert read_done(rd / "merge")["dtype"] == "float32"  # the next round's policy keeps the whole update
    export = rd / "export"
    assert (export / "model.safetensors.index.json").is_file()
    model = AutoModelForImageTextToText.from_pretrained(export, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (export / name).read_bytes() == (Path(tiny_llava_dir) / name).read_bytes()
    for folder in (rd / "merge", export):
        card = (folder / "README.md").read_text()
        assert front_matter(card)["base_model"] == str(tiny_llava_dir) and "round 1" in card.lower()
        assert (folder / "csr_config.yaml").is_file()
    assert "saved in bfloat16" in (export / "README.md").read_text()
