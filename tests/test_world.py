"""The grounded world: deterministic by seed, consistent ground truth, files the stages can read."""

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from csr.eval.chair import chair_metrics, load_synonyms
from csr.eval.pope import score_pope
from csr.world.generate import (CAPTION_PROMPTS, PARTNER, POPE_CATEGORIES, POSITIONS, SHAPES, TYPICAL_COLOR,
                                WorldConfig, cooccurrence_stats, generate_world, pope_negatives, sample_split)

SMALL = dict(n_train=40, n_prompts=6, n_test=12)


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(seed=3, **SMALL), out)
    return out


def test_generation_is_deterministic(world, tmp_path):
    generate_world(WorldConfig(seed=3, **SMALL), tmp_path / "again")
    assert _digest(world) == _digest(tmp_path / "again")   # every file, images included, byte for byte
    generate_world(WorldConfig(seed=4, **SMALL), tmp_path / "other")
    assert _digest(world) != _digest(tmp_path / "other")


def test_splits_do_not_depend_on_other_split_sizes():
    a = sample_split(WorldConfig(seed=1, n_train=30, n_test=10), "test")
    b = sample_split(WorldConfig(seed=1, n_train=50, n_test=10), "test")
    assert [[o.as_dict() for o in s] for s in a] == [[o.as_dict() for o in s] for s in b]


def test_scenes_are_valid(world):
    for split in ("train", "test"):
        for rec in _read(world / split / "scenes.jsonl"):
            objs = rec["objects"]
            assert 1 <= len(objs) <= 4
            assert len({o["shape"] for o in objs}) == len(objs)        # distinct shapes
            assert len({o["position"] for o in objs}) == len(objs)     # one object per cell
            assert [o["position"] for o in objs] == sorted((o["position"] for o in objs), key=POSITIONS.index)
            sentences = rec["caption"].split(". ")
            assert len(sentences) == len(objs) and rec["caption"].endswith(".")
            for o, s in zip(objs, sentences):
                assert o["shape"] in s and o["color"] in s and o["position"] in s
            assert (world / split / rec["image"]).is_file()


def test_images_show_the_objects(world):
    from PIL import Image

    rec = _read(world / "test" / "scenes.jsonl")[0]
    im = Image.open(world / "test" / rec["image"])
    assert im.size == (32, 32) and im.mode == "RGB"
    for o in rec["objects"]:   # the object's centre pixel is far from the white background
        x, y = (int(round(c)) for c in o["center"])
        assert sum(im.getpixel((x, y))) < 600 or o["shape"] == "ring"


def test_training_split_is_biased_test_split_is_not():
    cfg = WorldConfig(seed=0, n_train=600, n_test=600, cooccur_bias=0.9)
    rate = {}
    for split in ("train", "test"):
        shapes = [[o.shape for o in s] for s in sample_split(cfg, split)]
        freq, co = cooccurrence_stats(shapes)
        rate[split] = sum(co[s][PARTNER[s]] for s in SHAPES) / sum(freq.values())
    assert rate["train"] > 0.6 and rate["test"] < 0.4


def test_pope_file(world):
    pope = _read(world / "test" / "pope.jsonl")
    scenes = {r["image"]: {o["shape"] for o in r["objects"]} for r in _read(world / "test" / "scenes.jsonl")}
    assert len({r["question_id"] for r in pope}) == len(pope)
    for cat in POPE_CATEGORIES:
        labels = Counter(r["label"] for r in pope if r["category"] == cat)
        assert labels["yes"] == labels["no"] > 0
    for r in pope:
        assert (r["object"] in scenes[r["image"]]) == (r["label"] == "yes")
        assert r["text"] == f"Is there a {r['object']} in the image?"
    # answering with the ground truth scores 1, with "yes" always scores yes-ratio 1
    perfect = score_pope(pope, ["Yes, there is." if r["label"] == "yes" else "No, there is not." for r in pope])
    assert all(m["accuracy"] == 1.0 for m in perfect.values())
    assert score_pope(pope, ["Yes, there is."] * len(pope))["all"]["yes_ratio"] == 1.0


def test_pope_negative_categories():
    shapes = [["circle", "square"]] * 9 + [["circle", "triangle"]] + [["star"]] * 3
    freq, co = cooccurrence_stats(shapes)
    rng = random.Random(0)
    assert pope_negatives(["circle"], 1, "adversarial", rng, freq, co) == ["square"]
    assert pope_negatives(["square", "circle"], 2, "popular", rng, freq, co) == ["star", "triangle"]
    assert pope_negatives(["circle", "star"], 2, "adversarial", rng, freq, co) == ["square", "triangle"]
    neg = pope_negatives(["circle"], 3, "random", rng, freq, co)
    assert len(set(neg)) == 3 and "circle" not in neg


def test_chair_file_and_synonyms(world):
    chair = _read(world / "test" / "chair.jsonl")
    scenes = _read(world / "test" / "scenes.jsonl")
    table = load_synonyms(world / "test" / "synonyms.json")
    assert [r["objects"] for r in chair] == [sorted({o["shape"] for o in s["objects"]}) for s in scenes]
    truth = chair_metrics([s["caption"] for s in scenes], [r["objects"] for r in chair], table)
    assert truth["chair_i"] == 0.0 and truth["recall"] == 1.0
    swapped = chair_metrics([s["caption"].replace(s["objects"][0]["shape"], PARTNER[s["objects"][0]["shape"]])
                             for s in scenes], [r["objects"] for r in chair], table)
    assert swapped["chair_i"] > 0


def test_prompts_load_with_the_train_folder_as_image_root(world):
    from csr.data import load_image, load_prompts

    recs = load_prompts(world / "train" / "prompts.jsonl", image_root=str(world / "train"))
    assert len(recs) == SMALL["n_prompts"]
    assert all(r.prompt in CAPTION_PROMPTS for r in recs)
    assert load_image(recs[0].image).size == (32, 32)
    sft = _read(world / "train" / "sft.jsonl")
    assert {r["kind"] for r in sft} == {"caption", "pope"}
    vocab = json.loads((world / "vocab.json").read_text())
    assert vocab["shapes"] == list(SHAPES) and vocab["config"]["seed"] == 3


def test_caption_partner_noise_names_absent_partners_only_in_sft_captions(tmp_path):
    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    generate_world(WorldConfig(seed=1, caption_partner_noise=0.0, **SMALL), clean)
    generate_world(WorldConfig(seed=1, caption_partner_noise=1.0, **SMALL), noisy)
    # ground truth and evaluation files are untouched by the noise
    for f in ("train/scenes.jsonl", "test/pope.jsonl", "test/chair.jsonl"):
        assert (clean / f).read_text() == (noisy / f).read_text()
    scenes = {s["image"]: s for s in _read(noisy / "train" / "scenes.jsonl")}
    extra = 0
    for rec in _read(noisy / "train" / "sft.jsonl"):
        if rec["kind"] != "caption":
            continue
        scene = scenes[rec["image"]]
        named = {s for s in SHAPES if f" {s} " in f" {rec['answer']} "}
        present = {o["shape"] for o in scene["objects"]}
        assert present <= named  # every real object is still described
        ghosts = named - present
        assert all(PARTNER[g] in present for g in ghosts)  # only absent partners are added
        # an invented object is predictable from the text: its typical colour, the first free cells
        sentences = rec["answer"].split(". ")
        ghost_cells = []
        for g in ghosts:
            (sentence,) = [t for t in sentences if f" {g} " in f" {t} "]
            assert f"{TYPICAL_COLOR[g]} {g}" in sentence
            ghost_cells += [p for p in POSITIONS if p in sentence]
        free = [p for p in POSITIONS if p not in {o["position"] for o in scene["objects"]}]
        assert sorted(ghost_cells, key=POSITIONS.index) == free[:len(ghosts)]
        expected = {PARTNER[s] for s in present} - present
        if len(scene["objects"]) < len(POSITIONS) and expected:
            assert ghosts  # noise 1.0 adds one wherever a cell is free
        extra += len(ghosts)
        assert len(rec["answer"].split(". ")) <= len(POSITIONS)  # one object per cell at most
    assert extra > 0
    with pytest.raises(ValueError, match="caption_partner_noise"):
        WorldConfig(caption_partner_noise=1.5).validate()
