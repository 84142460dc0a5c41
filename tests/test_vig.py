"""VIG (docs/method.md §3): hand-computed log-prob differences, selection thresholds, label masks,
content-free inputs, the CSR reward term and pair filter, and the `csr vig` commands."""

import json
import math

import pytest
import torch
from PIL import Image, ImageDraw

from csr.content_free import vig_content_free_image
from csr.vig.logprobs import VIGOptions
from csr.vig.maths import (apply_token_masks, n_kept, plan_selection, sample_vig, select_samples, selection_threshold,
                           token_keep_mask, vig_from_logprobs)


# ---------------------------------------------------------------------------------------------
# Pure core
# ---------------------------------------------------------------------------------------------


def test_vig_from_logprobs_is_the_difference_and_its_mean():
    per, mean = vig_from_logprobs([-1.0, -2.0, -0.5], [-1.5, -1.0, -0.5])
    assert per == pytest.approx([0.5, -1.0, 0.0])
    assert mean == pytest.approx(-0.5 / 3)
    # mean VIG = log(PPL_cf / PPL_image)
    ppl_i, ppl_c = math.exp(3.5 / 3), math.exp(3.0 / 3)
    assert mean == pytest.approx(math.log(ppl_c / ppl_i))
    with pytest.raises(ValueError):
        vig_from_logprobs([-1.0], [-1.0, -2.0])
    with pytest.raises(ValueError):
        sample_vig([])


def test_n_kept_is_the_ceiling_share():
    assert n_kept(10, 70) == 7          # 10·0.7 = 7.000000000000001 in floating point: still 7
    assert n_kept(3, 70) == 3
    assert n_kept(100, 70) == 70
    assert n_kept(7, 0) == 0
    assert n_kept(7, 100) == 7
    with pytest.raises(ValueError):
        n_kept(5, 120)


def test_selection_keeps_the_top_p_percent_and_tau_is_the_smallest_kept():
    vigs = [0.5, -0.2, 1.3, 0.9, 0.0, 2.0, -1.0, 0.7, 0.1, 0.3]
    kept = select_samples(vigs, 70)
    # top 7 of 10: 2.0, 1.3, 0.9, 0.7, 0.5, 0.3, 0.1
    assert [v for v, k in zip(vigs, kept) if k] == [0.5, 1.3, 0.9, 2.0, 0.7, 0.1, 0.3]
    assert [v for v, k in zip(vigs, kept) if not k] == [-0.2, 0.0, -1.0]
    tau = selection_threshold(vigs, 70)
    assert tau == 0.1
    assert [v >= tau for v in vigs] == kept  # without ties, "VIG >= τ" is exactly the kept set
    # the literal reading: numpy's 70th percentile (linear), a stricter token threshold
    import numpy as np

    assert selection_threshold(vigs, 70, "percentile") == pytest.approx(float(np.percentile(vigs, 70)))
    assert selection_threshold(vigs, 70, "percentile") > tau
    assert selection_threshold(vigs, 0) == math.inf
    assert selection_threshold(vigs, 100) == -1.0
    with pytest.raises(ValueError):
        selection_threshold(vigs, 70, "median")


def test_selection_ties_are_broken_by_dataset_order():
    vigs = [1.0, 0.5, 0.5, 0.5, 0.0]
    assert select_samples(vigs, 60) == [True, True, True, False, False]   # 3 of 5: the first two 0.5s
    assert selection_threshold(vigs, 60) == 0.5


def test_plan_selection_masks_tokens_below_tau_in_kept_samples_only():
    token_vigs = [[1.0, -1.0, 0.4], [0.0, 0.1], [2.0, 0.05, 0.3, -0.5], [-0.3]]
    sel = plan_selection(token_vigs, keep_percent=50)
    # sample VIG: 0.1333, 0.05, 0.4625, -0.3 -> top 2: samples 0 and 2; τ = 0.1333
    assert sel.kept == [True, False, True, False]
    assert sel.tau == pytest.approx(0.4 / 3)
    assert sel.masks == [[True, False, True], None, [True, False, True, False], None]
    st = sel.stats()
    assert (st["samples_kept"], st["tokens_total"], st["tokens_in_kept_samples"], st["tokens_supervised"]) == (2, 10, 7, 4)
    assert st["share_tokens_supervised"] == pytest.approx(0.4)
    # sample selection only
    assert plan_selection(token_vigs, 50, token_mask=False).masks == [[True] * 3, None, [True] * 4, None]
    # plain SFT: everything kept and supervised
    plain = plan_selection(token_vigs, 100, token_mask=False).stats()
    assert plain["tokens_supervised"] == plain["tokens_total"] == 10
    assert token_keep_mask([0.2, 0.1, 0.3], 0.2) == [True, False, True]


def test_apply_token_masks_keeps_exactly_the_intended_labels():
    I = -100
    labels = torch.tensor([
        [I, I, I, 11, 12, 13, I, I],     # prompt, 3 answer tokens, padding
        [I, I, 21, 22, 23, 24, 25, I],
        [I, I, I, I, 31, 32, I, I],
    ])
    masks = [[True, False, True], None, [False, True, True]]   # row 2 was cut by max_length: mask has 3
    out = apply_token_masks(labels, masks)
    expected = torch.tensor([
        [I, I, I, 11, I, 13, I, I],
        [I, I, 21, 22, 23, 24, 25, I],
        [I, I, I, I, I, 32, I, I],
    ])
    assert torch.equal(out, expected)
    assert torch.equal(labels[0], torch.tensor([I, I, I, 11, 12, 13, I, I]))  # input untouched
    with pytest.raises(ValueError, match="supervised tokens"):
        apply_token_masks(labels, [[True], None, None])       # row 0 has 3 answer tokens, mask 1
    with pytest.raises(ValueError):
        apply_token_masks(labels, [None, None])


def _pattern_image(seed: int = 0, size: int = 40) -> Image.Image:
    im = Image.new("RGB", (size, size), (250, 250, 250))
    d = ImageDraw.Draw(im)
    colors = [(220, 20, 20), (20, 20, 220), (20, 180, 20)]
    d.ellipse((2, 2, 18, 18), fill=colors[seed % 3])
    d.rectangle((22, 22, 37, 37), fill=colors[(seed + 1) % 3])
    return im


def test_vig_content_free_images():
    im = _pattern_image()
    blurred = vig_content_free_image(im, VIGOptions(content_free="blur", blur_radius=0.1))
    assert blurred.size == im.size and blurred.tobytes() != im.tobytes()
    # fraction of the shorter side and pixels agree
    same = vig_content_free_image(im, VIGOptions(content_free="blur", blur_radius=4.0, blur_units="pixels"))
    assert same.tobytes() == blurred.tobytes()
    blank = vig_content_free_image(im, VIGOptions(content_free="blank", blank_color=(0, 0, 0)))
    assert blank.size == im.size and blank.getcolors() == [(40 * 40, (0, 0, 0))]
    assert vig_content_free_image(im, VIGOptions(content_free="none")) is None
    with pytest.raises(ValueError):
        VIGOptions(content_free="noise").validate()


# ---------------------------------------------------------------------------------------------
# Model: VIG equals a hand computation of the log-prob differences
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    from csr.models import load_policy

    return load_policy(str(tiny_llava_dir), device="cpu", dtype="float32")


def _hand_logprobs(model, processor, image, prompt, answer, bos=True):
    """log p(a_t | a_<t, Q, image) for the answer tokens, one unpadded sequence, straight from the logits."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    msgs = [{"role": "user", "content": content}]
    p_text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(msgs + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                                         tokenize=False)
    assert full.startswith(p_text)
    enc = processor(text=[p_text], images=[image] if image is not None else None, return_tensors="pt",
                    add_special_tokens=False)
    a_ids = processor.tokenizer(full[len(p_text):], add_special_tokens=False)["input_ids"]
    head = [processor.tokenizer.bos_token_id] if bos else []
    ids = torch.cat([torch.tensor(head, dtype=torch.long), enc["input_ids"][0], torch.tensor(a_ids)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc.get("pixel_values")).logits
    logp = logits[0].float().log_softmax(-1)
    start = len(head) + enc["input_ids"].shape[1]
    return [logp[start - 1 + j, a].item() for j, a in enumerate(a_ids)], a_ids


@pytest.mark.parametrize("cf,add_bos", [("blur", "auto"), ("blank", "auto"), ("none", "auto"), ("blur", "never")])
def test_vig_equals_hand_computation(tiny, cf, add_bos):
    from csr.vig.logprobs import score_items

    model, processor = tiny
    bos = add_bos == "auto"   # the tiny tokenizer adds BOS on plain calls, as LLaVA's does
    opts = VIGOptions(content_free=cf, blur_radius=0.15, blank_color=(128, 128, 128), batch_size=3, add_bos=add_bos)
    items = [{"image": _pattern_image(0), "prompt": "Describe this image in detail.",
              "answer": "The image shows a red circle and a blue square."},
             {"image": _pattern_image(1), "prompt": "Is there a dog?", "answer": "No."},
             {"image": _pattern_image(2), "prompt": "What is in the picture?",
              "answer": "A cat sits on a mat. The sky is blue."}]
    got = score_items(model, processor, items, opts)   # one padded batch of three lengths
    for it, g in zip(items, got):
        lp_i, ids = _hand_logprobs(model, processor, it["image"], it["prompt"], it["answer"], bos)
        lp_c, ids_c = _hand_logprobs(model, processor, vig_content_free_image(it["image"], opts), it["prompt"],
                                     it["answer"], bos)
        assert ids == ids_c == g["token_ids"]
        assert processor.tokenizer.decode(ids).endswith("</s>")   # EOS is an answer token, as SFT trains it
        hand = [a - b for a, b in zip(lp_i, lp_c)]
        assert g["logp_image"] == pytest.approx(lp_i, abs=1e-4)
        assert g["logp_cf"] == pytest.approx(lp_c, abs=1e-4)
        assert g["vig_tokens"] == pytest.approx(hand, abs=1e-4)
        assert g["vig"] == pytest.approx(sum(hand) / len(hand), abs=1e-4)
        assert g["vig"] == pytest.approx(math.log(g["ppl_cf"] / g["ppl_image"]), abs=1e-6)
        assert any(abs(v) > 1e-4 for v in hand)   # the content-free input does change something


def test_blur_of_a_flat_image_has_zero_vig(tiny, images_dir):
    from csr.data import load_image
    from csr.vig.logprobs import score_items

    model, processor = tiny
    got = score_items(model, processor, [{"image": load_image(images_dir / "red.png"), "prompt": "Describe.",
                                          "answer": "A red image."}], VIGOptions(content_free="blur"))
    assert got[0]["vig_tokens"] == pytest.approx([0.0] * got[0]["n_tokens"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# CSR reward term and pair filter
# ---------------------------------------------------------------------------------------------


def test_vig_reward_scale_and_mix():
    from csr.config import ScoreConfig
    from csr.score.reward import calibrated_rewards, vig_reward

    assert vig_reward(0.0) == 0.0
    assert vig_reward(1.0) == pytest.approx(100 * math.tanh(0.5))
    assert vig_reward(-50.0) == pytest.approx(-100.0)       # bounded
    ppl_i, ppl_c = 2.0, 5.0
    assert vig_reward(math.log(ppl_c / ppl_i)) == pytest.approx(100 * (ppl_c - ppl_i) / (ppl_c + ppl_i))
    assert vig_reward(0.7, "nats") == 0.7
    assert vig_reward(None) == 0.0
    # R_I 30, R_T 10 (sum_logprob), R_VIG 20 (nats)
    node = {"clip": 30.0, "logprob_sum": 10.0, "vig": 20.0}
    cfg = ScoreConfig(reward_lambda=0.9, self_reward="sum_logprob", vig_weight=0.5, vig_scale="nats")
    assert calibrated_rewards([node], cfg) == pytest.approx([0.9 * 30 + 0.1 * 10 + 0.5 * 20])


def _siblings():
    return [{"id": 1, "clip": 30.0, "logprob_sum": -2.0, "logprob_mean": -0.5, "vig": 0.2},
            {"id": 2, "clip": 25.0, "logprob_sum": -1.0, "logprob_mean": -0.2, "vig": 1.5},
            {"id": 3, "clip": 28.0, "logprob_sum": -3.0, "logprob_mean": -0.9, "vig": -0.4}]


@pytest.mark.parametrize("mode", ["raw", "rank"])
def test_score_siblings_with_vig(mode):
    from csr.config import ScoreConfig
    from csr.score.reward import calibrated_rewards, rank_fractions, vig_reward

    kw = dict(reward_lambda=0.9, calibration=mode, self_reward="prob", clip_clamp=True)
    without_vig = [{k: v for k, v in n.items() if k != "vig"} for n in _siblings()]
    base = calibrated_rewards(without_vig, ScoreConfig(**kw))
    at_zero = _siblings()
    assert calibrated_rewards(at_zero, ScoreConfig(**kw, vig_weight=0.0)) == pytest.approx(base)   # w=0: CSR unchanged
    assert not any("vig_reward" in n for n in at_zero)   # a term at weight 0 is off: nothing stored
    sib = _siblings()
    got = calibrated_rewards(sib, ScoreConfig(**kw, vig_weight=0.5))
    r_vig = [vig_reward(n["vig"]) for n in _siblings()]
    if mode == "raw":
        assert got == pytest.approx([b + 0.5 * v for b, v in zip(base, r_vig)])
    else:
        assert got == pytest.approx([b - 0.5 * r for b, r in zip(base, rank_fractions(r_vig))])
    assert [n["reward"] for n in sib] == got and sib[1]["vig_reward"] == pytest.approx(r_vig[1])


def test_path_vig_and_pair_filter():
    from csr.vig.reward import path_vig, vig_pair_filter

    nodes = [{"vig_sum": 1.0, "vig_n_tokens": 4}, {"vig_sum": -0.5, "vig_n_tokens": 1}, {"vig_n_tokens": 0}]
    assert path_vig(nodes) == pytest.approx(0.5 / 5)
    assert path_vig([{"text": "x"}]) is None
    assert vig_pair_filter({"chosen_vig": 0.3, "rejected_vig": 0.1}) is None
    assert vig_pair_filter({"chosen_vig": 0.1, "rejected_vig": 0.3}) == "chosen_lower_vig"
    assert vig_pair_filter({"chosen_vig": 0.2, "rejected_vig": 0.2}) is None      # ties are kept
    assert vig_pair_filter({"chosen_vig": 0.3, "rejected_vig": 0.1}, min_gap=0.5) == "chosen_lower_vig"
    with pytest.raises(ValueError):
        vig_pair_filter({"id": "x"})


def test_node_vig_matches_a_hand_computation_in_context(tiny):
    from csr.models import build_chat_prompt
    from csr.vig.reward import add_node_vig

    model, processor = tiny
    image = _pattern_image(0)
    tree = {"id": "t", "prompt": "Describe this image in detail.", "nodes": [
        {"id": 0, "parent": None, "text": ""},
        {"id": 1, "parent": 0, "text": " The image shows a red circle."},  # exact texts, as generated
        {"id": 2, "parent": 1, "text": " There is a blue square."},
        {"id": 3, "parent": 0, "text": ""}]}
    opts = VIGOptions(content_free="blank", blank_color=(0, 0, 0), batch_size=2)
    assert add_node_vig([tree], [image], model, processor, opts) == 2
    node = tree["nodes"][2]
    tok = processor.tokenizer
    prefix = build_chat_prompt(processor, tree["prompt"]) + " The image shows a red circle."
    full = prefix + " There is a blue square."
    ctx_ids, full_ids = tok(prefix)["input_ids"], tok(full)["input_ids"]
    assert full_ids[:len(ctx_ids)] == ctx_ids
    n = len(full_ids) - len(ctx_ids)

    def lp(img):
        enc = processor(text=[full], images=[img], return_tensors="pt")
        with torch.no_grad():
            logp = model(**enc).logits[0].float().log_softmax(-1)
        ids = enc["input_ids"][0]
        L = len(ids)
        return [logp[j - 1, ids[j]].item() for j in range(L - n, L)]

    hand = [a - b for a, b in zip(lp(image), lp(vig_content_free_image(image, opts)))]
    assert node["vig_n_tokens"] == n
    assert node["vig"] == pytest.approx(sum(hand) / n, abs=1e-4)
    assert node["vig_sum"] == pytest.approx(sum(hand), abs=1e-4)
    assert tree["nodes"][3]["vig"] is None and tree["nodes"][3]["vig_n_tokens"] == 0


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def test_cli_score_and_view(tiny_llava_dir, tmp_path):
    from csr.vig.cli import main

    img_dir = tmp_path / "data"
    img_dir.mkdir()
    rows = []
    for i in range(5):
        _pattern_image(i).save(img_dir / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"{i}.png", "prompt": "<image>\nDescribe this image in detail.",
                     "answer": ["A red circle.", "A blue square. A green triangle.", "No.", "Yes, there is.",
                                "The picture contains a car."][i], "kind": "caption"})
    rows.append({"id": "bad", "image": "missing.png", "prompt": "Hi", "answer": "Hello."})
    rows.append({"id": "noans", "image": "0.png", "prompt": "Hi"})
    (img_dir / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "vig"
    assert main(["score", "--model", str(tiny_llava_dir), "--data", str(img_dir / "sft.jsonl"), "--out", str(out),
                 "--content-free", "blank", "--batch-size", "2", "--device", "cpu"]) == 0
    recs = [json.loads(line) for line in (out / "vig.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"s{i}" for i in range(5)]
    assert all(len(r["tokens"]) == len(r["vig_tokens"]) == r["n_tokens"] for r in recs)
    assert recs[0]["kind"] == "caption" and recs[0]["prompt"] == "Describe this image in detail."
    done = json.loads((out / "DONE.json").read_text())
    assert done["processed"] == 5 and done["skipped"] == {"missing_image": 1, "no_answer": 1}
    assert (out / "vig_histogram.png").stat().st_size > 1000
    assert done["stats"]["samples"] == 5
    html_path = tmp_path / "heat.html"
    assert main(["view", "--scores", str(out), "--id", "s1", "--html", str(html_path),
                 "--histogram", str(tmp_path / "h.png")]) == 0
    page = html_path.read_text()
    assert "τ =" in page and page.count('class="t"') >= recs[1]["n_tokens"]
    assert (tmp_path / "h.png").is_file()
    from csr.vig.view import heatmap_terminal

    plain = heatmap_terminal(recs[1], tau=0.0, color=False)
    assert plain.count("[") == recs[1]["n_tokens"]
    assert "\x1b[48;2;" in heatmap_terminal(recs[1])


def test_rescore_and_filter_pairs_stages(tiny_llava_dir, tmp_path):
    """The stand-alone stages: VIG term on a finished score stage, VIG filter on a finished pairs stage."""
    from csr.io import mark_done, read_jsonl, write_jsonl
    from csr.pairs import to_trl
    from csr.config import ScoreConfig
    from csr.vig.reward import run_filter_pairs, run_rescore

    img = tmp_path / "a.png"
    _pattern_image(0).save(img)
    nodes = [{"id": 0, "parent": None, "depth": 0, "text": "", "final": False},
             {"id": 1, "parent": 0, "depth": 1, "text": "A red circle.", "final": True, "clip": 30.0,
              "logprob_sum": -3.0, "logprob_mean": -0.6},
             {"id": 2, "parent": 0, "depth": 1, "text": "A cat sits on a mat.", "final": True, "clip": 20.0,
              "logprob_sum": -2.0, "logprob_mean": -0.4}]
    scored = tmp_path / "score"
    write_jsonl(scored / "scored.jsonl", [{"id": "t0", "image": str(img), "prompt": "Describe this image.",
                                           "nodes": nodes}])
    mark_done(scored, {"stage": "score"})
    opts = VIGOptions(content_free="blank", blank_color=(0, 0, 0))
    done = run_rescore(scored, tmp_path / "rescored", str(tiny_llava_dir), opts,
                       ScoreConfig(reward_lambda=0.9, vig_weight=2.0), device="cpu")
    assert done["nodes_scored"] == 2
    out_nodes = read_jsonl(tmp_path / "rescored" / "scored.jsonl")[0]["nodes"]
    from csr.score.reward import vig_reward

    for n in out_nodes[1:]:
        base = 0.9 * n["clip"] + 0.1 * 100 * math.exp(n["logprob_sum"])
        assert n["reward"] == pytest.approx(base + 2.0 * vig_reward(n["vig"]))

    pairs = tmp_path / "pairs"
    pair = {"id": "t0", "image": str(img), "prompt": "Describe this image.", "chosen": "A red circle.",
            "rejected": "A cat sits on a mat.", "chosen_score": 1.0, "rejected_score": 0.0, "margin": 1.0}
    write_jsonl(pairs / "pairs.jsonl", [to_trl(pair), to_trl({**pair, "id": "t1", "chosen": pair["rejected"],
                                                                  "rejected": pair["chosen"]})])
    mark_done(pairs, {"stage": "pairs"})
    done = run_filter_pairs(pairs, tmp_path / "filtered", str(tiny_llava_dir), opts, device="cpu")
    kept = read_jsonl(tmp_path / "filtered" / "pairs.jsonl")
    assert len(kept) == 1 and done["skipped"] == {"chosen_lower_vig": 1}   # one of the two orders is dropped
    assert kept[0]["chosen_vig"] >= kept[0]["rejected_vig"]
