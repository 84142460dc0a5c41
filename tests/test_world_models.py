"""World base models: the open_clip -> CLIPVisionModel conversion is exact, a tiny build trains,
saves folders the stages load, is cached, and `csr eval` runs on it."""

import copy
import json

import pytest
import torch

from csr.score.clip import create_open_clip
from csr.world.train_base import open_clip_visual_to_hf, world_clip_config


@pytest.mark.parametrize("quick_gelu, patch", [(False, 16), (False, 8), (True, 8)])
def test_open_clip_trunk_converts_exactly(quick_gelu, patch):
    cfg = world_clip_config(patch_size=patch, width=32, layers=2, head_width=16, text_width=32, embed_dim=16)
    if quick_gelu:
        cfg["quick_gelu"] = True
    torch.manual_seed(0)
    model, _, _ = create_open_clip(f"csr-test-conv-{quick_gelu}-{patch}", cfg)
    visual = model.visual.eval()
    for p in visual.parameters():   # move every weight off its init (LayerNorms start at 1/0)
        p.data.add_(0.05 * torch.randn_like(p))
    hf = open_clip_visual_to_hf(visual)
    assert hf.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        trunk = copy.deepcopy(visual)
        trunk.proj = None                                  # open_clip's pooled features before the projection
        want_pooled = trunk(x)
        inter = visual.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)["image_intermediates"]
        out = hf(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(out.pooler_output, want_pooled, atol=1e-5, rtol=1e-5)
    # patch tokens after every block (LLaVA takes them from a hidden layer)
    for i, tokens in enumerate(inter):
        torch.testing.assert_close(out.hidden_states[i + 1][:, 1:], tokens, atol=1e-5, rtol=1e-5)


def test_unsupported_trunk_is_refused():
    cfg = world_clip_config(width=32, layers=1, head_width=16, text_width=32, embed_dim=16)
    cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "pool_type": "avg"}}
    model, _, _ = create_open_clip("csr-test-conv-avg", cfg)
    with pytest.raises(ValueError):
        open_clip_visual_to_hf(model.visual)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from csr.world.build import ensure_world
    from csr.world.generate import WorldConfig

    out = tmp_path_factory.mktemp("world")
    summary = ensure_world(out, clip_steps=3, llava_steps=3,
                           world_config=WorldConfig(n_train=48, n_prompts=4, n_test=4))
    return out, summary


def test_tiny_build_writes_loadable_folders(tiny_world):
    from csr.models import load_policy
    from csr.score.clip import load_open_clip_folder

    out, summary = tiny_world
    for part in ("models/clip", "models/llava"):
        assert (out / part / "DONE.json").is_file()
    assert (out / "models/clip/open_clip_config.json").is_file()
    assert (out / "models/clip/open_clip_model.safetensors").is_file()
    clip, preprocess, tokenizer = load_open_clip_folder(out / "models/clip")
    model, processor = load_policy(str(out / "models/llava"), device="cpu")
    # the LLaVA vision tower is the CLIP image trunk: same features on the same pixels
    from PIL import Image

    img = Image.open(out / "test" / json.loads((out / "test/chair.jsonl").read_text().splitlines()[0])["image"])
    px = processor.image_processor([img.convert("RGB")], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(px, preprocess(img.convert("RGB"))[None], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        trunk = copy.deepcopy(clip.visual)
        trunk.proj = None
        torch.testing.assert_close(model.model.vision_tower(pixel_values=px).pooler_output, trunk(px),
                                   atol=1e-5, rtol=1e-5)
    assert model.config.vision_config.hidden_act == "gelu"
    # the tokenizer knows the world's words as whole tokens
    assert len(processor.tokenizer.tokenize(" There is a red circle at the top left.")) <= 12


def test_build_is_cached_and_rebuilds_only_what_changed(tiny_world, monkeypatch):
    import csr.world.train_base as tb
    from csr.world.build import ensure_world

    out, first = tiny_world
    stamps = {p: (out / p / "DONE.json").stat().st_mtime_ns for p in ("models/clip", "models/llava")}

    def boom(*a, **k):
        raise AssertionError("a finished part was rebuilt")

    monkeypatch.setattr(tb, "train_clip", boom)
    monkeypatch.setattr(tb, "train_llava", boom)
    again = ensure_world(out, clip_steps=3, llava_steps=3)         # no world config: the world there is kept
    assert again["llava"] == json.loads((out / "models/llava/DONE.json").read_text())
    assert {p: (out / p / "DONE.json").stat().st_mtime_ns for p in stamps} == stamps
    monkeypatch.undo()
    ensure_world(out, clip_steps=3, llava_steps=4)                  # other LLaVA settings: only it is rebuilt
    assert (out / "models/clip/DONE.json").stat().st_mtime_ns == stamps["models/clip"]
    assert json.loads((out / "models/llava/DONE.json").read_text())["steps"] == 4


def test_csr_eval_on_the_world(tiny_world, tmp_path):
    from csr.eval.cli import main

    out, _ = tiny_world
    rc = main(["--model", str(out / "models/llava"), "--pope", str(out / "test/pope.jsonl"),
               "--chair", str(out / "test/chair.jsonl"), "--out", str(tmp_path / "ev"), "--limit", "6",
               "--max-new-tokens", "12", "--device", "cpu"])
    assert rc == 0
    m = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert {"random", "all"} <= set(m["pope"]) and m["pope"]["all"]["n"] == 6
    assert {"chair_s", "chair_i", "recall"} <= set(m["chair"]) and m["chair"]["n_captions"] == 4
    assert len((tmp_path / "ev/pope_answers.jsonl").read_text().splitlines()) == 6


def test_cli_builds_a_small_world(tmp_path):
    from csr.world.build import main

    rc = main(["--out", str(tmp_path / "w"), "--n-train", "24", "--n-test", "2", "--n-prompts", "2",
               "--clip-steps", "2", "--llava-steps", "2"])
    assert rc == 0
    assert (tmp_path / "w/models/llava/config.json").is_file()
    assert json.loads((tmp_path / "w/DONE.json").read_text())["settings"]["config"]["n_train"] == 24
