"""CHAIR as the reference script computes it (and corrected), POPE answer files from other tools,
the standard protocols as presets. Expected numbers are worked out by hand from the rules in
csr/eval/coco_chair.py; the arithmetic is in the comments."""

import json
import logging
from pathlib import Path

import pytest

from csr.data import BadInput
from csr.eval.coco_chair import (CocoChair, coco_ground_truth, read_captions, score_caption_file, singularize,
                                 word_tokenize)
from csr.eval.pope import read_pope_answers, read_pope_questions, score_pope_files, split_name

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"

# The reference list's format, with its quirks: a doubled space before 'motor bike' and
# 'cheesecake', a capitalised 'iPhone', a three-word 'stove top oven'.
SYNONYMS = """person, girl, boy, man, woman, child, baby, adult, passenger, policeman, gentleman, grandchild
bicycle, bike
motorcycle, scooter,  motor bike, motor cycle
airplane, jet, plane
bus, minibus
train, locomotive
boat, canoe
bird, duck
cat, kitten
dog, puppy, doggie
elephant
tie, bow, bow tie
cake,  cheesecake, cupcake
chair, seat, stool
dining table, table
toilet, urinal
cell phone, phone, iPhone
oven, stove, stove top oven
wine glass
"""
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 6, "name": "bus"}, {"id": 17, "name": "cat"},
              {"id": 18, "name": "dog"}, {"id": 70, "name": "toilet"}]


def _instances(images, anns):
    return {"images": [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg"} for i, split in images],
            "categories": CATEGORIES,
            "annotations": [{"id": k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(anns)]}


def make_coco(root: Path) -> Path:
    """Images 1, 2 in val2014, 3 in train2014 (the reference combines the two)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "synonyms.txt").write_text(SYNONYMS)
    (root / "instances_val2014.json").write_text(json.dumps(_instances(
        [(1, "val"), (2, "val")], [(1, 1), (1, 18), (2, 6), (2, 1)])))          # 1: person, dog; 2: bus, person
    (root / "instances_train2014.json").write_text(json.dumps(_instances([(3, "train")], [(3, 70)])))  # 3: toilet
    (root / "captions_val2014.json").write_text(json.dumps({"images": [{"id": 1}, {"id": 2}], "annotations": [
        {"image_id": 1, "caption": "A baby elephant near a bus."},
        {"image_id": 2, "caption": "People wait for the minibus."}]}))
    (root / "captions_train2014.json").write_text(json.dumps({"images": [{"id": 3}], "annotations": [
        {"image_id": 3, "caption": "A toilet seat and a cat."}]}))
    return root


@pytest.fixture
def coco(tmp_path):
    return make_coco(tmp_path / "coco")


@pytest.fixture
def ref(coco):
    return CocoChair(coco / "synonyms.txt", "reference")


@pytest.fixture
def fixed(coco):
    return CocoChair(coco / "synonyms.txt", "corrected")


def _m(chair, caption):
    return chair.mentions(caption)


# ----------------------------------------------------------------------------------- tokenising


def test_word_tokenize_follows_nltk_rules():
    # clitic 's split, comma split, hyphen kept, brackets split, the sentence's final period split,
    # 'p.m.' is an abbreviation (no sentence end, keeps its period), '!' split
    assert word_tokenize("a man's dog, a t-shirt (red). it's 3 p.m. now!") == \
        ["a", "man", "'s", "dog", ",", "a", "t-shirt", "(", "red", ")", ".", "it", "'s", "3", "p.m.", "now", "!"]
    # a period inside a word and '/' keep the word whole; '--' and '...' are tokens; quotes become `` ''
    assert word_tokenize('a dog.the cat/dog mat -- a hot-dog stand... "teddy bears"') == \
        ["a", "dog.the", "cat/dog", "mat", "--", "a", "hot-dog", "stand", "...", "``", "teddy", "bears", "''"]
    # '2.' before a lower-case word is an ordinal (keeps its period); a period before ')' ends a sentence
    assert word_tokenize("there are 2. dogs; a dog.) then: a bow tie*") == \
        ["there", "are", "2.", "dogs", ";", "a", "dog", ".", ")", "then", ":", "a", "bow", "tie", "*"]


@pytest.mark.parametrize("word, want", [
    ("dogs", "dog"),
    ("bus", "bu"),                   # no rule knows '-us': the final 's' goes (the reference's quirk)
    ("buses", "bus"),                # the (bus)es rule
    ("minibuses", "minibus"),
    ("glass", "glas"), ("glasses", "glass"),   # hence the reference's 'wine glas' entry
    ("ties", "ty"),                  # consonant + 'ies' -> 'y'
    ("canoes", "cano"),              # (o)es -> o
    ("doggies", "doggie"),           # an '-ie' noun
    ("puppies", "puppy"),
    ("people", "person"), ("children", "child"), ("oxen", "ox"), ("geese", "goose"), ("mice", "mouse"),
    ("policemen", "policeman"), ("gentlemen", "gentleman"), ("grandchildren", "grandchild"),  # irregular endings
    ("knives", "knife"), ("calves", "calf"), ("skis", "ski"),
    ("scissors", "scissors"), ("sheep", "sheep"), ("series", "series"),   # uninflected
    ("is", "is"),                    # 'is' is the ending of 'debris': unchanged
    ("his", "hi"),
])
def test_singularize_pattern_rules(word, want):
    assert singularize(word) == want


# ------------------------------------------------------------------------ the reference's rules


def test_baby_and_adult_animals_are_animals_not_people(ref):
    assert _m(ref, "A baby elephant and an adult bird.") == [("elephant", "elephant"), ("bird", "bird")]
    assert _m(ref, "A baby and an adult.") == [("baby", "person"), ("adult", "person")]
    assert _m(ref, "Two baby ducks.") == [("baby", "person"), ("duck", "bird")]   # 'baby duck' is not a rule


def test_passenger_jet_and_train_are_vehicles(ref):
    assert _m(ref, "A passenger jet and two passenger trains.") == [("jet", "airplane"), ("train", "train")]
    assert _m(ref, "A passenger waits.") == [("passenger", "person")]


def test_toilet_seat_and_seat_beside_a_toilet_are_no_chair(ref):
    assert _m(ref, "The toilet seat is up.") == [("toilet", "toilet")]
    assert _m(ref, "A seat beside the toilet.") == [("toilet", "toilet")]     # every 'seat' dropped
    assert _m(ref, "A seat in the park.") == [("seat", "chair")]


def test_train_track_is_no_train_and_bow_tie_is_a_tie(ref):
    assert _m(ref, "Train tracks run by.") == []
    assert _m(ref, "A train on the tracks.") == [("train", "train")]
    assert _m(ref, "A man in a bow tie.") == [("man", "person"), ("tie", "tie")]
    assert _m(ref, "A red bow.") == [("bow", "tie")]                       # the list's own choice


def test_two_word_objects_and_wine_glasses(ref):
    assert _m(ref, "Two wine glasses and a wine glass.") == [("wine glass", "wine glass")] * 2
    assert _m(ref, "A motor cycle.") == [("motor cycle", "motorcycle")]


def test_compound_irregular_plurals_are_found_in_both_modes(ref, fixed):
    want = [("policeman", "person"), ("gentleman", "person"), ("grandchild", "person")]
    caption = "Two policemen, three gentlemen and their grandchildren."
    assert _m(ref, caption) == want and _m(fixed, caption) == want


@pytest.mark.parametrize("caption, reference, corrected", [
    # 1. 'bus' -> 'bu': only the plural is found; corrected keeps a token that is a synonym entry
    ("A bus and two buses.", [("bus", "bus")], [("bus", "bus"), ("bus", "bus")]),
    # 2. pattern's 'ties' -> 'ty', 'canoes' -> 'cano'; corrected tries the token less -s
    ("Two ties and canoes.", [], [("tie", "tie"), ("canoe", "boat")]),
    # 3. an entry after a doubled space (' motor bike', ' cheesecake') never matches
    ("A motor bike and a cheesecake.", [], [("motor bike", "motorcycle"), ("cheesecake", "cake")]),
    # 4. 'iPhone' is capitalised, captions are lower-cased
    ("An iPhone.", [], [("iphone", "cell phone")]),
    # 5. multi-word entries outside the fixed two-word list: found through their parts, or not at all
    ("A stove top oven on a dining table.",
     [("stove", "oven"), ("oven", "oven"), ("table", "dining table")],
     [("stove top oven", "oven"), ("dining table", "dining table")]),
])
def test_quirks_reference_keeps_corrected_fixes(ref, fixed, caption, reference, corrected):
    assert _m(ref, caption) == reference
    assert _m(fixed, caption) == corrected


def test_ground_truth_combines_train_val_instances_and_captions(coco, ref, fixed):
    gt = coco_ground_truth(coco, [1, 2, 3], ref)
    # 1: person, dog (instances) + elephant ('baby elephant'; 'bus' -> 'bu' is not found)
    # 2: bus, person (instances); 'people' -> person, 'minibus' -> 'minibu' adds nothing
    # 3 (train2014): toilet + cat ('toilet seat' is the toilet)
    assert gt == {1: {"person", "dog", "elephant"}, 2: {"bus", "person"}, 3: {"toilet", "cat"}}
    assert coco_ground_truth(coco, [1], fixed) == {1: {"person", "dog", "elephant", "bus"}}   # 'bus' found


CAPTIONS = [
    {"image_id": 1, "caption": "A man and his puppies watch a baby elephant. A bus drives by."},
    {"image_id": 2, "caption": "Two buses and a motor bike wait near a seat."},
    {"image_id": 3, "caption": "The toilet seat is up, and a seat and an iPhone are beside the toilet."},
    {"image_id": 1, "caption": "Two policemen with ties."},
]


def test_chair_numbers_reference_and_corrected(coco, tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps(r) + "\n" for r in CAPTIONS))
    r = score_caption_file(caps, coco, mode="reference")
    # gt: 1 {person, dog, elephant}, 2 {bus, person}, 3 {toilet, cat}
    # c1: man, puppy, elephant ('bu' missed)      3 mentions, 0 hallucinated, covers 3 of 3
    # c2: bus, seat->chair ('motor bike' never)   2 mentions, 1 (chair),      covers 1 of 2
    # c3: toilet, toilet (seats dropped, iPhone)  2 mentions, 0,              covers 1 of 2
    # c4: policeman ('ties' -> 'ty' missed)       1 mention,  0,              covers 1 of 3
    # CHAIR_S = 1/4, CHAIR_I = 1/8, recall = (3+1+1+1)/(3+2+2+3) = 6/10
    assert (r["n_mentions"], r["n_hallucinated"]) == (8, 1)
    assert r["chair_s"] == pytest.approx(1 / 4) and r["chair_i"] == pytest.approx(1 / 8)
    assert r["recall"] == pytest.approx(6 / 10)
    # words: 13 + 10 + 15 + 4 = 42 over 4 captions; all end with '.'
    assert r["words_per_caption"] == pytest.approx(42 / 4) and r["n_unfinished"] == 0
    assert r["n_hit_token_limit"] is None                    # the records do not say
    assert r["per_caption"][1]["hallucinated"] == [["seat", "chair"]]
    assert r["per_caption"][1]["mentioned"] == [["bus", "bus"], ["seat", "chair"]]

    c = score_caption_file(caps, coco, mode="corrected")
    # gt 1 gains bus (its reference caption's 'bus'): {person, dog, elephant, bus}
    # c1: + bus (in gt)                     4 mentions, 0,                      covers 4 of 4
    # c2: bus, motor bike, seat             3 mentions, 2 (motorcycle, chair),  covers 1 of 2
    # c3: toilet, iphone, toilet            3 mentions, 1 (cell phone),         covers 1 of 2
    # c4: policeman, tie                    2 mentions, 1 (tie),                covers 1 of 4
    # CHAIR_S = 3/4, CHAIR_I = 4/12, recall = 7/12
    assert (c["n_mentions"], c["n_hallucinated"]) == (12, 4)
    assert c["chair_s"] == pytest.approx(3 / 4) and c["chair_i"] == pytest.approx(4 / 12)
    assert c["recall"] == pytest.approx(7 / 12)


def test_truncation_counts(coco, tmp_path):
    caps = tmp_path / "caps.json"      # a JSON list, as well as JSONL
    caps.write_text(json.dumps([{"image_id": 1, "caption": "A dog and a man", "finish_reason": "length"},
                                {"image_id": "COCO_val2014_000000000002.jpg", "caption": "A bus.",
                                 "finish_reason": "stop"}]))
    r = score_caption_file(caps, coco)
    assert r["n_hit_token_limit"] == 1 and r["n_unfinished"] == 1 and r["n_captions"] == 2


# ----------------------------------------------------------------------- the reference's own list


@pytest.fixture
def real_synonyms():
    path = REAL / "chair" / "synonyms.txt"
    if not path.is_file():
        pytest.skip(f"the reference synonym list is not at {path} (only on the project's machines)")
    return path


def test_real_synonym_list_quirks(real_synonyms):
    ref, fixed = CocoChair(real_synonyms, "reference"), CocoChair(real_synonyms, "corrected")
    assert len(ref.classes) == 80 and len(fixed.classes) == 80
    cases = {  # caption: (reference classes, corrected classes)
        "A bus, a minibus and an airbus.": ([], ["bus", "bus", "airplane"]),
        "A motor bike and a cheesecake.": ([], ["motorcycle", "cake"]),
        "A man holds an iPhone.": (["person"], ["person", "cell phone"]),
        "Magpies and thieves.": ([], ["bird", "person"]),
        "A baby giraffe next to a teddy bear.": (["giraffe", "teddy bear"], ["giraffe", "teddy bear"]),
    }
    for caption, (want_ref, want_fixed) in cases.items():
        assert [c for _, c in ref.mentions(caption)] == want_ref, caption
        assert [c for _, c in fixed.mentions(caption)] == want_fixed, caption


# ------------------------------------------------------------------------------------ bad input


def test_caption_for_an_unknown_image_is_refused(coco, tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 99, "caption": "A dog."}) + "\n")
    with pytest.raises(BadInput) as err:
        score_caption_file(caps, coco)
    assert str(caps) in str(err.value) and "image_id 99" in str(err.value) and "COCO 2014 image ids" in str(err.value)


def test_annotation_folder_without_the_four_files(coco, tmp_path):
    (coco / "captions_train2014.json").unlink()
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 1, "caption": "A dog."}) + "\n")
    with pytest.raises(FileNotFoundError, match="lacks captions_train2014.json"):
        score_caption_file(caps, coco)


@pytest.mark.parametrize("line, fix", [
    ('{"image": 1, "caption": "x"}', "rename your fields"),
    ('{"image_id": "dog", "caption": "x"}', "as an integer"),
    ('{"image_id": 1, "caption": ', "malformed JSON"),
])
def test_bad_caption_records(tmp_path, line, fix):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(line + "\n")
    with pytest.raises(BadInput, match=fix):
        read_captions(caps)


def test_cli_errors_are_one_line(coco, tmp_path, capsys):
    from csr.cli import main

    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 99, "caption": "A dog."}) + "\n")
    assert main(["eval", "--chair-captions", str(caps), "--coco-annotations", str(coco), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("csr eval: error:") and "image_id 99" in err[-1]
    assert not any("Traceback" in line for line in err)


# ---------------------------------------------------------------------------- scoring CLI (CHAIR)


def test_cli_scores_captions_without_a_model(coco, tmp_path, capsys):
    from csr.eval.cli import main

    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps(r) + "\n" for r in CAPTIONS))
    assert main(["--chair-captions", str(caps), "--coco-annotations", str(coco), "--out", str(tmp_path / "o")]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert printed["chair"]["mode"] == "reference" and printed["chair"]["chair_i"] == pytest.approx(1 / 8)
    assert "per_caption" not in printed["chair"] and len(saved["chair"]["per_caption"]) == 4
    assert {k: v for k, v in saved["chair"].items() if k != "per_caption"} == printed["chair"]


# ------------------------------------------------------------------------------- POPE from files


@pytest.fixture
def pope_files():
    files = [REAL / "pope" / f"coco_pope_{s}.json" for s in ("random", "popular", "adversarial")]
    if not all(f.is_file() for f in files):
        pytest.skip(f"the official POPE files are not in {REAL / 'pope'} (only on the project's machines)")
    return files


def _llava_answers(path, questions, flip_first_yes=0):
    """LLaVA's answer JSONL: right answers, except the first `flip_first_yes` yes-questions answered No."""
    rows, flipped = [], 0
    for q in questions:
        text = "Yes, there is."
        if q["label"] == "no" or flipped < flip_first_yes:
            flipped += q["label"] == "yes"
            text = "No, there is not."
        rows.append({"question_id": q["question_id"], "prompt": q["text"], "text": text, "answer_id": "x",
                     "model_id": "m", "metadata": {}})
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))   # matched by id, not order
    return path


def test_pope_llava_jsonl_on_the_official_files(pope_files, tmp_path):
    qs = [read_pope_questions(f) for f in pope_files]
    assert [sum(q["label"] == "yes" for q in x) for x in qs] == [1500] * 3 and [len(x) for x in qs] == [3000] * 3
    answers = [_llava_answers(tmp_path / f"a{i}.jsonl", q, flip_first_yes=30 * i) for i, q in enumerate(qs)]
    out = score_pope_files(pope_files, answers)
    assert list(out) == ["random", "popular", "adversarial", "all", "mean"]
    # random: all right: accuracy 1, yes-ratio 1500/3000
    assert out["random"]["accuracy"] == 1.0 and out["random"]["yes_ratio"] == 0.5
    # popular: 30 yes-questions answered no: tp 1470, fn 30, tn 1500, fp 0
    p = out["popular"]
    assert (p["tp"], p["fn"], p["tn"], p["fp"]) == (1470, 30, 1500, 0)
    assert p["accuracy"] == pytest.approx(2970 / 3000) and p["precision"] == 1.0
    assert p["recall"] == pytest.approx(1470 / 1500) and p["yes_ratio"] == pytest.approx(1470 / 3000)
    assert p["f1"] == pytest.approx(2 * 1470 / (2 * 1470 + 30))          # 2tp / (2tp + fp + fn)
    # adversarial: 60 flipped; all: tp 4500 - 90, fn 90, over 9000; mean of the three accuracies
    assert out["all"]["accuracy"] == pytest.approx((9000 - 90) / 9000) and out["all"]["n_unanswered"] == 0
    assert out["mean"]["accuracy"] == pytest.approx((1 + 2970 / 3000 + 2940 / 3000) / 3)


def test_pope_plain_text_answers_and_unanswered(pope_files, tmp_path, caplog):
    q = read_pope_questions(pope_files[0])
    assert [x["label"] for x in q[:3]] == ["yes", "no", "yes"]
    plain = tmp_path / "answers.txt"
    plain.write_text("Yes, there is.\nThere is no snowboard.\nNo\n")     # three answers, in question order
    with caplog.at_level(logging.WARNING):
        out = score_pope_files([pope_files[0]], [plain])
    r = out["random"]
    # yes/yes -> tp, no/no -> tn, yes/no -> fn: accuracy 2/3, recall 1/2, precision 1
    assert (r["tp"], r["tn"], r["fn"], r["fp"]) == (1, 1, 1, 0)
    assert r["accuracy"] == pytest.approx(2 / 3) and r["n_unanswered"] == 2997
    assert "2997 of 3000 questions" in caplog.text
    assert split_name(pope_files[0]) == "random" and "mean" not in out


def test_pope_answer_for_an_unknown_question(pope_files, tmp_path):
    bad = tmp_path / "answers.jsonl"
    bad.write_text(json.dumps({"question_id": 3001, "text": "Yes"}) + "\n")
    with pytest.raises(BadInput) as err:
        read_pope_answers(bad, read_pope_questions(pope_files[0]))
    assert str(bad) in str(err.value) and "question_id 3001" in str(err.value) and "pair each answer" in str(err.value)


def test_pope_bad_files_without_the_official_ones(tmp_path):
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}) + "\n"
                 + json.dumps({"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}) + "\n")
    a = tmp_path / "a.txt"
    a.write_text("Yes\nNo\nYes\n")
    with pytest.raises(BadInput, match="3 answer lines for 2 questions"):
        score_pope_files([q], [a])
    dup = tmp_path / "a.jsonl"
    dup.write_text(json.dumps({"question_id": 1, "text": "Yes"}) + "\n" + json.dumps({"question_id": 1, "text": "No"}))
    with pytest.raises(BadInput, match="answered twice"):
        score_pope_files([q], [dup])
    with pytest.raises(BadInput, match="one answer file per question file"):
        score_pope_files([q, q], [a])


def test_cli_scores_pope_answers(tmp_path, capsys):
    from csr.eval.cli import main

    q = tmp_path / "coco_pope_random.json"
    q.write_text("".join(json.dumps({"question_id": i, "image": "a.jpg", "text": "Is there a dog?", "label": lab}) + "\n"
                         for i, lab in enumerate(["yes", "no", "yes", "no"], 1)))
    a = tmp_path / "answers.jsonl"
    a.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n"
                         for i, t in zip([4, 3, 2, 1], ["No.", "Yes", "Yes, a dog", "Yes"])))
    assert main(["--pope-questions", str(q), "--pope-answers", str(a), "--out", str(tmp_path / "o")]) == 0
    out = json.loads(capsys.readouterr().out)["pope"]
    # answers by id: 1 yes (yes), 2 yes (no), 3 yes (yes), 4 no (no): tp 2, fp 1, tn 1 -> accuracy 3/4
    assert out["random"]["accuracy"] == 0.75 and out["random"]["yes_ratio"] == 0.75
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["pope"] == out


# ------------------------------------------------------------------- presets, on a tiny model


def _tiny_protocol_inputs(root: Path):
    """The hand-made COCO folder, its val2014 images and three small POPE files."""
    from PIL import Image

    coco = make_coco(root / "coco")
    images = root / "val2014"
    images.mkdir()
    for i, rgb in ((1, (200, 30, 30)), (2, (30, 30, 200))):
        Image.new("RGB", (32, 32), rgb).save(images / f"COCO_val2014_{i:012d}.jpg")
    pope = root / "pope"
    pope.mkdir()
    for split in ("random", "popular", "adversarial"):
        (pope / f"coco_pope_{split}.json").write_text("".join(
            json.dumps({"question_id": k, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a {o} in the image?",
                        "label": lab}) + "\n"
            for k, (i, o, lab) in enumerate([(1, "dog", "yes"), (2, "cat", "no"), (1, "bus", "no")], 1)))
    return coco, images, pope


def test_presets_end_to_end_and_rescored_from_their_files(tiny_llava_dir, tmp_path, capsys):
    from csr.eval.cli import main

    coco, images, pope = _tiny_protocol_inputs(tmp_path)
    out = tmp_path / "ev"
    assert main(["--preset", "coco-chair,coco-pope", "--model", str(tiny_llava_dir), "--image-root", str(images),
                 "--coco-annotations", str(coco), "--pope-dir", str(pope), "--limit", "2", "--max-new-tokens", "6",
                 "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["presets"] == ["coco-chair", "coco-pope"]
    chair = m["chair"]
    assert chair["mode"] == "reference" and chair["n_captions"] == 2 and chair["max_new_tokens"] == 6
    assert chair["prompt"] == "Please describe this image in detail."
    assert isinstance(chair["n_hit_token_limit"], int) and 0 <= chair["n_hit_token_limit"] <= 2
    assert {"chair_s", "chair_i", "recall", "words_per_caption"} <= set(chair)
    assert [m["pope"][s]["n"] for s in ("random", "popular", "adversarial")] == [2, 2, 2]   # --limit 2 per file
    asked = json.loads((out / "pope_answers_random.jsonl").read_text().splitlines()[0])["prompt"]
    assert asked == "Is there a dog in the image? Answer the question using a single word or phrase."
    capsys.readouterr()
    # the files the presets wrote are what the no-model scorers read: same numbers
    assert main(["--chair-captions", str(out / "chair_captions.jsonl"), "--coco-annotations", str(coco),
                 "--pope-questions", *[str(out / f"coco_pope_{s}.json") for s in ("random", "popular", "adversarial")],
                 "--pope-answers", *[str(out / f"pope_answers_{s}.jsonl") for s in ("random", "popular", "adversarial")],
                 "--out", str(tmp_path / "again")]) == 0
    again = json.loads(capsys.readouterr().out)
    for k in ("chair_s", "chair_i", "recall", "words_per_caption", "n_hit_token_limit"):
        assert again["chair"][k] == chair[k]
    assert all(again["pope"][s]["f1"] == m["pope"][s]["f1"] for s in ("random", "popular", "adversarial", "all"))


def test_round_loop_evaluates_with_presets(tiny_llava_dir, tmp_path):
    from csr.config import ConfigError, load_config
    from csr.loop import evaluate

    coco, images, pope = _tiny_protocol_inputs(tmp_path)
    base = [f"model.model_name_or_path={tiny_llava_dir}", "model.device=cpu", "model.torch_dtype=float32",
            f"run.output_dir={tmp_path / 'run'}", f"run.eval_image_root={images}", "run.eval_max_samples=1"]
    cfg = load_config(None, base + ["run.eval_presets=coco-chair,coco-pope", f"run.eval_coco_annotations={coco}",
                                    f"run.eval_pope_dir={pope}"])
    m = evaluate(cfg, str(tiny_llava_dir), tmp_path / "run" / "eval" / "round_0.json")
    assert m["chair"]["n_captions"] == 1 and m["chair"]["max_new_tokens"] == 512 and m["pope"]["all"]["n"] == 3
    assert json.loads((tmp_path / "run" / "eval" / "round_0.json").read_text()) == m
    with pytest.raises(ConfigError, match="choose from coco-chair, coco-pope"):
        load_config(None, base + ["run.eval_presets=coco-chiar"])
    with pytest.raises(ConfigError, match="eval_coco_annotations"):
        load_config(None, base + ["run.eval_presets=coco-chair"])


def test_worked_example_of_the_docs():
    """docs/results/eval.md quotes these numbers for data/examples/."""
    ex = Path(__file__).resolve().parents[1] / "data" / "examples"
    r = score_caption_file(ex / "captions.jsonl", ex / "coco")
    c = score_caption_file(ex / "captions.jsonl", ex / "coco", mode="corrected")
    assert (r["chair_s"], r["chair_i"], r["recall"], r["n_mentions"]) == (0.25, 0.125, 0.6, 8)
    assert (c["chair_s"], c["chair_i"], c["recall"], c["n_mentions"]) == (0.75, 4 / 12, 7 / 12, 12)
    p = score_pope_files([ex / "pope" / "coco_pope_random.json"], [ex / "pope" / "answers_llava.jsonl"])
    # yes/yes, no/no, yes/yes, 'Yes, ... car' for no, 'There is no toilet.' for yes, no/no
    assert (p["random"]["tp"], p["random"]["fp"], p["random"]["tn"], p["random"]["fn"]) == (2, 1, 2, 1)
    q = score_pope_files([ex / "pope" / "coco_pope_random.json"], [ex / "pope" / "answers.txt"])
    assert q["random"]["accuracy"] == 3 / 5 and q["random"]["n_unanswered"] == 1
