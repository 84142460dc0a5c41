"""Prompt files in the official CSR format, JSONL and `datasets` folders; images; atomic JSONL and figures."""

import json
from pathlib import Path

import pytest
from PIL import Image

from csr.data import BadInput, load_image, load_prompts
from csr.io import StageSummary, read_jsonl, repair_jsonl_tail, write_jsonl


def test_official_csr_json_with_coco_name_pattern(tmp_path):
    (tmp_path / "coco").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "COCO_train2014_000000000009.jpg")
    records = [{"id": 1, "image": "000000000009.jpg", "input": "<image>\nDescribe this image in detail."}]
    (tmp_path / "csr.json").write_text(json.dumps(records))
    got = load_prompts(tmp_path / "csr.json", str(tmp_path / "coco"), "COCO_train2014_{image}")
    assert len(got) == 1 and got[0].id == "1"
    assert got[0].prompt == "Describe this image in detail."  # the placeholder is the model's business
    assert got[0].image == str(tmp_path / "coco" / "COCO_train2014_000000000009.jpg")
    load_image(got[0].image)


def test_jsonl_and_datasets_folder(tmp_path):
    rows = [{"id": "a", "image": "x.png", "prompt": "What is this?"},
            {"id": "b", "image": "y.png", "input": "<image> Count the objects."}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    got = load_prompts(tmp_path / "p.jsonl", str(tmp_path))
    assert [(r.id, r.prompt) for r in got] == [("a", "What is this?"), ("b", "Count the objects.")]
    import datasets

    datasets.Dataset.from_list([{"id": "a", "image": "x.png", "input": "<image>\nDescribe."}]).save_to_disk(
        str(tmp_path / "ds"))
    assert [r.prompt for r in load_prompts(tmp_path / "ds", str(tmp_path))] == ["Describe."]
    assert len(load_prompts(tmp_path / "p.jsonl", str(tmp_path), max_prompts=1)) == 1


def test_bad_records_are_counted_by_reason(tmp_path):
    rows = [{"id": "ok", "image": "x.png", "input": "<image>\nDescribe."},
            {"id": "two", "image": "x.png", "input": "<image> and <image>"},
            {"id": "none", "image": "x.png"},
            {"id": "noimg", "input": "Describe."},
            {"id": "abs", "image": "/etc/passwd", "input": "Describe."}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    summary = StageSummary("generate")
    got = load_prompts(tmp_path / "p.jsonl", str(tmp_path), summary=summary)
    assert [r.id for r in got] == ["ok"]
    assert dict(summary.skipped) == {"several_image_tokens": 1, "no_prompt": 1, "no_image": 1,
                                     "image_outside_root": 1}
    allowed = load_prompts(tmp_path / "p.jsonl", str(tmp_path), allow_absolute=True)
    assert "abs" in [r.id for r in allowed]
    (tmp_path / "broken.jsonl").write_text('{"id": 1}\n{"id": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: malformed JSON line"):
        load_prompts(tmp_path / "broken.jsonl", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.prompts"):
        load_prompts(tmp_path / "missing.json", str(tmp_path))


def test_images_greyscale_and_cmyk_become_rgb_missing_is_bad(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "grey.png")
    Image.new("CMYK", (8, 8)).save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "grey.png").mode == "RGB"
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"
    with pytest.raises(BadInput) as err:
        load_image(tmp_path / "nope.png")
    assert err.value.reason == "missing_image"


def test_torn_jsonl_tail_is_repaired_middle_corruption_is_not(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "a") as fh:
        fh.write('{"a": 3, "b"')
    assert repair_jsonl_tail(path) == 2 and read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a":\n{"a": 3}\n')
    with pytest.raises(ValueError, match="corrupt"):
        repair_jsonl_tail(path)


def test_atomic_savefig_replaces_whole_or_keeps_the_old_file(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csr.io import atomic_savefig

    out = tmp_path / "plots" / "fig.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_savefig(fig, out)
    first = out.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"

    class Broken:  # savefig dies half-way: the old figure stays, no temp file is left
        def savefig(self, path, dpi):
            Path(path).write_bytes(b"partial")
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_savefig(Broken(), out)
    assert out.read_bytes() == first and sorted(p.name for p in out.parent.iterdir()) == ["fig.png"]
    plt.close(fig)
