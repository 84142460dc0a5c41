"""Post-hoc calibration (docs/method.md §2): hand-made probability tables with known answers, label
sets with merged variants, content-free inputs that carry no image, the file readers and the CLI."""

import json

import numpy as np
import pytest
import torch

from csr import content_free as CF
from csr.debias import calibration as C
from csr.debias import closed_set as CS
from csr.debias import label_probs as LP


# ---------------------------------------------------------------------------------------------
# pure math
# ---------------------------------------------------------------------------------------------


def test_diag_calibration_known_answer():
    # p = (0.7, 0.3), p_cf = (0.8, 0.2): q ∝ (0.875, 1.5) -> (0.368421, 0.631579): the answer flips to "no"
    q = C.calibrate([[0.7, 0.3]], [[0.8, 0.2]], "diag")
    np.testing.assert_allclose(q, [[0.875 / 2.375, 1.5 / 2.375]], rtol=1e-12)
    assert C.predict(q, ["yes", "no"]) == ["no"]
    assert C.predict([[0.7, 0.3]], ["yes", "no"]) == ["yes"]


def test_bias_calibration_known_answer():
    # W = I, b = -p_cf: softmax(p - p_cf) = softmax(-0.1, 0.1)
    q = C.calibrate([[0.7, 0.3]], [[0.8, 0.2]], "bias")
    e = np.exp([-0.1, 0.1])
    np.testing.assert_allclose(q, [e / e.sum()], rtol=1e-12)
    assert C.predict(q, ["yes", "no"]) == ["no"]


def test_the_two_modes_can_disagree():
    # three labels: diag divides, bias subtracts
    p, p_cf = [[0.45, 0.45, 0.10]], [[0.5, 0.45, 0.05]]
    # diag: (0.9, 1.0, 2.0) renormalised
    np.testing.assert_allclose(C.calibrate(p, p_cf, "diag"), [[0.9 / 3.9, 1.0 / 3.9, 2.0 / 3.9]])
    p, p_cf = [[0.6, 0.38, 0.02]], [[0.7, 0.29, 0.01]]
    # diag: (0.857, 1.310, 2.0) -> c ; bias: (-0.1, 0.09, 0.01) -> b
    assert C.predict(C.calibrate(p, p_cf, "diag"), "abc") == ["c"]
    assert C.predict(C.calibrate(p, p_cf, "bias"), "abc") == ["b"]


def test_calibration_renormalises_and_uniform_cf_is_identity():
    p = np.array([[0.07, 0.03], [0.2, 0.6]])        # unnormalised label masses
    np.testing.assert_allclose(C.calibrate(p, [[1, 1], [5, 5]], "diag"), [[0.7, 0.3], [0.25, 0.75]])
    # scaling p or p_cf changes nothing
    np.testing.assert_allclose(C.calibrate(p * 3, [[0.8, 0.2]] * 2), C.calibrate(p, [[8, 2]] * 2))
    # a [K] p_cf applies to every row
    np.testing.assert_allclose(C.calibrate(p, [0.8, 0.2]), C.calibrate(p, [[0.8, 0.2], [0.8, 0.2]]))
    with pytest.raises(ValueError):
        C.calibrate(p, p, "nope")


def test_content_free_average_per_sample_and_dataset_mean():
    # two questions, two content-free inputs, unnormalised
    none = np.array([[0.6, 0.2], [0.1, 0.1]])       # -> (0.75, 0.25), (0.5, 0.5)
    unk = np.array([[0.3, 0.3], [0.9, 0.1]])        # -> (0.5, 0.5),   (0.9, 0.1)
    per = C.content_free_estimate({"none": none, "unk": unk}, per_sample=True)
    np.testing.assert_allclose(per, [[0.625, 0.375], [0.7, 0.3]])
    mean = C.content_free_estimate([none, unk], per_sample=False)
    np.testing.assert_allclose(mean, [[0.6625, 0.3375], [0.6625, 0.3375]])
    # calibrating with them: known answers
    p = np.array([[0.6, 0.4], [0.68, 0.32]])
    q_per = C.calibrate(p, per)                      # (0.96, 1.0667) -> no ; (0.9714, 1.0667) -> no
    q_mean = C.calibrate(p, mean)                    # (0.9057, 1.1852) -> no ; (1.0264, 0.9481) -> yes
    assert C.predict(q_per, ["yes", "no"]) == ["no", "no"]
    assert C.predict(q_mean, ["yes", "no"]) == ["no", "yes"]


def test_label_scores_sum_first_token_probabilities():
    probs = np.array([[0.1, 0.2, 0.3, 0.05, 0.35],
                      [0.5, 0.0, 0.1, 0.1, 0.3]])
    s = C.label_scores(probs, [[0, 2], [3]])
    np.testing.assert_allclose(s, [[0.4, 0.05], [0.6, 0.1]])
    np.testing.assert_allclose(C.normalise(s), [[0.4 / 0.45, 0.05 / 0.45], [0.6 / 0.7, 0.1 / 0.7]])
    np.testing.assert_allclose(C.normalise([[0.0, 0.0]]), [[0.5, 0.5]])


class FakeTokenizer:
    """Whole-word vocabulary; a leading space is its own token unless ' word' is listed."""

    def __init__(self, vocab):
        self.vocab = {w: i for i, w in enumerate(vocab)}

    def encode(self, text, add_special_tokens=False):
        if text in self.vocab:
            return [self.vocab[text]]
        if text.startswith(" "):
            return [self.vocab[" "]] + self.encode(text[1:])
        return [self.vocab.get(text[0], 0)] + ([self.vocab.get(text[1:], 0)] if len(text) > 1 else [])

    def convert_ids_to_tokens(self, i):
        return {v: k for k, v in self.vocab.items()}[i]


def test_label_variants_merge_case_and_space():
    v = C.label_variants("yes")
    assert set(v) == {"yes", " yes", "Yes", " Yes", "YES", " YES"}
    assert set(C.label_variants("A")) == {"A", " A", "a", " a"}


def test_label_token_groups_merge_variants_and_drop_shared_tokens():
    tok = FakeTokenizer(["<unk>", " ", "yes", "Yes", " Yes", "no", "No", " No", "Y", "N", "ES", "O", "es", "o"])
    groups = C.label_token_groups(tok, ["yes", "no"])
    v = tok.vocab
    # ' yes' and ' no' both start with the bare space: that token is dropped from both labels
    assert groups == [sorted([v["yes"], v["Yes"], v[" Yes"], v["Y"]]), sorted([v["no"], v["No"], v[" No"], v["N"]])]
    assert C.label_token_groups(tok, ["yes", "no"], merge_variants=False) == [[v["yes"]], [v["no"]]]
    # merged variants: a table where the mass sits on "Yes" and " Yes" still counts for "yes"
    probs = np.zeros(len(v))
    probs[v["Yes"]], probs[v[" Yes"]], probs[v["no"]], probs[v[" "]] = 0.3, 0.2, 0.4, 0.1
    np.testing.assert_allclose(C.label_scores(probs, groups), [[0.5, 0.4]])


def test_label_left_without_own_token_is_an_error():
    tok = FakeTokenizer(["<unk>", " ", "x"])    # every label starts with <unk> or a space
    with pytest.raises(ValueError, match="no first token of its own"):
        C.label_token_groups(tok, ["yes", "yak"])


def test_resolve_labels():
    assert C.resolve_labels("yesno") == ["yes", "no"]
    assert C.resolve_labels("letters") == ["A", "B", "C", "D"]
    assert C.resolve_labels("cat, dog ,bird") == ["cat", "dog", "bird"]
    with pytest.raises(ValueError):
        C.resolve_labels("yes")
    with pytest.raises(ValueError):
        C.resolve_labels("Yes,yes")


# ---------------------------------------------------------------------------------------------
# model glue on the tiny LLaVA
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    from csr.models import load_policy

    return load_policy(str(tiny_llava_dir), dtype="float32", device="cpu")


def test_content_free_prompts(tiny):
    from csr.models import build_chat_prompt

    _, proc = tiny
    prompt = build_chat_prompt(proc, "Is there a dog?")
    assert "<image>" in prompt
    none = CF.content_free_prompt(prompt, proc, "none")
    unk = CF.content_free_prompt(prompt, proc, "unk")
    assert "<image>" not in none and "<unk>" not in none and none.startswith("USER: Is there")
    assert unk == prompt.replace("<image>", "<unk>")
    with pytest.raises(ValueError):
        CF.content_free_prompt("no placeholder", proc, "none")
    im = CF.blank_or_noise_image("blank", (12, 10))
    assert im.size == (12, 10) and im.getpixel((3, 3)) == (255, 255, 255)
    a = np.asarray(CF.blank_or_noise_image("noise", (12, 10), np.random.default_rng(0)))
    b = np.asarray(CF.blank_or_noise_image("noise", (12, 10), np.random.default_rng(0)))
    assert (a == b).all() and a.std() > 30


def test_text_only_inputs_reach_no_image_features(tiny, images_dir):
    """'none' and 'unk' run the language model only: the vision tower never runs and no call gets
    pixel values; the real, blank and noise inputs do go through it."""
    model, proc = tiny
    calls = {"vision": 0, "pixel": []}
    h1 = model.model.vision_tower.register_forward_pre_hook(
        lambda m, a: calls.__setitem__("vision", calls["vision"] + 1))
    h2 = model.register_forward_pre_hook(
        lambda m, a, kw: calls["pixel"].append(kw.get("pixel_values") is not None), with_kwargs=True)
    images = [images_dir / "red.png", images_dir / "blue.png", images_dir / "green.png"]
    qs = ["Is there a dog?", "Is there a cat?", "Is there a car?"]
    groups = C.label_token_groups(proc.tokenizer, ["yes", "no"])
    try:
        for cf in ("none", "unk"):
            calls.update(vision=0, pixel=[])
            LP.first_token_label_probs(model, proc, qs, groups, images=images, cf=cf, batch_size=2)
            assert calls["vision"] == 0 and calls["pixel"] == [False, False]
        for cf in (None, "blank", "noise"):
            calls.update(vision=0, pixel=[])
            LP.first_token_label_probs(model, proc, qs, groups, images=images, cf=cf, batch_size=2)
            assert calls["vision"] == 2 and calls["pixel"] == [True, True]
    finally:
        h1.remove()
        h2.remove()
    # the guard refuses a text-only batch that holds pixel values or image placeholder tokens
    ids = proc.tokenizer(["USER: <image> hi"], return_tensors="pt")
    assert model.config.image_token_id in ids["input_ids"]
    with pytest.raises(AssertionError, match="placeholder"):
        CF.check_text_only(dict(ids), model)
    ids = dict(proc.tokenizer(["USER: hi"], return_tensors="pt"))
    CF.check_text_only(ids, model)
    with pytest.raises(AssertionError, match="pixel_values"):
        CF.check_text_only({**ids, "pixel_values": torch.zeros(1, 3, 32, 32)}, model)


def test_label_probs_match_an_unbatched_softmax(tiny, images_dir):
    from csr.models import build_chat_prompt

    model, proc = tiny
    images = [images_dir / "red.png", images_dir / "blue.png"]
    qs = ["Is there a dog?", "What is in the picture? Tell me."]
    groups = C.label_token_groups(proc.tokenizer, ["yes", "no"])
    batched = LP.first_token_label_probs(model, proc, qs, groups, images=images, batch_size=2)
    batched_none = LP.first_token_label_probs(model, proc, qs, groups, cf="none", batch_size=2)
    for i, q in enumerate(qs):
        from csr.data import load_image

        prompt = build_chat_prompt(proc, q)
        with torch.no_grad():
            enc = proc(text=[prompt], images=[load_image(images[i])], return_tensors="pt")
            probs = torch.softmax(model(**enc).logits[0, -1].double(), -1).numpy()
            enc = proc(text=[CF.content_free_prompt(prompt, proc, "none")], return_tensors="pt")
            probs_none = torch.softmax(model(**enc).logits[0, -1].double(), -1).numpy()
        np.testing.assert_allclose(batched[i], [probs[g].sum() for g in groups], rtol=1e-4)
        np.testing.assert_allclose(batched_none[i], [probs_none[g].sum() for g in groups], rtol=1e-4)


def _pope_file(tmp_path, images_dir):
    recs = []
    for i, (img, obj, lab) in enumerate([("red.png", "dog", "yes"), ("blue.png", "cat", "no"),
                                          ("green.png", "car", "no"), ("red.png", "tree", "yes")]):
        recs.append({"question_id": i, "image": str(images_dir / img), "text": f"Is there a {obj} in the image?",
                     "label": lab, "category": "random" if i < 2 else "popular"})
    path = tmp_path / "pope.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_score_and_evaluate_calibration_end_to_end(tiny, tmp_path, images_dir):
    model, proc = tiny
    data = CS.load_closed_set(_pope_file(tmp_path, images_dir), "pope")
    assert data.labels == ["yes", "no"] and data.gold == ["yes", "no", "no", "yes"]
    scores = LP.score_closed_set(model, proc, data.images, data.questions, data.labels, batch_size=4)
    assert set(scores.p_cf_raw) == set(CF.CALIBRATION_INPUTS)
    assert scores.p_raw.shape == (4, 2) and (scores.label_mass > 0).all()
    res = CS.evaluate_calibration(scores, data, cf_inputs=["none", "unk"], mode="diag", per_sample=True)
    assert set(res["calibrated"]) == {"random", "popular", "all"}
    assert 0 <= res["calibrated"]["all"]["yes_ratio"] <= 1
    # 4 single inputs + all four, x 2 modes x 2 estimates
    assert len(res["grid"]) == 5 * 2 * 2
    # the chosen row agrees with calibrating by hand
    p_cf = C.content_free_estimate([scores.p_cf_raw["none"], scores.p_cf_raw["unk"]])
    preds = C.predict(C.calibrate(scores.p_raw, p_cf, "diag"), data.labels)
    from csr.eval.pope import pope_metrics

    assert res["calibrated"]["all"] == pope_metrics(preds, data.gold)
    assert res["grid"]["none+unk+blank+noise|diag|per-sample"] == \
        CS.closed_set_metrics(data, LP.calibrated_predictions(scores)["pred"])["all"]


def test_multiple_choice_file(tmp_path, images_dir):
    recs = [{"question_id": 1, "image": "red.png", "text": "Which colour?", "options": ["red", "blue", "green"],
             "answer": "A"},
            {"question_id": 2, "image": "blue.png", "text": "Which colour?", "options": ["red", "blue", "green"],
             "answer": "b", "category": "colour"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = CS.load_closed_set(path, "mc", image_root=images_dir)
    assert data.labels == ["A", "B", "C"] and data.gold == ["A", "B"]
    assert data.questions[0] == "Which colour?\nA. red\nB. blue\nC. green\n" + CS.MC_SUFFIX
    assert data.images[0] == images_dir / "red.png"
    m = CS.closed_set_metrics(data, ["A", "C"])
    assert m["all"]["accuracy"] == 0.5 and m["all"]["pred_ratio"] == {"A": 0.5, "B": 0.0, "C": 0.5}
    assert m["colour"]["accuracy"] == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "red.png", "text": "q", "options": ["x", "y"], "answer": "D"}) + "\n")
    with pytest.raises(ValueError, match="not one of the labels"):
        CS.load_closed_set(bad, "mc")


def test_cli_calibrate(tiny_llava_dir, tmp_path, images_dir):
    from csr.debias.cli import main

    pope = _pope_file(tmp_path, images_dir)
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", str(tiny_llava_dir), "--pope", str(pope), "--cf", "none,blank",
                 "--mode", "bias", "--dataset-mean", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["settings"] == {"cf": ["none", "blank"], "mode": "bias", "per_sample": False, "combine": "mean",
                               "epsilon": 0.0}
    assert res["recipe"] == "toolkit" and res["label_token"] == "variants summed"
    assert {"uncalibrated", "calibrated", "greedy_generation", "grid"} <= set(res)
    lines = (out / "label_probs.jsonl").read_text().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[0])["p_cf"]) == {"none", "blank"}
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(tiny_llava_dir), "--pope", str(pope), "--cf", "sky", "--out", str(out)])


def test_calibrate_file_multiple_choice(tiny, tmp_path, images_dir):
    model, proc = tiny
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "image": f, "text": "Which colour is the image?",
                                        "options": {"A": "red", "B": "green", "C": "blue"}, "answer": a}) + "\n"
                            for i, (f, a) in enumerate([("red.png", "A"), ("green.png", "B"), ("blue.png", "C")])))
    res = CS.calibrate_file(model, proc, path, "mc", out_dir=tmp_path / "o", image_root=images_dir,
                           cf_inputs=["none", "noise"], grid=False)
    assert res["labels"] == ["A", "B", "C"] and res["n"] == 3 and "grid" not in res
    assert set(res["calibrated"]["all"]["pred_ratio"]) == {"A", "B", "C"}
    rows = [json.loads(x) for x in (tmp_path / "o" / "label_probs.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["A", "B", "C"]
    assert sum(rows[0]["q"].values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="subset"):
        CS.calibrate_file(model, proc, path, "mc", image_root=images_dir, cf_inputs=["sky"])


def test_csr_eval_with_calibration_on(tiny_llava_dir, tmp_path):
    """`csr eval --pope F --calibrate`: POPE by generation plus closed-set scores before/after calibration."""
    import json as _json
    from pathlib import Path as _Path

    from csr.cli import main as csr_main

    images = _Path(__file__).parent.parent / "data" / "tiny" / "images"
    pope = tmp_path / "pope.jsonl"
    rows = [{"question_id": i, "image": str(images / f"{i % 3}.png"), "text": f"Is there a {s} in the image?",
             "label": lab, "category": "random"} for i, (s, lab) in enumerate([("circle", "yes"), ("dog", "no"),
                                                                                ("square", "yes"), ("cat", "no")])]
    pope.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    assert csr_main(["eval", "--model", str(tiny_llava_dir), "--pope", str(pope), "--calibrate", "--cf", "none,blank",
                     "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    metrics = _json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["pope"]["all"]["n"] == 4
    cal = metrics["pope_calibrated"]
    assert cal["n"] == 4 and {"uncalibrated", "calibrated"} <= set(cal)
