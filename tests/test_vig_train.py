"""VIG-selective SFT: the masking collator keeps exactly the intended labels, on TRL's own collation,
and SFTTrainer trains on them (LoRA and full), reporting the share of tokens supervised."""

import copy
import json

import pytest
import torch
from PIL import Image, ImageDraw

IGNORE = -100


def _image(seed: int) -> Image.Image:
    im = Image.new("RGB", (40, 40), (250, 250, 250))
    d = ImageDraw.Draw(im)
    d.ellipse((2 + seed, 2, 18 + seed, 18), fill=(220, 20 * seed % 255, 20))
    d.rectangle((22, 22, 37, 37), fill=(20, 20, 220))
    return im


ANSWERS = ["The image shows a red circle.", "No.", "A cat sits on a mat. The sky is blue.", "Yes, there is.",
           "There is a green triangle in the top left corner.", "A car, a tree and a house."]


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from csr.models import load_processor

    return load_processor(str(tiny_llava_dir))


def test_masking_collator_keeps_exactly_the_intended_labels(processor):
    from csr.vig.collate import sft_collator, sft_example
    from csr.vig.train import ANSWER_COUNT_KEY, MASK_KEY, VIGMaskingCollator

    inner = sft_collator(processor)
    examples = [sft_example("Describe this image.", a, _image(i)) for i, a in enumerate(ANSWERS[:3])]
    plain = inner(copy.deepcopy(examples))
    n_answer = [(row != IGNORE).sum().item() for row in plain["labels"]]
    masks = []
    for b, n in enumerate(n_answer):
        masks.append([(j + b) % 2 == 0 for j in range(n)])   # a different pattern per row
    masks[1] = None                                         # no mask on row 1
    ex = copy.deepcopy(examples)
    for e, m in zip(ex, masks):
        e[MASK_KEY] = None if m is None else [int(x) for x in m]
    coll = VIGMaskingCollator(inner)
    batch = coll(ex)
    assert set(batch) == set(plain) | {ANSWER_COUNT_KEY}
    assert batch[ANSWER_COUNT_KEY].tolist() == n_answer
    # inputs are TRL's, untouched
    for k in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(batch[k], plain[k])
    for b in range(3):
        pos = (plain["labels"][b] != IGNORE).nonzero(as_tuple=True)[0].tolist()
        want = plain["labels"][b].clone()
        if masks[b] is not None:
            for j, p in enumerate(pos):
                if not masks[b][j]:
                    want[p] = IGNORE
        assert torch.equal(batch["labels"][b], want)
        # kept labels are the answer tokens themselves, masked ones stay in the input
        kept = batch["labels"][b] != IGNORE
        assert torch.equal(batch["labels"][b][kept], batch["input_ids"][b][kept])
    expected_supervised = sum(sum(m) if m is not None else n for m, n in zip(masks, n_answer))
    assert int((batch["labels"] != IGNORE).sum()) == expected_supervised


def test_scores_align_with_the_training_collation(tiny_llava_dir, processor):
    """VIG_t j of a sample is the j-th label the SFT collator produces for it."""
    from csr.models import load_policy
    from csr.vig.collate import sft_collator, sft_example
    from csr.vig.logprobs import VIGOptions, score_items

    model, proc = load_policy(str(tiny_llava_dir), device="cpu", dtype="float32")
    items = [{"image": _image(i), "prompt": "Describe this image.", "answer": a} for i, a in enumerate(ANSWERS[:3])]
    scored = score_items(model, proc, items, VIGOptions(content_free="none"))
    batch = sft_collator(processor)([sft_example(it["prompt"], it["answer"], it["image"]) for it in items])
    for row, s in zip(batch["labels"], scored):
        assert row[row != IGNORE].tolist() == s["token_ids"]


@pytest.fixture
def scored_dir(tmp_path, tiny_llava_dir):
    from csr.models import load_policy
    from csr.vig.logprobs import VIGOptions
    from csr.vig.score import run_vig_score

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, a in enumerate(ANSWERS):
        _image(i).save(data / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "prompt": "Describe this image in detail.", "answer": a})
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, proc = load_policy(str(tiny_llava_dir), device="cpu", dtype="float32")
    out = tmp_path / "scores"
    run_vig_score(str(tiny_llava_dir), data / "sft.jsonl", out, VIGOptions(content_free="blank", batch_size=6),
                  model=model, processor=proc)
    return out


FAST = {"per_device_train_batch_size": 2, "num_train_epochs": 1, "activation_checkpointing": False,
        "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
        "seed": 0, "shuffle_dataset": False}


@pytest.mark.parametrize("use_lora", [True, False])
def test_selective_sft_trains_on_the_selection(tiny_llava_dir, scored_dir, tmp_path, use_lora):
    from csr.vig.score import read_scores
    from csr.vig.train import build_args, run_selective_sft

    out = tmp_path / ("lora" if use_lora else "full")
    args = build_args(out, {**FAST, "use_lora": use_lora, "keep_percent": 50.0}, cuda_available=False)
    summary = run_selective_sft(str(tiny_llava_dir), scored_dir, out, args)
    sel, tr = summary["selection"], summary["training"]
    recs = read_scores(scored_dir)
    vigs = sorted((r["vig"] for r in recs), reverse=True)
    assert sel["samples_kept"] == 3 and sel["tau"] == pytest.approx(vigs[2])
    kept_ids = {r["id"] for r in recs if r["vig"] >= sel["tau"]}
    selection = [json.loads(line) for line in (out / "selection.jsonl").read_text().splitlines()]
    assert {s["id"] for s in selection if s["kept"]} == kept_ids
    want = sum(v >= sel["tau"] for r in recs if r["id"] in kept_ids for v in r["vig_tokens"])
    assert sel["tokens_supervised"] == want
    assert sel["share_tokens_supervised"] == pytest.approx(want / sum(r["n_tokens"] for r in recs))
    # one epoch over the kept samples: the collator supervised exactly the planned tokens
    assert tr["examples_seen"] == 3 and tr["supervised_tokens_seen"] == want
    assert tr["answer_tokens_seen"] == sum(r["n_tokens"] for r in recs if r["id"] in kept_ids)
    assert tr["steps"] == 2 and tr["final_loss"] > 0   # a cross-entropy, logged
    assert (out / "model" / "config.json").is_file() and (out / "DONE.json").is_file()
    assert (out / "adapter").is_dir() == use_lora
    # the saved model loads and differs from the start
    from transformers import AutoModelForImageTextToText

    start = AutoModelForImageTextToText.from_pretrained(str(tiny_llava_dir))
    tuned = AutoModelForImageTextToText.from_pretrained(str(out / "model"))
    sd0, sd1 = start.state_dict(), tuned.state_dict()
    changed = [k for k in sd0 if not torch.equal(sd0[k], sd1[k])]
    assert changed and not any("vision_tower" in k for k in changed)


def test_plain_sft_supervises_every_answer_token(tiny_llava_dir, scored_dir, tmp_path):
    from csr.vig.score import read_scores
    from csr.vig.train import build_args, run_selective_sft

    out = tmp_path / "plain"
    args = build_args(out, {**FAST, "selection": "none", "max_steps": 2, "merge": False}, cuda_available=False)
    summary = run_selective_sft(str(tiny_llava_dir), scored_dir, out, args)
    total = sum(r["n_tokens"] for r in read_scores(scored_dir))
    assert summary["selection"]["tokens_supervised"] == total == summary["selection"]["tokens_total"]
    assert summary["training"]["share_supervised_seen"] == 1.0
    assert summary["training"]["examples_seen"] == 4          # 2 steps of 2
    assert not (out / "model").exists() and (out / "adapter").is_dir()
    # done: a second call returns the stored summary
    assert run_selective_sft(str(tiny_llava_dir), scored_dir, out, args)["training"] == summary["training"]


def test_train_config_and_overrides():
    from csr.vig.train import build_args, sft_overrides

    vals = sft_overrides(["learning_rate=1e-4", "use_lora=false", "train.max_steps=5", "tau_mode=percentile",
                            "save_strategy=no", "activation_checkpointing=false", "keep_percent=50"])
    assert vals == {"learning_rate": 1e-4, "use_lora": False, "max_steps": 5, "tau_mode": "percentile",
                    "save_strategy": "no", "activation_checkpointing": False, "keep_percent": 50.0}
    with pytest.raises(ValueError, match="Did you mean"):
        sft_overrides(["keep_percnt=50"])
    # csr.config's parser: an optional field of a postponed annotation ("int | None") takes null,
    # and a value of the wrong type is refused naming the key
    assert sft_overrides(["save_total_limit=null"]) == {"save_total_limit": None}
    with pytest.raises(ValueError, match="train.use_lora='maybe' must be true or false"):
        sft_overrides(["use_lora=maybe"])
    with pytest.raises(ValueError, match="only SelectiveSFTConfig"):
        sft_overrides(["score.reward_lambda=0.5"])
    with pytest.raises(ValueError):
        build_args("/tmp/x", {"remove_unused_columns": True}, cuda_available=False)
    with pytest.raises(ValueError):
        build_args("/tmp/x", {"keep_percent": 150.0}, cuda_available=False)
    with pytest.raises(ValueError, match="lora_r=0 must be >= 1"):   # the shared LoRA checks (csr.train_config)
        build_args("/tmp/x", {"lora_r": 0}, cuda_available=False)
    args = build_args("/tmp/x", {}, cuda_available=False)
    assert args.keep_percent == 70.0 and not args.bf16 and args.use_cpu and args.output_dir == "/tmp/x"
    assert args.lora_config().r == 128
    assert args.lora_config().modules_to_save is None and args.activation_checkpointing is True


def test_selective_sft_and_dpo_share_the_lora_fields():
    """One definition of the LoRA / dtype fields: the same LoRA from both configs' defaults, and
    vig train's projector default (LLaVA's) over the DPO stage's auto."""
    from csr.train_config import TrainConfig
    from csr.vig.train import build_args

    sft = build_args("/tmp/x", {"train_projector": True}, cuda_available=False)
    dpo = TrainConfig(output_dir="/tmp/x", use_cpu=True, bf16=False)
    a, b = sft.lora_config(), dpo.lora_config()
    assert (a.r, a.lora_alpha, a.lora_dropout, a.target_modules) == (b.r, b.lora_alpha, b.lora_dropout,
                                                                     b.target_modules) == (128, 256, 0.05, b.target_modules)
    assert a.modules_to_save == ["multi_modal_projector"] and b.modules_to_save is None
    assert sft.resolved_model_dtype() == dpo.resolved_model_dtype() == "float32"


def test_prepend_bos_matches_generation_tokenisation(processor):
    """With add_bos=auto the collated prompt equals what `processor(text=...)` (generation) encodes."""
    from csr.models import build_chat_prompt
    from csr.vig.collate import sft_collator, sft_example

    im = _image(0)
    batch = sft_collator(processor)([sft_example("Describe this image.", ANSWERS[0], im)])
    raw = sft_collator(processor, add_bos="never")([sft_example("Describe this image.", ANSWERS[0], im)])
    gen = processor(text=[build_chat_prompt(processor, "Describe this image.")], images=[im], return_tensors="pt")
    n = gen["input_ids"].shape[1]
    assert gen["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert torch.equal(batch["input_ids"][0, :n], gen["input_ids"][0])
    assert torch.equal(batch["input_ids"][0, 1:], raw["input_ids"][0])
    assert batch["labels"][0, 0] == IGNORE and torch.equal(batch["labels"][0, 1:], raw["labels"][0])
