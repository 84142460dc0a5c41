"""VIG the paper's way (docs/method.md §3): every assistant turn of a multi-turn conversation is scored
and trained, text-only samples are kept unmasked, irregular records are counted, and both arms of
an epochs schedule see each kept sample equally often."""

import copy
import json

import pytest
import torch

from csr.vig import collate as C
from csr.vig import logprobs as L
from csr.vig import maths as M
from csr.vig import records as R
from csr.vig import score as S

IGNORE = -100


from test_vig_train import _image  # noqa: E402  (one drawing of the test images)


TWO_TURNS = [{"prompt": "What is in the image?", "answer": "A red circle."},
             {"prompt": "Where is it?", "answer": "At the top left."}]


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    from csr.models import load_policy

    return load_policy(str(tiny_llava_dir), dtype="float32", device="cpu")


# ---------------------------------------------------------------------------------------------
# collation
# ---------------------------------------------------------------------------------------------


def test_conversation_collator_equals_trl_on_single_turn_records(tiny):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    _, proc = tiny
    examples = [C.vig_example([{"prompt": "Describe this image.", "answer": a}], _image(i))
                for i, a in enumerate(["A red circle.", "No.", "A cat sits on a mat. The sky is blue."])]
    trl = DataCollatorForVisionLanguageModeling(processor=proc, completion_only_loss=True)
    want = trl([{k: v for k, v in ex.items() if k != C.TURNS_KEY} for ex in copy.deepcopy(examples)])
    got = C.ConversationCollator(proc)(copy.deepcopy(examples))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_every_assistant_turn_is_labelled_and_nothing_else(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    batch = C.ConversationCollator(proc)([C.vig_example(TWO_TURNS, _image(0)),
                                          C.vig_example(TWO_TURNS[:1], None)])
    # the tiny template renders an answer as "ASSISTANT: <answer></s>" after a generation prompt
    # "ASSISTANT:", so each answer segment is " <answer></s>", tokenised on its own
    seg = [tok(" " + t["answer"] + "</s>", add_special_tokens=False)["input_ids"] for t in TWO_TURNS]
    labels = batch["labels"][0]
    assert labels[labels != IGNORE].tolist() == seg[0] + seg[1]
    # the labels sit on those very input tokens, and the user turn between them is not labelled
    pos = (labels != IGNORE).nonzero(as_tuple=True)[0]
    assert batch["input_ids"][0, pos].tolist() == seg[0] + seg[1]
    gap = tok.decode(batch["input_ids"][0, pos[len(seg[0]) - 1] + 1:pos[len(seg[0])]])
    assert gap.strip() == "USER: Where is it? ASSISTANT:"
    # the text-only row: no image placeholder, no pixel rows for it (one image in the batch)
    assert model_image_tokens(proc, batch["input_ids"][1]) == 0
    assert batch["pixel_values"].shape[0] == 1
    row = batch["labels"][1]
    assert row[row != IGNORE].tolist() == seg[0]


def model_image_tokens(proc, ids):
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    return int((ids == image_id).sum())


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


def test_multi_turn_vig_covers_every_turn_and_the_first_turn_is_unchanged(tiny):
    model, proc = tiny
    opts = L.VIGOptions(content_free="blank", batch_size=4).validate()
    im = _image(1)
    multi, single = L.score_batch(model, proc, [{"image": im, "turns": TWO_TURNS},
                                                {"image": im, "prompt": TWO_TURNS[0]["prompt"],
                                                 "answer": TWO_TURNS[0]["answer"]}], opts)
    tok = proc.tokenizer
    n1 = len(tok(" " + TWO_TURNS[0]["answer"] + "</s>", add_special_tokens=False)["input_ids"])
    n2 = len(tok(" " + TWO_TURNS[1]["answer"] + "</s>", add_special_tokens=False)["input_ids"])
    assert multi["n_tokens"] == n1 + n2 and single["n_tokens"] == n1
    # a causal model: the first answer's tokens do not see the second turn, so their VIG is the
    # single-turn record's (the multi-turn row went through ConversationCollator, the other through TRL's)
    assert multi["vig_tokens"][:n1] == pytest.approx(single["vig_tokens"], abs=1e-4)
    # the sample VIG is the mean over both turns' tokens
    assert multi["vig"] == pytest.approx(sum(multi["vig_tokens"]) / (n1 + n2), rel=1e-9)


def _write_conversations(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _image(0).save(d / "a.png")
    _image(2).save(d / "b.png")
    rows = [
        {"id": "multi", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A red circle."},
            {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "At the top left."},
            {"from": "human", "value": "Anything else?"}]},                         # trailing question: dropped
        {"id": "text", "conversations": [{"from": "human", "value": "Say hello."},    # no image: text-only
                                         {"from": "gpt", "value": "Hello."}]},
        {"id": "noanswer", "image": "b.png", "conversations": [{"from": "human", "value": "<image>\nHi?"}]},
        {"id": "single", "image": "b.png", "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                                             {"from": "gpt", "value": "A blue square."}]},
    ]
    (d / "conv.json").write_text(json.dumps(rows))
    return d / "conv.json"


def test_reading_conversations_counts_what_is_kept_and_skipped(tmp_path):
    from csr.io import StageSummary

    path = _write_conversations(tmp_path)
    summary = StageSummary("vig score")
    recs = R.read_records(path, summary=summary)
    assert [r["id"] for r in recs] == ["multi", "text", "single"]
    assert recs[0]["turns"] == TWO_TURNS and recs[1]["image"] is None and recs[1]["text_only"]
    d = summary.as_dict()
    assert d["skipped"] == {"no_answer": 1}
    assert d["records"] == {"turns": "all", "text_only": "keep", "trailing_human_turn_dropped": 1,
                            "text_only_kept": 1, "multi_turn": 1, "turns_read": 4}
    # the older reading: first pair only, records without an image skipped
    summary = StageSummary("vig score")
    recs = R.read_records(path, summary=summary, turns="first", text_only="skip")
    assert [r["id"] for r in recs] == ["multi", "single"] and "turns" not in recs[0]
    d = summary.as_dict()
    assert d["skipped"] == {"no_answer": 1, "no_image": 1}
    assert d["records"]["later_turns_not_read:1"] == 1 and d["records"]["turns_read"] == 2


def test_text_only_samples_are_kept_unmasked_outside_tau():
    recs = [{"vig": 0.5, "vig_tokens": [0.9, 0.2], "n_tokens": 2},
            {"vig": 0.1, "vig_tokens": [0.1], "n_tokens": 1},
            {"vig": 0.3, "vig_tokens": [0.4, 0.3, 0.2], "n_tokens": 3},
            {"vig": None, "vig_tokens": None, "n_tokens": 4}]            # text-only
    sel = M.plan_records_selection(recs, keep_percent=50.0)
    # 3 scored samples, top 50%: ceil(1.5) = 2 -> VIG 0.5 and 0.3, τ = 0.3
    assert sel.tau == 0.3 and sel.kept == [True, False, True, True]
    assert sel.masks == [[True, False], None, [True, True, False], [True] * 4]
    st = sel.stats()
    # supervised: 1 + 2 + 4 (text-only) = 7 of 2 + 1 + 3 + 4 = 10 tokens
    assert (st["tokens_supervised"], st["tokens_total"], st["text_only_samples"], st["text_only_tokens"]) == \
        (7, 10, 1, 4)
    plain = M.plan_records_selection(recs, 100.0, token_mask=False)
    assert plain.kept == [True] * 4 and plain.stats()["tokens_supervised"] == 10


# ---------------------------------------------------------------------------------------------
# the stage and training, end to end
# ---------------------------------------------------------------------------------------------


def test_score_and_train_conversations_by_epochs(tiny_llava_dir, tiny, tmp_path):
    from csr.vig.train import build_args, run_selective_sft

    model, proc = tiny
    path = _write_conversations(tmp_path)
    out = tmp_path / "scores"
    done = S.run_vig_score(str(tiny_llava_dir), path, out, L.VIGOptions(content_free="blank", batch_size=4),
                           model=model, processor=proc)
    assert done["processed"] == 3 and done["skipped"] == {"no_answer": 1}
    recs = S.read_scores(out)
    by_id = {r["id"]: r for r in recs}
    assert by_id["text"]["vig"] is None and by_id["text"]["n_tokens"] > 0 and by_id["multi"]["turns"] == TWO_TURNS
    fast = {"per_device_train_batch_size": 2, "num_train_epochs": 2, "activation_checkpointing": False,
            "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
            "seed": 0, "merge": False}
    total = sum(r["n_tokens"] for r in recs)
    summaries = {}
    for arm, extra in (("plain", {"selection": "none"}), ("vig", {"keep_percent": 50.0})):
        summaries[arm] = run_selective_sft(str(tiny_llava_dir), out, tmp_path / arm,
                                           build_args(tmp_path / arm, {**fast, **extra}, cuda_available=False))
    plain, vig = summaries["plain"], summaries["vig"]
    # plain: all 3 samples, every token, seen twice (2 epochs)
    assert plain["selection"]["samples_kept"] == 3 and plain["selection"]["tokens_supervised"] == total
    assert plain["training"]["passes_per_kept_sample"] == 2.0
    assert plain["training"]["supervised_tokens_seen"] == 2 * total
    # VIG arm: of the 2 scored samples the top 50% (1) plus the text-only one; also seen twice each
    sel = vig["selection"]
    assert sel["samples_kept"] == 2 and sel["text_only_samples"] == 1
    assert vig["training"]["passes_per_kept_sample"] == 2.0 and vig["training"]["schedule"] == "epochs"
    assert vig["training"]["supervised_tokens_seen"] == 2 * sel["tokens_supervised"]
    assert vig["training"]["steps"] < plain["training"]["steps"]
