"""The bad-input suite: each case gets a clear message naming the input (or a counted skip),
and nothing computed before is lost."""

import errno
import json

import pytest
from PIL import Image

from csr.data import BadInput, load_image, load_prompts
from csr.io import atomic_write_json, write_jsonl


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "corrupt_image"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), "corrupt_image"),
    (lambda p: p.write_text("not an image at all"), "corrupt_image"),
])
def test_unreadable_images(tmp_path, make, reason):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(BadInput) as err:
        load_image(path)
    assert err.value.reason == reason and str(path) in str(err.value)


def test_huge_image_is_refused_not_decoded(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # stand-in for a decompression bomb
    with pytest.raises(BadInput) as err:
        load_image(tmp_path / "big.png")
    assert err.value.reason == "image_too_large"


def test_unusual_but_valid_images_become_rgb(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.png")
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("I;16", (8, 8), 40000).save(tmp_path / "deep.png")
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "alpha.png")
    for name in ["grey.png", "cmyk.jpg", "deep.png", "anim.gif", "alpha.png"]:
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (8, 8), name
    assert load_image(tmp_path / "deep.png").getpixel((0, 0))[0] == 40000 // 256


def test_prompt_edge_cases(tmp_path):
    rows = [{"id": "long", "image": "a.png", "input": "<image>\n" + "word " * 2000},
            {"id": "ws", "image": "a.png", "input": " \t\n "},
            {"id": "no-token", "image": "a.png", "input": "Describe the picture."},  # image placed first
            {"id": "unicode", "image": "a.png", "input": "<image>\nDécris l'image — 写真を説明して."}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    got = load_prompts(tmp_path / "p.jsonl", str(tmp_path))
    assert [r.id for r in got] == ["no-token", "unicode"]
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"id": 1, "image": "a.png"}).encode()[:-1]
                                            + b', "input": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_prompts(tmp_path / "latin1.jsonl", str(tmp_path))


def test_a_failed_write_leaves_no_partial_output(tmp_path, monkeypatch):
    target = tmp_path / "out" / "summary.json"
    atomic_write_json(target, {"v": 1})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.replace", disk_full)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    with pytest.raises(OSError):
        write_jsonl(tmp_path / "out" / "new.jsonl", [{"a": 1}])
    assert json.loads(target.read_text()) == {"v": 1}  # the old output is intact
    assert not (tmp_path / "out" / "new.jsonl").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["summary.json"]  # no temp files left


def test_clip_out_of_memory_halves_the_batch(tiny_clip_dir, caplog):
    from csr.score.clip import load_clip

    clip = load_clip("open_clip", str(tiny_clip_dir), device="cpu", batch_size=8)
    real, sizes = clip._encode_text, []

    def tight(tokens):
        sizes.append(len(tokens))
        if len(tokens) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(tokens)

    clip._encode_text = tight
    feats = clip.text_features([f"sentence {i}." for i in range(5)])
    assert feats.shape[0] == 5 and clip.batch_size == 2
    assert sizes == [5, 4, 2, 2, 1]
    assert "retrying with score.clip_batch_size" in caplog.text
