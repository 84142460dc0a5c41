"""The named debiasing recipes (csr.debias.recipes; docs/method.md §2): the authors' calibration rules
on hand-made tables, how a recipe and explicit flags resolve, unknown names refused with the list,
and the recipe as the CSR candidate mode."""

import json

import numpy as np
import pytest

from csr.debias import calibration as C
from csr.debias.recipes import CALIBRATION_RECIPES, SAMPLING_RECIPES, calibration_recipe, sampling_recipe

# ---------------------------------------------------------------------------------------------
# the authors' p_cf: none + unk summed, renormalised per question, + 1e-4
# ---------------------------------------------------------------------------------------------


def test_authors_content_free_sum_renormalise_epsilon_against_toolkit_mean():
    none = np.array([[0.6, 0.2], [0.5, 0.0]])
    unk = np.array([[0.1, 0.1], [0.3, 0.0]])
    # authors, row 0: (0.6+0.1, 0.2+0.1) = (0.7, 0.3), sums to 1, + 1e-4 -> (0.7001, 0.3001)
    # authors, row 1: (0.8, 0.0) -> (1.0, 0.0) + 1e-4 -> (1.0001, 0.0001)
    sum_eps = C.content_free_estimate([none, unk], combine="sum", epsilon=1e-4)
    np.testing.assert_allclose(sum_eps, [[0.7001, 0.3001], [1.0001, 0.0001]], rtol=1e-12)
    # toolkit, row 0: mean of (0.75, 0.25) and (0.5, 0.5) = (0.625, 0.375)
    mean = C.content_free_estimate([none, unk], combine="mean")
    np.testing.assert_allclose(mean[0], [0.625, 0.375], rtol=1e-12)
    # the two rules decide differently on p = (0.68, 0.32):
    # authors: 0.68 / 0.7001 = 0.9713 < 0.32 / 0.3001 = 1.0663 -> "no"
    # toolkit: 0.68 / 0.625 = 1.088 > 0.32 / 0.375 = 0.8533 -> "yes"
    p = np.array([[0.68, 0.32]])
    assert C.predict(C.calibrate(p, sum_eps[:1]), ["yes", "no"]) == ["no"]
    assert C.predict(C.calibrate(p, mean[:1]), ["yes", "no"]) == ["yes"]
    # row 1: p = (0.9, 0.1): q ∝ (0.9 / 1.0001, 0.1 / 0.0001) = (0.89991, 1000) -> "no", finite
    q = C.calibrate([[0.9, 0.1]], sum_eps[1:])
    np.testing.assert_allclose(q, [[0.9 / 1.0001 / (0.9 / 1.0001 + 1000.0), 1000.0 / (0.9 / 1.0001 + 1000.0)]],
                               rtol=1e-9)
    # dataset mean of the authors' rows: ((0.7001 + 1.0001) / 2, (0.3001 + 0.0001) / 2) = (0.8501, 0.1501)
    np.testing.assert_allclose(C.content_free_estimate([none, unk], per_sample=False, combine="sum", epsilon=1e-4),
                               [[0.8501, 0.1501]] * 2, rtol=1e-12)
    with pytest.raises(ValueError, match="mean"):
        C.content_free_estimate([none], combine="max")
    with pytest.raises(ValueError, match="epsilon"):
        C.content_free_estimate([none], epsilon=-1.0)


# ---------------------------------------------------------------------------------------------
# the authors' label probability: the exact label token among the top k
# ---------------------------------------------------------------------------------------------


class DecodeTokenizer:
    """A vocabulary of decoded strings (len, batch_decode), as `label_token_index` reads it."""

    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def batch_decode(self, ids):
        return [self.texts[i[0]] for i in ids]


def test_label_token_index_matches_lower_cased_stripped_text():
    tok = DecodeTokenizer(["<unk>", "Yes", " yes", "YES", "No", " no", "not", "yess"])
    # 'Yes', ' yes', 'YES' -> label 0; 'No', ' no' -> label 1; 'not', 'yess' are no label
    assert C.label_token_index(tok, ["yes", "no"]) == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1}


def test_top_k_label_probs_take_the_first_exact_token_only():
    index = {1: 0, 2: 0, 4: 1}                     # tokens 1, 2 are "yes"; token 4 is "no"
    probs = np.array([[0.05, 0.30, 0.20, 0.40, 0.05, 0.0],
                      [0.50, 0.01, 0.02, 0.40, 0.03, 0.04]])
    # row 0 by rank: 3 (0.40, no label), 1 (0.30, yes), 2 (0.20, yes again: not summed), 0, 4 (0.05, no)
    #   k = 10 -> yes 0.30, no 0.05 ; k = 2 -> ranks 3, 1: yes 0.30, no 0 (not in the top 2)
    # row 1 by rank: 0 (0.50), 3 (0.40), 5 (0.04), 4 (0.03, no), 2 (0.02, yes), 1 (0.01)
    #   k = 10 -> yes 0.02, no 0.03 ; k = 3 -> neither label: (0, 0)
    np.testing.assert_allclose(C.top_k_label_probs(probs, index, 2, k=10), [[0.30, 0.05], [0.02, 0.03]])
    np.testing.assert_allclose(C.top_k_label_probs(probs, index, 2, k=2), [[0.30, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(C.top_k_label_probs(probs, index, 2, k=3)[1], [0.0, 0.0])
    # the toolkit's rule on the same row sums the variants: yes = 0.30 + 0.20
    np.testing.assert_allclose(C.label_scores(probs, [[1, 2], [4]])[0], [0.50, 0.05])


# ---------------------------------------------------------------------------------------------
# recipes: contents, names, flags over recipes
# ---------------------------------------------------------------------------------------------


def test_recipes_hold_the_authors_settings():
    a = calibration_recipe("authors")
    assert (a.cf, a.combine, a.epsilon, a.label_top_k, a.mode, a.per_sample) == \
        (("none", "unk"), "sum", 1e-4, 10, "diag", True)
    assert a.pope_suffix == "Please answer this question with one word."
    t = calibration_recipe("toolkit")
    assert (t.cf, t.combine, t.epsilon, t.label_top_k, t.pope_suffix) == \
        (("none", "unk", "blank", "noise"), "mean", 0.0, 0, "")
    s = sampling_recipe("authors")
    assert (s.do_sample, s.cf, s.alpha, s.beta, s.pope_beta) == (True, "mean", 1.0, 0.1, 0.2)
    assert (sampling_recipe("toolkit").do_sample, sampling_recipe("toolkit").cf) == (False, "none")
    for name in ("official", "Authors", ""):
        with pytest.raises(ValueError, match="choose from toolkit, authors"):
            calibration_recipe(name)
        with pytest.raises(ValueError, match="choose from toolkit, authors"):
            sampling_recipe(name)
    assert set(CALIBRATION_RECIPES) == set(SAMPLING_RECIPES) == {"toolkit", "authors"}


def _calibrate_args(*extra):
    from csr.debias.cli import build_parser

    return build_parser().parse_args(["calibrate", "--model", "M", "--pope", "p.jsonl", "--out", "o", *extra])


def _sample_args(*extra):
    from csr.debias.cli import build_parser

    return build_parser().parse_args(["sample", "--model", "M", "--pope", "p.jsonl", "--out", "o", *extra])


def test_cli_recipe_resolution_and_explicit_flags_win():
    from csr.debias.cli import calibration_settings, sampling_settings

    st = calibration_settings(_calibrate_args())
    assert st == {"recipe": "toolkit", "cf_inputs": ["none", "unk", "blank", "noise"], "combine": "mean",
                  "epsilon": 0.0, "label_top_k": 0, "merge_variants": True, "mode": "diag", "per_sample": True,
                  "suffix": None}
    st = calibration_settings(_calibrate_args("--recipe", "authors"))
    assert st == {"recipe": "authors", "cf_inputs": ["none", "unk"], "combine": "sum", "epsilon": 1e-4,
                  "label_top_k": 10, "merge_variants": False, "mode": "diag", "per_sample": True,
                  "suffix": "Please answer this question with one word."}
    st = calibration_settings(_calibrate_args("--recipe", "authors", "--cf", "none", "--dataset-mean",
                                              "--suffix", "", "--label-top-k", "0"))
    assert (st["cf_inputs"], st["per_sample"], st["suffix"], st["label_top_k"], st["combine"]) == \
        (["none"], False, "", 0, "sum")
    with pytest.raises(SystemExit, match="unknown calibration recipe 'paper': choose from toolkit, authors"):
        calibration_settings(_calibrate_args("--recipe", "paper"))

    st = sampling_settings(_sample_args("--recipe", "authors"))
    assert (st["do_sample"], st["cf"], st["alpha"], st["beta"], st["pope_beta"]) == (True, "mean", 1.0, 0.1, 0.2)
    st = sampling_settings(_sample_args("--recipe", "authors", "--greedy", "--pope-beta", "0.1"))
    assert (st["do_sample"], st["pope_beta"], st["cf"]) == (False, 0.1, "mean")
    st = sampling_settings(_sample_args())
    assert (st["do_sample"], st["cf"], st["pope_beta"], st["pope_suffix"]) == (False, "none", 0.1, "")
    with pytest.raises(SystemExit, match="choose from toolkit, authors"):
        sampling_settings(_sample_args("--recipe", "vcd"))


def test_csr_candidate_mode_takes_the_recipe():
    from csr.config import ConfigError, GenerateConfig

    g = GenerateConfig(candidate_mode="debias", debias_recipe="authors", debias_alpha=3.0)
    g.validate()
    assert g.debias_settings() == {"alpha": 1.0, "beta": 0.1, "cf_mode": "mean"}
    g = GenerateConfig(candidate_mode="debias", debias_alpha=3.0, debias_content_free="unk")
    assert g.debias_settings() == {"alpha": 3.0, "beta": 0.1, "cf_mode": "unk"}
    with pytest.raises(ConfigError, match="choose from toolkit, authors"):
        GenerateConfig(debias_recipe="nope").validate()


# ---------------------------------------------------------------------------------------------
# end to end on the tiny LLaVA
# ---------------------------------------------------------------------------------------------


def test_cli_calibrate_authors_recipe(tiny_llava_dir, tmp_path, images_dir):
    from csr.debias.cli import main
    from csr.models import load_processor

    tok = load_processor(str(tiny_llava_dir)).tokenizer
    index = C.label_token_index(tok, ["yes", "no"])
    if set(index.values()) != {0, 1}:
        pytest.skip("the tiny vocabulary has no single yes / no token")
    recs = [{"question_id": i, "image": str(images_dir / f), "text": f"Is there a {o}?", "label": lab}
            for i, (f, o, lab) in enumerate([("red.png", "dog", "yes"), ("blue.png", "cat", "no")])]
    pope = tmp_path / "pope.jsonl"
    pope.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", str(tiny_llava_dir), "--pope", str(pope), "--recipe", "authors",
                 "--out", str(out), "--device", "cpu", "--no-grid", "--no-greedy-baseline"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["recipe"] == "authors" and res["label_token"] == "exact among top 10"
    assert res["settings"] == {"cf": ["none", "unk"], "mode": "diag", "per_sample": True, "combine": "sum",
                               "epsilon": 1e-4}
    assert res["suffix"] == "Please answer this question with one word."
    rows = [json.loads(x) for x in (out / "label_probs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]["p_cf"]) == {"none", "unk"}


def test_cli_sample_authors_recipe_adds_a_greedy_baseline(tiny_llava_dir, tmp_path, images_dir):
    from csr.debias.cli import main

    pope = tmp_path / "pope.jsonl"
    pope.write_text(json.dumps({"question_id": 0, "image": str(images_dir / "red.png"), "text": "Is there a dog?",
                                "label": "yes"}) + "\n")
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tiny_llava_dir), "--pope", str(pope), "--recipe", "authors",
                 "--pope-max-new-tokens", "3", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    st = res["settings"]
    assert (st["recipe"], st["do_sample"], st["cf"], st["pope_beta"]) == ("authors", True, "mean", 0.2)
    assert set(res["pope"]) == {"debiased", "baseline", "greedy"}
