"""The decoding study: settings, spread statistics, and a small sweep on the tiny LLaVA that writes
study.json and a PNG, whose greedy row reproduces `csr eval`."""

import json

import pytest

from csr.debias import study as St



def test_default_settings_cover_the_sweep():
    names = [s.name for s in St.default_settings()]
    assert names[0] == "greedy" and len(set(names)) == len(names)
    assert {"beam3", "beam5", "T0.2", "T0.5", "T1.0", "top_p0.5", "top_p0.9", "top_k5", "top_k20"} <= set(names)
    multi = St.default_settings(seeds=[0, 1], debias=True)
    sampled = [s for s in multi if s.do_sample]
    assert {s.seed for s in sampled} == {0, 1} and all("@s" in s.name for s in sampled)
    assert sum(s.debias for s in multi) == 3                    # debias greedy + debias T1 x 2 seeds
    g = St.DecodingSetting("greedy")
    assert g.is_greedy and g.generate_kwargs() == {"do_sample": False, "num_beams": 1}
    t = St.DecodingSetting("x", do_sample=True, temperature=0.5)
    assert t.generate_kwargs() == {"do_sample": True, "num_beams": 1, "temperature": 0.5, "top_k": 0, "top_p": 1.0}


def test_load_settings(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps([{"name": "greedy"}, {"name": "hot", "do_sample": True, "temperature": 2.0}]))
    s = St.load_settings(p, seeds=[3])
    assert [x.name for x in s] == ["greedy", "hot"] and s[1].seed == 3
    p.write_text(json.dumps([{"name": "x", "temprature": 1}]))
    with pytest.raises(ValueError, match="unknown keys"):
        St.load_settings(p)


def test_spread_on_hand_made_rows():
    rows = [{"setting": {"name": "greedy"}, "metrics": {"pope_accuracy": 0.8, "chair_s": 0.5}},
            {"setting": {"name": "T1.0"}, "metrics": {"pope_accuracy": 0.6, "chair_s": 0.7}},
            {"setting": {"name": "beam3"}, "metrics": {"pope_accuracy": 0.7, "chair_s": 0.3}}]
    sp = St.spread(rows)
    a = sp["pope_accuracy"]
    assert a["min"] == 0.6 and a["max"] == 0.8 and a["argmin"] == "T1.0" and a["argmax"] == "greedy"
    assert a["range"] == pytest.approx(0.2) and a["mean"] == pytest.approx(0.7) and a["greedy"] == 0.8
    assert a["std"] == pytest.approx((0.02 / 3) ** 0.5)
    assert sp["chair_s"]["range"] == pytest.approx(0.4) and sp["chair_s"]["argmin"] == "beam3"


def test_flat_metrics_names():
    res = {"pope": {"all": {"accuracy": 1, "f1": 2, "yes_ratio": 3, "precision": 4, "recall": 5}},
           "chair": {"chair_s": 6, "chair_i": 7, "recall": 8, "words_per_caption": 9}}
    assert St.flat_metrics(res) == {"pope_accuracy": 1, "pope_f1": 2, "pope_yes_ratio": 3, "pope_precision": 4,
                                    "pope_recall": 5, "chair_s": 6, "chair_i": 7, "chair_recall": 8,
                                    "chair_words_per_caption": 9}


def _files(tmp_path, images_dir):
    pope = tmp_path / "pope.jsonl"
    pope.write_text("".join(json.dumps({"question_id": i, "image": f, "text": f"Is there a {o} in the image?",
                                        "label": lab}) + "\n"
                            for i, (f, o, lab) in enumerate([("red.png", "dog", "yes"), ("blue.png", "cat", "no"),
                                                             ("green.png", "car", "yes")])))
    chair = tmp_path / "chair.jsonl"
    chair.write_text("".join(json.dumps({"id": str(i), "image": f, "objects": objs}) + "\n"
                             for i, (f, objs) in enumerate([("red.png", ["dog"]), ("blue.png", ["cat", "car"])])))
    (tmp_path / "synonyms.json").write_text(json.dumps({"dog": [], "cat": [], "car": [], "tree": []}))
    return pope, chair


def test_study_on_tiny_model(tiny_llava_dir, tmp_path, images_dir):
    from csr.eval.run import evaluate_model

    pope, chair = _files(tmp_path, images_dir)
    settings = [St.DecodingSetting("greedy"), St.DecodingSetting("beam2", num_beams=2),
                St.DecodingSetting("T0.7", do_sample=True, temperature=0.7, seed=0),
                St.DecodingSetting("top_k5", do_sample=True, top_k=5, seed=0),
                St.DecodingSetting("debias", debias=True)]
    out = tmp_path / "study"
    summary = St.run_study(str(tiny_llava_dir), pope_path=pope, chair_path=chair, out_dir=out, settings=settings,
                           image_root=images_dir, caption_max_new_tokens=8, device="cpu", dtype="float32")
    saved = json.loads((out / "study.json").read_text())
    assert [r["setting"]["name"] for r in saved["rows"]] == ["greedy", "beam2", "T0.7", "top_k5", "debias"]
    assert set(saved["spread"]) == {"pope_accuracy", "pope_f1", "pope_yes_ratio", "pope_precision", "pope_recall",
                                    "chair_s", "chair_i", "chair_recall", "chair_words_per_caption"}
    assert saved["spread"] == json.loads(json.dumps(summary["spread"]))
    png = (out / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "texts" / "T0.7.jsonl").is_file()
    # the greedy row is exactly `csr eval`
    ref = evaluate_model(str(tiny_llava_dir), pope, chair, image_root=images_dir, caption_max_new_tokens=8,
                         device="cpu", dtype="float32")
    greedy = saved["rows"][0]["metrics"]
    assert greedy["pope_accuracy"] == ref["pope"]["all"]["accuracy"]
    assert greedy["chair_s"] == ref["chair"]["chair_s"] and greedy["chair_recall"] == ref["chair"]["recall"]
    # sampling rows are reproducible from their seed
    again = St.generate_texts(*_load(tiny_llava_dir), [images_dir / "red.png"] * 2, ["Is there a dog?"] * 2,
                              settings[2], max_new_tokens=6)
    again2 = St.generate_texts(*_load(tiny_llava_dir), [images_dir / "red.png"] * 2, ["Is there a dog?"] * 2,
                               settings[2], max_new_tokens=6)
    assert again == again2


def _load(path):
    from csr.models import load_policy

    return load_policy(str(path), dtype="float32", device="cpu")


def test_cli_study(tiny_llava_dir, tmp_path, images_dir):
    from csr.debias.cli import main

    pope, _ = _files(tmp_path, images_dir)
    sfile = tmp_path / "settings.json"
    sfile.write_text(json.dumps([{"name": "greedy"}, {"name": "T1", "do_sample": True}]))
    out = tmp_path / "s"
    assert main(["study", "--model", str(tiny_llava_dir), "--pope", str(pope), "--image-root", str(images_dir),
                 "--settings", str(sfile), "--seeds", "0,1", "--out", str(out), "--device", "cpu"]) == 0
    saved = json.loads((out / "study.json").read_text())
    assert [r["setting"]["name"] for r in saved["rows"]] == ["greedy", "T1@s0", "T1@s1"]
    assert (out / "study.png").is_file()
