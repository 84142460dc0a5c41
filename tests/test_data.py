"""Prompt files in the official CSR format, JSONL and `datasets` folders; images; atomic JSONL and figures."""

import json
from pathlib import Path

import pytest
from PIL import Image

from csr.data import (BadInput, image_root_of, load_image, load_prompts, message_text, read_raw_records,
                      record_image_paths, resolve_image_path, strip_image_token)
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


def test_one_reader_takes_a_json_list_jsonl_and_a_datasets_folder(tmp_path):
    rows = [{"id": "a", "image": "x.png", "text": "Is there a cat?"}, {"id": "b", "image": "y.png", "text": "Dog?"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank line skipped
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for source in ("list.json", "lines.jsonl", "ds"):
        assert read_raw_records(tmp_path / source) == rows, source
    (tmp_path / "bad.json").write_text('[{"id": 1},')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_raw_records(tmp_path / "bad.json")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.jsonl: not UTF-8 text.*re-save the file as UTF-8"):
        read_raw_records(tmp_path / "latin1.jsonl")


def test_one_image_resolver(tmp_path):
    root = tmp_path / "images"
    # relative to the root, through the pattern; absolute unless refused; as given or resolved
    assert resolve_image_path("9.jpg", root, "COCO_{image}") == (root / "COCO_9.jpg").resolve()
    assert resolve_image_path("sub/../9.jpg", root, resolve=False) == root / "sub/../9.jpg"
    assert resolve_image_path(str(tmp_path / "elsewhere.png"), root, allow_absolute=True) == tmp_path / "elsewhere.png"
    # leaving the root: refused, naming the record, the image and the fix
    with pytest.raises(BadInput, match=r"record 'r7': image '\.\./x\.png' resolves outside the image root.*"
                                       r"allow_absolute_image_paths=true") as err:
        resolve_image_path("../x.png", root, record="'r7'")
    assert err.value.reason == "image_outside_root"
    # no image field: refused, naming the record and what to give
    for field in (None, "", 3):
        with pytest.raises(BadInput, match=r"record r1: no 'image' field.*give each record the file name") as err:
            resolve_image_path(field, root, record="r1")
        assert err.value.reason == "no_image"


def test_evaluation_images_resolve_against_the_root_else_the_file_folder(tmp_path):
    recs = [{"image": "a.png"}, {"image": str(tmp_path / "abs.png")}, {"image": "../up.png"}]
    data = tmp_path / "eval" / "pope.jsonl"
    assert image_root_of(data) == tmp_path / "eval"
    assert image_root_of(data, "roots") == Path("roots")
    (tmp_path / "ds").mkdir()
    assert image_root_of(tmp_path / "ds") == tmp_path / "ds"  # a datasets folder holds its own images
    assert record_image_paths(recs, data) == [tmp_path / "eval" / "a.png", tmp_path / "abs.png",
                                              tmp_path / "eval" / "../up.png"]
    assert record_image_paths(recs[:1], data, tmp_path / "imgs") == [tmp_path / "imgs" / "a.png"]
    with pytest.raises(BadInput, match=r"pope.jsonl:2: no 'image' field"):
        record_image_paths([{"image": "a.png"}, {"text": "no image here"}], data)


def test_pair_fields_and_placeholders_read_back_to_text():
    chosen = [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert message_text(chosen) == "A cat." and message_text(prompt) == "What is it?"
    assert message_text("plain") == "plain"
    two = [{"role": "user", "content": "Hi "}, {"role": "user", "content": [{"type": "text", "text": "there"}]}]
    assert message_text(two) == "Hi there"
    assert strip_image_token("<image>\nDescribe.") == "Describe."

    class Proc:
        image_token = "<|image_pad|>"

    assert strip_image_token("<|image_pad|><image> Count.", Proc()) == "Count."
    assert strip_image_token("<|image_pad|> Count.") == "<|image_pad|> Count."


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
