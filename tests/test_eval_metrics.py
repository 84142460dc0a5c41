"""POPE and CHAIR on hand-made cases with known answers."""

import json

import pytest

from csr.eval.chair import (SynonymTable, caption_report, chair_metrics, coco_chair_records, coco_ground_truth,
                            load_synonyms, plural_forms)
from csr.eval.pope import POPE_METRICS, paired_bootstrap, parse_yes_no, pope_metrics, score_pope


# ------------------------------------------------------------------------------------------ POPE


@pytest.mark.parametrize("text, want", [
    ("No, there is not.", "no"),
    ("Yes, there is.", "yes"),
    ("There is not a dog in the image.", "no"),
    ("no", "no"),
    ("No", "no"),
    ("Yes. There is no cat, though.", "yes"),   # only the first sentence counts
    ("Nope", "yes"),                            # LLaVA's rule matches whole words only
    ("NO", "yes"),                              # ... and is case-sensitive
    ("I do not know", "no"),
    ("", "yes"),
    ("No,there is", "yes"),                     # commas are deleted, not split on: "Nothere"
    ("There is a dog.", "yes"),
])
def test_parse_yes_no_llava_rule(text, want):
    assert parse_yes_no(text) == want


def test_pope_metrics_known_counts():
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_pope_metrics_all_no_has_zero_f1():
    m = pope_metrics(["no"] * 4, ["yes", "no", "yes", "no"])
    assert m["accuracy"] == 0.5 and m["precision"] == 0.0 and m["f1"] == 0.0 and m["yes_ratio"] == 0.0


def test_score_pope_per_category_and_overall():
    recs = [{"label": "yes", "category": "random"}, {"label": "no", "category": "random"},
            {"label": "yes", "category": "adversarial"}, {"label": "no", "category": "adversarial"}]
    answers = ["Yes, there is.", "No, there is not.", "Yes, there is.", "Yes, there is."]
    s = score_pope(recs, answers)
    assert list(s) == ["random", "adversarial", "all"]
    assert s["random"]["accuracy"] == 1.0
    assert s["adversarial"]["accuracy"] == 0.5 and s["adversarial"]["yes_ratio"] == 1.0
    assert s["all"]["accuracy"] == 0.75 and s["all"]["n"] == 4


def test_score_pope_without_categories_and_bad_label():
    s = score_pope([{"label": "Yes"}, {"label": "no"}], ["yes", "not at all"])
    assert list(s) == ["all"] and s["all"]["accuracy"] == 1.0
    with pytest.raises(ValueError):
        score_pope([{"label": "maybe"}], ["yes"])


def test_paired_bootstrap_delta_matches_metrics_and_interval():
    labels = ["yes", "no"] * 50
    base = ["yes"] * 100                               # says yes to everything
    new = list(labels)
    new[:4] = ["no", "yes", "no", "yes"]               # right on 96 of 100
    out = paired_bootstrap(base, new, labels, n_resamples=500)
    assert out["answers_changed"] == 50 and out["n"] == 100
    for m in POPE_METRICS:
        want = pope_metrics(new, labels)[m] - pope_metrics(base, labels)[m]
        assert out[m]["delta"] == pytest.approx(want)
        assert out[m]["ci95"][0] <= want <= out[m]["ci95"][1]
    assert 0 < out["f1"]["ci95"][0]
    assert out["accuracy"]["delta"] == pytest.approx(0.96 - 0.5)


def test_paired_bootstrap_same_answers_and_bad_input():
    labels, answers = ["yes", "no", "yes"], ["yes", "yes", "no"]
    out = paired_bootstrap(answers, answers, labels, n_resamples=100)
    assert out["answers_changed"] == 0
    assert all(out[m]["delta"] == 0 and out[m]["ci95"] == [0.0, 0.0] for m in POPE_METRICS)
    with pytest.raises(ValueError, match="2 new answers"):
        paired_bootstrap(answers, answers[:2], labels)
    with pytest.raises(ValueError, match="no questions"):
        paired_bootstrap([], [], [])


# ----------------------------------------------------------------------------------------- CHAIR


TABLE = SynonymTable({"dog": ["dog", "puppy"], "person": ["person", "man", "woman", "child"],
                      "hot dog": ["hot dog"], "box": ["box"], "bus": ["bus"], "knife": ["knife"]})


def test_plural_forms():
    assert plural_forms("dog") == {"dog", "dogs"}
    assert plural_forms("box") == {"box", "boxes"}
    assert plural_forms("bus") == {"bus", "buses"}
    assert plural_forms("puppy") == {"puppy", "puppies"}
    assert plural_forms("person") == {"person", "people"}
    assert plural_forms("knife") == {"knife", "knives"}
    assert plural_forms("hot dog") == {"hot dog", "hot dogs"}
    assert plural_forms("sheep") == {"sheep"}


def test_irregular_plurals_of_compound_words():
    # the ending inflects as the word would: man -> men, child -> children (the regular -s stays beside it)
    assert {"policeman", "policemen"} <= plural_forms("policeman")
    assert {"gentleman", "gentlemen"} <= plural_forms("gentleman")
    assert {"grandchild", "grandchildren"} <= plural_forms("grandchild")
    table = SynonymTable({"person": ["policeman", "gentleman", "grandchild"]})
    assert [c for _, c in table.mentions("Two policemen, gentlemen and grandchildren.")] == ["person"] * 3


def test_mentions_synonyms_plurals_and_multiword_first():
    got = TABLE.mentions("Two puppies and a man eat hot dogs near some boxes; the Dog barks at people.")
    assert [c for _, c in got] == ["dog", "person", "hot dog", "box", "dog", "person"]
    # "hot dog" is one mention, not also a dog
    assert TABLE.mentions("a hot dog") == [("hot dog", "hot dog")]
    assert TABLE.mentions("Nothing here: a cat and a doghouse.") == []


def test_caption_report_and_chair_known_values():
    caps = ["Two puppies and a man eat hot dogs near some boxes.",   # dog, person ok; hot dog, box hallucinated
            "A woman stands by a bus.",                             # person ok, bus hallucinated
            "There is a dog."]                                      # all correct
    gts = [["dog", "person"], ["person"], ["dog", "knife"]]
    rep = caption_report(caps[0], gts[0], TABLE)
    assert rep["hallucinated"] == ["hot dog", "box"] and rep["covered"] == ["dog", "person"]
    m = chair_metrics(caps, gts, TABLE)
    assert m["n_mentions"] == 7 and m["n_hallucinated"] == 3
    assert m["chair_s"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(3 / 7)
    assert m["recall"] == pytest.approx(4 / 5)   # dog+person, person, dog of 2+1+2 objects


def test_chair_ground_truth_through_synonyms_and_repeats():
    # a ground-truth name given as a synonym maps to its object; repeated mentions count each time
    m = chair_metrics(["A puppy. Another puppy. A box."], [["puppies"]], TABLE)
    assert m["n_mentions"] == 3 and m["n_hallucinated"] == 1
    assert m["chair_i"] == pytest.approx(1 / 3) and m["chair_s"] == 1.0 and m["recall"] == 1.0


def test_saying_nothing_is_not_a_good_score():
    m = chair_metrics(["An image.", "A picture."], [["dog"], ["person"]], TABLE)
    assert m["chair_s"] == 0.0 and m["chair_i"] == 0.0 and m["recall"] == 0.0


def test_load_synonyms_json_and_chair_txt(tmp_path):
    j = tmp_path / "syn.json"
    j.write_text(json.dumps({"circle": ["circle", "disc"], "square": ["square"]}))
    t = tmp_path / "synonyms.txt"
    t.write_text("person, girl, boy, man, woman\ndining table, table, desk\n\nmotorcycle, motor bike\n")
    a, b = load_synonyms(j), load_synonyms(t)
    assert a.canonical("discs") == "circle" and a.canonical("squares") == "square"
    assert b.canonical("girls") == "person" and b.canonical("tables") == "dining table"
    got = [c for _, c in b.mentions("Two boys ride motor bikes to a desk.")]
    assert got == ["person", "motorcycle", "dining table"]


def test_coco_ground_truth_and_records(tmp_path):
    syn = tmp_path / "synonyms.txt"
    syn.write_text("person, man, woman\ndog, puppy\ndining table, table\ncat, kitten\n")
    inst = {"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
                       {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"}],
            "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"},
                           {"id": 67, "name": "dining table"}, {"id": 90, "name": "toothbrush"}],
            "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 18},
                            {"image_id": 2, "category_id": 67}, {"image_id": 2, "category_id": 90}]}
    caps = {"annotations": [{"image_id": 2, "caption": "A kitten sleeps on a table."}]}
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    gt = coco_ground_truth(tmp_path / "inst.json", load_synonyms(syn), tmp_path / "caps.json")
    assert gt[1]["objects"] == ["dog", "person"]
    assert gt[2]["objects"] == ["cat", "dining table", "toothbrush"]   # caption adds the cat
    recs = coco_chair_records(tmp_path / "inst.json", syn, tmp_path / "caps.json", n=None)
    assert [r["image"] for r in recs] == ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
    assert coco_chair_records(tmp_path / "inst.json", syn, n=1, seed=3) == \
        coco_chair_records(tmp_path / "inst.json", syn, n=1, seed=3)
