"""Yes/no self-rewarding (csr.yesno): questions from the model's own sentences, the answer reward worked
out by hand, the mix into the round's pairs, and the stage on a tiny model with skips counted."""

import json
import math
from pathlib import Path

import pytest

from csr.yesno.questions import (Question, answer_rewards, answer_vig, form_questions, mix_pairs, named_objects,
                                 naming_sentences, pick_answer, prior_partners, quantile, two_class_threshold)
from csr.config import YesNoConfig, ConfigError, load_config
from csr.eval.chair import SynonymTable

ROOT = Path(__file__).parent.parent
TABLE = SynonymTable({"circle": ["disc"], "square": ["box"], "star": [], "heart": []})


def test_named_objects_count_synonyms_and_plurals_most_named_first():
    sentences = ["A red disc is at the top.", "A blue box and a circle.", "Two stars are there."]
    # circle twice (disc, circle), square once (first named before star), star once (plural)
    assert named_objects(sentences, TABLE) == ["circle", "square", "star"]
    assert named_objects(["Nothing here."], TABLE) == []


def test_prior_partners_are_the_objects_only_the_no_image_continuation_names():
    continuations = ["A green box is below it.", "There is a star and a box.", "A disc."]
    assert prior_partners(continuations, ["circle"], TABLE) == ["square", "star"]


def test_questions_take_named_objects_first_then_prior_partners_each_capped():
    cfg = YesNoConfig(max_named=1, max_prior=1)
    qs = form_questions(["circle", "square"], ["square", "star", "heart"], cfg)
    assert [(q.object, q.source) for q in qs] == [("circle", "named"), ("star", "prior")]
    assert qs[0].question == "Is there a circle in the image?"
    assert (qs[1].yes, qs[1].no, qs[1].statement) == ("Yes, there is a star.", "No, there is no star.",
                                                      "There is a star.")


def test_quantile_interpolates_like_numpy():
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.0) == 1.0
    assert quantile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0
    assert math.isclose(quantile([0.0, 10.0], 0.25), 2.5)


def test_two_class_threshold_cuts_where_the_between_class_variance_peaks():
    # cuts of [0, 1, 10, 11]: after 0: .25·.75·(0 − 7.33)² ≈ 10.1; after 1: .5·.5·(0.5 − 10.5)² = 25;
    # after 10: ≈ 10.1 -> between 1 and 10, at 5.5 (order does not matter)
    assert two_class_threshold([10.0, 0.0, 11.0, 1.0]) == 5.5
    # [0, 2, 3, 10]: 4.69, 7.56, then .75·.25·(1.67 − 10)² ≈ 13.0: the lone high value is the high class
    assert two_class_threshold([0.0, 2.0, 3.0, 10.0]) == 6.5
    assert two_class_threshold([0.0, 0.0, 0.0, 10.0]) == 5.0        # equal values stay in one class
    assert two_class_threshold([3.0, 3.0]) == 3.0                   # nothing to split
    with pytest.raises(ValueError):
        two_class_threshold([])


def test_the_evidence_of_an_object_is_every_sentence_of_the_models_text_naming_it():
    texts = [" A red disc is at the top. A box is below it.", "Two discs.", "A red disc is at the top."]
    assert naming_sentences(texts, TABLE) == {"circle": ("A red disc is at the top.", "Two discs."),
                                              "square": ("A box is below it.",)}
    qs = form_questions(["circle"], ["square"], YesNoConfig(), naming_sentences(texts, TABLE))
    assert [q.evidence for q in qs] == [("A red disc is at the top.", "Two discs."), ("A box is below it.",)]
    assert form_questions(["star"], [], YesNoConfig(), {})[0].evidence == ()


def test_answer_reward_mixes_clip_against_its_reference_with_the_calibrated_probability():
    # CLIP 30 against a reference of 25: R_I(yes) = 5, R_I(no) = -5; q_yes = 0.2: R_T = 20 and 80.
    r = answer_rewards(30.0, 25.0, 0.2, 0.9)
    assert math.isclose(r["reward_yes"], 0.9 * 5 + 0.1 * 20)      # 6.5
    assert math.isclose(r["reward_no"], 0.9 * -5 + 0.1 * 80)      # 3.5
    q = Question("star", "named", "Is there a star in the image?", "Yes, there is a star.",
                 "No, there is no star.", "There is a star.")
    picked, why = pick_answer(q, r, margin=2.0)
    assert why is None and picked["chosen"] == "Yes, there is a star." and picked["rejected"] == q.no
    assert math.isclose(picked["margin"], 3.0)
    assert pick_answer(q, r, margin=3.5) == (None, "below_margin")
    # λ = 0: the calibrated probability alone decides (0.2 < 0.5: no)
    picked, _ = pick_answer(q, answer_rewards(30.0, 25.0, 0.2, 0.0), margin=0.0)
    assert picked["chosen"] == q.no and math.isclose(picked["margin"], 60.0)


def test_the_answers_visual_information_gain_is_added_at_its_weight():
    # p(yes) 0.6 with the image, 0.3 without: gain ln 2; p(no) 0.2 against 0.4: −ln 2
    vig = answer_vig([0.6, 0.2], [0.3, 0.4])
    assert vig == pytest.approx((math.log(2), -math.log(2)))
    r = answer_rewards(30.0, 25.0, 0.2, 0.9, vig, vig_weight=10.0)
    assert math.isclose(r["reward_yes"], 6.5 + 10 * math.log(2))                # 6.5 as in the test above
    assert math.isclose(r["reward_no"], 3.5 - 10 * math.log(2))
    assert answer_rewards(30.0, 25.0, 0.2, 0.9, vig)["reward_yes"] == pytest.approx(6.5)   # weight 0: off
    assert all(math.isfinite(v) for v in answer_vig([0.0, 1.0], [0.5, 0.0]))     # no log(0)


def test_mix_keeps_every_caption_pair_and_samples_yes_no_pairs_at_the_ratio():
    captions, closed = [f"c{i}" for i in range(4)], [f"y{i}" for i in range(5)]
    mixed, sample = mix_pairs(captions, closed, 0.5, seed=0)
    assert mixed[:4] == captions and len(sample) == 2 and mixed[4:] == sample and set(sample) <= set(closed)
    assert mix_pairs(captions, closed, 0.5, seed=0) == (mixed, sample)           # seeded
    assert mix_pairs(captions, closed, 10.0, seed=0)[1] == closed                # fewer than asked: all, in order
    assert mix_pairs(captions, closed, 0.0, seed=0) == (captions, [])


def test_a_balanced_mix_samples_as_many_yes_as_no_pairs():
    captions = [f"c{i}" for i in range(4)]
    closed = ["y0", "n0", "y1", "y2", "y3", "n1", "y4"]            # 5 chosen "yes", 2 chosen "no"
    yes = [p.startswith("y") for p in closed]
    _, sample = mix_pairs(captions, closed, 1.0, seed=0, chosen_yes=yes)     # budget 4: 2 of each side
    assert sorted(p[0] for p in sample) == ["n", "n", "y", "y"]
    assert sample == sorted(sample, key=closed.index)                         # in the pairs' order
    _, sample = mix_pairs(captions, closed, 2.0, seed=0, chosen_yes=yes)     # budget 7: "no" has 2, so 2 each
    assert sorted(p[0] for p in sample) == ["n", "n", "y", "y"]
    assert mix_pairs(captions, closed, 1.0, seed=3, chosen_yes=yes) == mix_pairs(captions, closed, 1.0, seed=3,
                                                                                  chosen_yes=yes)
    with pytest.raises(ValueError, match="flags"):
        mix_pairs(captions, closed, 1.0, seed=0, chosen_yes=yes[:3])


@pytest.mark.parametrize("override, key", [("yesno.question_template=Is it there?", "yesno.question_template"),
                                           ("yesno.content_free=none,photo", "yesno.content_free"),
                                           ("yesno.max_named=0", "yesno.max_named"),
                                           ("yesno.reward_lambda=1.5", "yesno.reward_lambda")])
def test_bad_closed_settings_are_refused_naming_the_key(override, key):
    extra = ["yesno.max_prior=0"] if key == "yesno.max_named" else []
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override, *extra])


# ---------------------------------------------------------------------------------------------
# The stage on a tiny model
# ---------------------------------------------------------------------------------------------


def _tree(tree_id, image, sentences):
    nodes = [{"id": 0, "parent": None, "text": ""}]
    nodes += [{"id": i, "parent": 0, "text": s} for i, s in enumerate(sentences, 1)]
    return {"id": tree_id, "image": str(image), "prompt": "Describe this image in detail.", "nodes": nodes}


def _caption_pair(tree_id, image):
    from csr.pairs import to_trl

    return to_trl({"id": tree_id, "image": str(image), "prompt": "Describe this image in detail.",
                   "chosen": "A red circle.", "rejected": "A red star.", "chosen_score": 1.0,
                   "rejected_score": 0.0, "margin": 1.0})


@pytest.fixture
def closed_inputs(tmp_path, images_dir):
    from csr.io import mark_done, write_jsonl

    trees = [_tree("a", images_dir / "red.png", [" A red disc is at the top.", " A blue box is below it."]),
             _tree("b", images_dir / "green.png", [" Nothing to see."]),
             _tree("c", images_dir / "blue.png", [" Two stars."])]
    write_jsonl(tmp_path / "score" / "scored.jsonl", trees)
    mark_done(tmp_path / "score", {"stage": "score"})
    write_jsonl(tmp_path / "pairs" / "pairs.jsonl", [_caption_pair(t["id"], t["image"]) for t in trees])
    mark_done(tmp_path / "pairs", {"stage": "pairs"})
    (tmp_path / "objects.json").write_text(json.dumps({"circle": ["disc"], "square": ["box"], "star": []}))
    return tmp_path


@pytest.mark.parametrize("visual, vig_weight", [("sentences", 0.0), ("statement", 0.0), ("sentences", 2.0)])
def test_closed_stage_asks_about_named_objects_scores_them_and_mixes_the_pairs(closed_inputs, tiny_llava_dir,
                                                                               tiny_clip_dir, visual, vig_weight):
    from csr.yesno.stage import run_yesno
    from csr.io import read_jsonl
    from csr.score.clip import load_clip_from_config
    from csr.train.data import read_pairs
    from PIL import Image

    tmp = closed_inputs
    cfg = load_config(None, [f"score.clip_model={tiny_clip_dir}", "score.clip_pretrained=", "model.device=cpu",
                             "model.torch_dtype=float32", f"yesno.objects={tmp / 'objects.json'}",
                             "yesno.enabled=true", "yesno.margin=0", "yesno.ratio=1.0", "yesno.max_prior=1",
                             "yesno.prior_tokens=4", f"yesno.visual={visual}", f"yesno.vig_weight={vig_weight}"])
    done = run_yesno(cfg, str(tiny_llava_dir), tmp / "score", tmp / "pairs", tmp / "yesno")
    questions = read_jsonl(tmp / "yesno" / "questions.jsonl")
    named = [(q["id"], q["object"]) for q in questions if q["source"] == "named"]
    assert named == [("a", "circle"), ("a", "square"), ("c", "star")]
    assert done["skipped"]["no_object_named"] == 1 and done["processed"] == 2    # tree b names nothing
    lam = cfg.yesno.reward_lambda
    for q in questions:  # the stored parts obey the rule
        assert 0.0 <= q["q_yes"] <= 1.0
        assert ("vig_yes" in q) == bool(vig_weight)
        gain_yes, gain_no = vig_weight * q.get("vig_yes", 0.0), vig_weight * q.get("vig_no", 0.0)
        assert math.isclose(q["reward_yes"], lam * (q["clip"] - q["reference"]) + (1 - lam) * 100 * q["q_yes"]
                            + gain_yes, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(q["reward_no"], -lam * (q["clip"] - q["reference"]) + (1 - lam) * 100 * (1 - q["q_yes"])
                            + gain_no, rel_tol=1e-9, abs_tol=1e-9)
    if vig_weight:  # the image moves the tiny model's answer: a gain to add
        assert any(abs(q["vig_yes"]) > 1e-6 for q in questions)
    clip = load_clip_from_config(cfg.score, "cpu")
    images = {t["id"]: t["image"] for t in read_jsonl(tmp / "score" / "scored.jsonl")}
    named_rows = [q for q in questions if q["source"] == "named"]
    if visual == "sentences":
        # the model's own sentence naming the object, scored by CLIP on its image; one split for the round
        assert [q["evidence"] for q in named_rows] == ["A red disc is at the top.", "A blue box is below it.",
                                                       "Two stars."]
        assert {q["reference"] for q in questions} == {two_class_threshold([q["clip"] for q in questions])}
        assert done["visual_split"] == questions[0]["reference"]
    else:
        assert [q["evidence"] for q in named_rows] == ["There is a circle.", "There is a square.", "There is a star."]
        assert len({q["reference"] for q in named_rows if q["id"] == "a"}) == 1      # per image
    for q in named_rows:
        image = Image.open(images[q["id"]]).convert("RGB")
        assert math.isclose(q["clip"], clip.scores(image, [q["evidence"]])[0], abs_tol=1e-4)
    mixed = read_jsonl(tmp / "yesno" / "pairs.jsonl")
    assert [p["id"] for p in mixed[:3]] == ["a", "b", "c"]                          # every caption pair kept
    yesno = mixed[3:]
    assert len(yesno) == done["yesno_pairs"] == min(3, done["yesno_pairs_available"]) and yesno
    for p in yesno:
        tree_id, _, obj, answer = p["id"].split("/")
        row = next(q for q in questions if q["id"] == tree_id and q["object"] == obj)
        assert answer == ("yes" if row["reward_yes"] >= row["reward_no"] else "no")
        assert p["prompt"][0]["content"][1]["text"] == f"Is there a {obj} in the image?"
        assert p["chosen"][0]["content"][0]["text"].startswith("Yes" if answer == "yes" else "No")
        assert set(p) == set(mixed[0])                                               # a pair is a pair
    assert len(read_pairs(tmp / "yesno")) == len(mixed)                             # the train stage reads it


def test_the_stage_takes_the_score_stages_clip_of_a_sentence_and_scores_only_the_others(closed_inputs,
                                                                                        tiny_llava_dir, tiny_clip_dir):
    from csr.yesno.stage import run_yesno
    from csr.io import read_jsonl, write_jsonl

    tmp = closed_inputs
    trees = read_jsonl(tmp / "score" / "scored.jsonl")
    trees[0]["nodes"][2]["clip"] = 77.0                     # " A blue box is below it.", as the score stage left it
    write_jsonl(tmp / "score" / "scored.jsonl", trees)
    cfg = load_config(None, [f"score.clip_model={tiny_clip_dir}", "score.clip_pretrained=", "model.device=cpu",
                             "model.torch_dtype=float32", f"yesno.objects={tmp / 'objects.json'}",
                             "yesno.enabled=true", "yesno.max_prior=0"])
    run_yesno(cfg, str(tiny_llava_dir), tmp / "score", tmp / "pairs", tmp / "yesno")
    rows = {(q["id"], q["object"]): q for q in read_jsonl(tmp / "yesno" / "questions.jsonl")}
    assert rows["a", "square"]["clip"] == 77.0 and rows["a", "square"]["evidence"] == "A blue box is below it."
    assert abs(rows["a", "circle"]["clip"]) < 100 and rows["a", "circle"]["clip"] != 77.0   # scored here


def test_closed_stage_without_a_vocabulary_is_refused_with_the_fix(closed_inputs, tiny_llava_dir):
    from csr.yesno.stage import run_yesno
    from csr.data import BadInput

    cfg = load_config(None, ["yesno.enabled=true"])
    with pytest.raises(BadInput, match="yesno.objects"):
        run_yesno(cfg, str(tiny_llava_dir), closed_inputs / "score", closed_inputs / "pairs",
                   closed_inputs / "yesno")
    assert not (closed_inputs / "yesno" / "DONE.json").exists()


def test_no_image_continuation_gets_no_image_and_continues_the_models_own_sentence(tiny_llava_dir):
    from csr.yesno.stage import no_image_continuations
    from csr.models import load_policy

    model, processor = load_policy(str(tiny_llava_dir), dtype="float32", device="cpu")
    seen = {}
    generate = model.generate

    def spy(**kw):
        seen.update(kw)
        return generate(**kw)

    model.generate = spy
    out = no_image_continuations(model, processor, ["Describe this image in detail."] * 2,
                                 [" A red disc is at the top.", " A box."], max_new_tokens=3, batch_size=8)
    assert len(out) == 2 and "pixel_values" not in seen
    assert not (seen["input_ids"] == model.config.image_token_id).any()      # no image placeholder either
    first = processor.tokenizer.decode(seen["input_ids"][0], skip_special_tokens=True)
    assert first.rstrip().endswith("A red disc is at the top.") and "Describe this image in detail." in first


def test_a_round_with_the_yesno_stage_trains_on_the_mixed_pairs(tiny_llava_dir, tiny_clip_dir, tmp_path):
    from transformers import AutoTokenizer

    from csr.io import read_jsonl
    from csr.loop import run

    # every word of the tiny vocabulary is an "object", so the random tiny model names some
    tok = AutoTokenizer.from_pretrained(tiny_llava_dir)
    words = {w.strip("▁ ").lower() for w in tok.get_vocab()}
    (tmp_path / "objects.json").write_text(json.dumps({w: [] for w in sorted(words) if w.isalpha() and len(w) >= 3}))
    cfg = load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [
        f"model.model_name_or_path={tiny_llava_dir}", f"score.clip_model={tiny_clip_dir}",
        f"data.prompts={ROOT / 'data' / 'tiny' / 'prompts.json'}", f"data.image_root={ROOT / 'data' / 'tiny' / 'images'}",
        f"run.output_dir={tmp_path / 'run'}", "run.rounds=1", "yesno.enabled=true",
        f"yesno.objects={tmp_path / 'objects.json'}", "yesno.margin=0", "yesno.ratio=1.0"])
    summary = run(cfg)
    stages = summary["rounds"][0]["stages"]
    rd = tmp_path / "run" / "round_1"
    mixed = read_jsonl(rd / "yesno" / "pairs.jsonl")
    assert stages["yesno"]["yesno_pairs"] > 0
    assert len(mixed) == stages["pairs"]["pairs"] + stages["yesno"]["yesno_pairs"]
    assert stages["train"]["pairs"] == str(rd / "yesno") and stages["train"]["num_pairs"] == len(mixed)
