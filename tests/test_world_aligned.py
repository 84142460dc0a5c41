"""The alignment-only LLaVA of the world (csr.world.train_base.train_aligned_llava, `csr world align`):
the language-model stage moves only the language model, the alignment stage only the projector, the
vision tower never moves; the build is cached and refuses an unfinished world."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from csr.world.build import ensure_world
    from csr.world.generate import WorldConfig

    out = tmp_path_factory.mktemp("world")
    ensure_world(out, clip_steps=2, llava_steps=1, world_config=WorldConfig(n_train=24, n_prompts=2, n_test=2))
    return out


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _moved(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_each_stage_trains_only_its_part(small_world, tmp_path):
    from csr.world.train_base import train_aligned_llava

    kw = {"batch_size": 4, "hidden_size": 32, "num_layers": 1, "vocab_size": 200, "seed": 0}
    clip = small_world / "models" / "clip"
    train_aligned_llava(small_world, clip, tmp_path / "init", lm_steps=0, align_steps=0, **kw)
    lm = train_aligned_llava(small_world, clip, tmp_path / "lm", lm_steps=2, align_steps=0, **kw)
    train_aligned_llava(small_world, clip, tmp_path / "align", lm_steps=0, align_steps=2, **kw)
    init, w_lm, w_al = (_weights(tmp_path / d) for d in ("init", "lm", "align"))
    moved_lm, moved_al = _moved(init, w_lm), _moved(init, w_al)
    assert moved_lm and all("language_model" in k or k.startswith("lm_head") for k in moved_lm)
    assert moved_al and all("multi_modal_projector" in k for k in moved_al)
    assert lm["records"] == 72 and lm["caption_records"] == 24    # 24 images: a caption and 2 questions each


def test_build_aligned_is_cached_and_refuses_an_unfinished_world(small_world, tmp_path, monkeypatch):
    import csr.world.train_base as tb
    from csr.world.build import build_aligned

    out = tmp_path / "aligned"
    kw = {"lm_steps": 1, "align_steps": 1, "batch_size": 2}
    first = build_aligned(small_world, out, **kw)["aligned"]
    assert (out / "DONE.json").is_file() and (out / "config.json").is_file()
    monkeypatch.setattr(tb, "train_aligned_llava", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert build_aligned(small_world, out, **kw)["aligned"] == first          # same settings: kept
    with pytest.raises(AssertionError, match="rebuilt"):
        build_aligned(small_world, out, **{**kw, "align_steps": 2})          # other settings: rebuilt
    with pytest.raises(FileNotFoundError, match="not a finished world part"):
        build_aligned(tmp_path / "nothing", tmp_path / "x")
    assert json.loads((out / "DONE.json").read_text())["align_steps"] == 1
