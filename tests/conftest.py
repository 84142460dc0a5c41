import os

# No hub, no tracker traffic in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is ~100x faster than two on a shared 2-core machine (thread contention);
# set before torch loads, so the subprocesses the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny LLaVA model folder built from config (random weights), shared by the session."""
    from csr.tiny import build_tiny_llava

    out = tmp_path_factory.mktemp("tiny_llava")
    build_tiny_llava(out)
    return out


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny open_clip model folder (open_clip_config.json + safetensors), random weights."""
    from csr.tiny import build_tiny_clip

    out = tmp_path_factory.mktemp("tiny_clip")
    build_tiny_clip(out)
    return out


@pytest.fixture
def images_dir(tmp_path):
    """A folder with a few small solid-colour PNGs: red.png, green.png, blue.png."""
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    for name, rgb in {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}.items():
        Image.new("RGB", (40, 40), rgb).save(d / f"{name}.png")
    return d
