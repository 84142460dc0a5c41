"""What real tokenizers do (the LLaMA and Qwen2 vocabularies in ../shared/real), and toy ones built
with the same properties: which tokens end a sentence."""

import shutil
from pathlib import Path

import pytest

from csr.models import ModelLoadError, sentence_end_ids, token_texts

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"


def _real(sub: str) -> Path:
    if not (REAL / sub).is_dir():
        pytest.skip(f"{REAL / sub} is absent (the real tokenizer files are not in a user's clone)")
    return REAL / sub


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    pytest.importorskip("sentencepiece", reason="converting LLaMA's tokenizer.model needs sentencepiece")
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("llama")
    shutil.copy(_real("llama") / "tokenizer.model", folder)
    return LlamaTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    from transformers import Qwen2Tokenizer

    folder = tmp_path_factory.mktemp("qwen")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(_real("qwen2.5-vl") / name, folder)
    return Qwen2Tokenizer.from_pretrained(str(folder))


def test_llama_sentence_ends(llama_tokenizer):
    tok = llama_tokenizer
    assert sentence_end_ids(tok, "official") == [29889]  # '.', the released code's period id
    ends = set(sentence_end_ids(tok, "punctuation"))
    texts = token_texts(tok, [29889, 869, 1213, 1846, 856])
    assert texts == {29889: ".", 869: " .", 1213: '."', 1846: ".)", 856: "..."}
    assert {29889, 869, 1213, 1846, 856} <= ends
    assert tok.eos_token_id not in ends  # EOS is the search's own decision (generate.stop_at_eos)
    # "A.\nB." : the newline is its own byte token after '.', so '.' ends the first sentence
    ids = tok.encode("A.\nB.", add_special_tokens=False)
    assert [i in ends for i in ids].count(True) == 2


def test_qwen_ends_sentences_at_a_paragraph_break(qwen_tokenizer):
    tok = qwen_tokenizer
    assert sentence_end_ids(tok, "official") == [13]
    ends = set(sentence_end_ids(tok, "punctuation"))
    assert token_texts(tok, [624, 382, 659]) == {624: ".\n", 382: ".\n\n", 659: " ."}
    assert {13, 624, 382, 659} <= ends
    ids = tok.encode("The dog sat.\nA cat.\n\nIt ran.", add_special_tokens=False)
    assert [token_texts(tok, [i])[i] for i in ids if i in ends] == [".\n", ".\n\n", "."]
    # the official rule never ends the first two sentences: '.\n' is not '.'
    assert [i for i in ids if i in sentence_end_ids(tok, "official")] == [13]


def _toy(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def test_no_token_can_end_a_sentence_is_refused():
    with pytest.raises(ModelLoadError, match="no token that ends a sentence"):
        sentence_end_ids(_toy(["a", "cat", "dog"]), "punctuation")
    assert sentence_end_ids(_toy(["a", "cat", "."]), "punctuation") == [4]
    with pytest.raises(ModelLoadError, match="not one of"):
        sentence_end_ids(_toy(["a", "."]), "commas")


def test_words_with_a_period_are_not_sentence_ends():
    tok = _toy(["a", "Mr.", "1.", "e.g.", ".", "...", '."'])
    texts = {i: t for i, t in token_texts(tok, range(len(tok))).items()}
    ends = {texts[i].strip() for i in sentence_end_ids(tok, "punctuation")}
    assert ends == {".", "...", '."'}


# ------------------------------------------------------------------------------------------
# Tiny random models around the real vocabularies and templates
# ------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def real_llava_dir(tmp_path_factory):
    """A tiny LLaVA with the real LLaMA tokenizer (+ <image> 32000, <pad> 32001), llava-hf's LLaVA-1.5
    template and a 336 px / patch 14 vision tower: 576 image tokens, as LLaVA-1.5-7B."""
    pytest.importorskip("sentencepiece", reason="converting LLaMA's tokenizer.model needs sentencepiece")
    from csr.tiny import build_tiny_llava, real_llama_tokenizer

    out = tmp_path_factory.mktemp("real_llava")
    template = (_real("llava-1.5") / "chat_template.jinja").read_text()
    build_tiny_llava(out, tokenizer=real_llama_tokenizer(_real("llama") / "tokenizer.model"),
                     chat_template=template, image_size=336, patch_size=14)
    return out


@pytest.fixture(scope="module")
def real_qwen_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL with the real Qwen2 vocabulary and Qwen2.5-VL's template."""
    from csr.tiny import build_tiny_qwen2_5_vl, real_qwen2_tokenizer

    out = tmp_path_factory.mktemp("real_qwen")
    folder = _real("qwen2.5-vl")
    build_tiny_qwen2_5_vl(out, tokenizer=real_qwen2_tokenizer(folder / "vocab.json", folder / "merges.txt"),
                          chat_template=(folder / "chat_template.jinja").read_text())
    return out


@pytest.fixture(scope="module")
def toy_sp_llava_dir(tmp_path_factory):
    """A tiny LLaVA whose tokenizer has LLaMA's properties (SentencePiece '▁' pieces, newline as the
    byte token <0x0A>, '.' apart) and llava-hf's template (no EOS after an answer): no real files needed."""
    pytest.importorskip("sentencepiece", reason="the SentencePiece toy tokenizer needs sentencepiece")
    from csr.tiny import LLAVA_HF_STYLE_CHAT_TEMPLATE, build_sentencepiece_tokenizer, build_tiny_llava

    out = tmp_path_factory.mktemp("toy_sp_llava")
    build_tiny_llava(out, tokenizer=build_sentencepiece_tokenizer(), chat_template=LLAVA_HF_STYLE_CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def toy_bpe_qwen_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL whose tokenizer merges a period with its newlines, as Qwen2's does."""
    from csr.tiny import build_bpe_paragraph_tokenizer, build_tiny_qwen2_5_vl

    out = tmp_path_factory.mktemp("toy_bpe_qwen")
    build_tiny_qwen2_5_vl(out, tokenizer=build_bpe_paragraph_tokenizer())
    return out


def test_toy_bpe_merges_a_period_with_its_newlines():
    """The fast-suite stand-in for Qwen2's vocabulary: '.\n' and '.\n\n' are one token each and end a sentence."""
    from csr.tiny import build_bpe_paragraph_tokenizer

    tok = build_bpe_paragraph_tokenizer()
    ids = tok.encode("The dog sat.\nA cat.\n\nIt ran.", add_special_tokens=False)
    ends = set(sentence_end_ids(tok, "punctuation"))
    assert [token_texts(tok, [i])[i] for i in ids if i in ends] == [".\n", ".\n\n", "."]
    assert [token_texts(tok, [i])[i] for i in ids if i in sentence_end_ids(tok, "official")] == ["."]


@pytest.mark.parametrize("which", ["toy_sp_llava_dir", "real_llava_dir"])
def test_llama_style_nodes_round_trip_and_continue_from_their_tokens(which, request, monkeypatch):
    test_real_llama_nodes_round_trip_and_continue_from_their_tokens(request.getfixturevalue(which), monkeypatch)


def test_real_llama_nodes_round_trip_and_continue_from_their_tokens(real_llava_dir, monkeypatch):
    from PIL import Image

    from csr.generate.beam import Candidate
    from csr.generate.expander import CachedLlavaExpander, LlavaExpander
    from csr.generate.tree import TreeSettings, TreeSearch
    from csr.tree_format import join_sentences, prefix_text
    from csr.models import build_chat_prompt, load_policy

    model, processor = load_policy(str(real_llava_dir), device="cpu")
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [len(tok) - 2, len(tok) - 1]  # 32000, 32001 for LLaMA
    # "A.\nB." as the model writes it after 'ASSISTANT:': '▁A' '.' | '<0x0A>' 'B' '.' (split at the period)
    ids = tok.encode("A.\nB.", add_special_tokens=False)
    cut = ids.index(sentence_end_ids(tok, "official")[0]) + 1
    first, second = ids[:cut], ids[cut:]
    assert tok.convert_ids_to_tokens(first) == ["▁A", "."] and tok.convert_ids_to_tokens(second)[0] == "<0x0A>"
    kw = dict(num_candidates=1, diversity_penalty=0.0, max_new_tokens=4, stop_ids=sentence_end_ids(tok))
    expander = LlavaExpander(model, processor, **kw)
    texts = [expander.decode(Candidate(token_ids=first)), expander.decode(Candidate(token_ids=second))]
    assert texts == [" A.", "\nB."]  # exact: the leading space and the newline are the model's
    prompt = build_chat_prompt(processor, "Describe.")
    search = TreeSearch(lambda sib: [0.0] * len(sib), TreeSettings(sentence_beam_width=5, max_sentences=5), prompt)
    for ids, text in zip((first, second), texts):
        search.advance([[(text, Candidate(token_ids=ids, ended_by="stop"))]])
    (pending,) = search.pending()
    assert pending.token_ids == first + second and join_sentences(pending) == "A.\nB."
    assert prefix_text(prompt, pending) == prompt + " A.\nB."

    # the next level's input ids: the prompt's, then exactly the generated ids (both paths)
    seen = {}
    real_encode = expander._encode

    def spy(images, texts_, extra_tokens=None):
        seen["extra"] = extra_tokens
        return real_encode(images, texts_, extra_tokens)
    monkeypatch.setattr(expander, "_encode", spy)
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    expander.expand(image, prompt, [pending])
    assert seen["extra"] == [first + second]
    enc = processor(images=[image], text=[prompt], return_tensors="pt")
    appended = expander._append_tokens(dict(enc), [first + second])
    assert appended["input_ids"][0].tolist() == enc["input_ids"][0].tolist() + first + second
    assert appended["attention_mask"][0].tolist() == [1] * (enc["input_ids"].shape[1] + 5)

    fast = CachedLlavaExpander(model, processor, **kw)
    chunks = []
    monkeypatch.setattr(fast, "_expand_cached", lambda prompts, chunk: chunks.extend(chunk) or [[]] * len(chunk))
    fast.expand_many(fast.encode_prompts([image], [prompt]), [(0, pending)])
    assert chunks[0][2] == first + second


@pytest.mark.parametrize("which", ["toy_sp_llava_dir", "real_llava_dir"])
def test_llava_hf_template_dpo_completions_end_with_eos(which, request, tmp_path):
    _dpo_completions_end_with_eos(request.getfixturevalue(which), tmp_path)


def _dpo_completions_end_with_eos(real_llava_dir, tmp_path):
    from csr.config import load_config
    from csr.train.args import build_train_args
    from csr.train.data import pairs_dataset
    from csr.train.trainer import build_trainer

    image = tmp_path / "im.png"
    __import__("PIL.Image").Image.new("RGB", (40, 40), (10, 200, 10)).save(image)
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    answer = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]  # noqa: E731
    record = {"prompt": question, "chosen": answer("A green square."), "rejected": answer("A red dog sits"),
              "images": [str(image)], "chosen_ends_with_eos": True, "rejected_ends_with_eos": False}
    cfg = load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [f"model.model_name_or_path={real_llava_dir}"])
    args = build_train_args(cfg, tmp_path / "train")
    trainer = build_trainer(cfg, str(real_llava_dir), pairs_dataset([record, record]), args)
    row = trainer.train_dataset[0]
    assert row["chosen"].endswith("square.</s>") and row["rejected"] == " A red dog sits "  # the template's own
    batch = trainer.data_collator([trainer.train_dataset[0]])
    eos = trainer.processing_class.tokenizer.eos_token_id
    last = [ids[mask.bool()].tolist()[-1] for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
    assert last[0] == eos and last[1] != eos  # chosen (ended by EOS) closes with </s>; rejected (cut) does not


def test_token_budget_is_checked_before_training(real_llava_dir, tmp_path):
    from csr.config import ConfigError, load_config
    from csr.train.args import build_train_args
    from csr.train.data import pairs_dataset
    from csr.train.trainer import build_trainer

    image = tmp_path / "im.png"
    __import__("PIL.Image").Image.new("RGB", (80, 40)).save(image)
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    record = {"prompt": question, "chosen": answer, "rejected": answer, "images": [str(image)]}
    cfg = load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [f"model.model_name_or_path={real_llava_dir}",
                                                               "train.max_length=500"])
    # 576 image tokens (336/14 = 24, 24 * 24) alone exceed 500. The whole: the prompt as the processor
    # itself expands it (BOS, text, 576 image tokens), plus the completion " A cat. " = '▁A' '▁cat' '.' '▁'
    from csr.models import load_processor

    processor = load_processor(str(real_llava_dir))
    prompt = processor.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    from PIL import Image

    need = len(processor(images=[Image.open(image)], text=[prompt])["input_ids"][0]) + 4
    with pytest.raises(ConfigError, match=rf"train.max_length=500 cannot hold.*576 of them the image.*at least {need}\."):
        build_trainer(cfg, str(real_llava_dir), pairs_dataset([record]), build_train_args(cfg, tmp_path / "t"))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["real_llava_dir", "real_qwen_dir", "toy_sp_llava_dir", "toy_bpe_qwen_dir"])
def test_one_csr_round_on_a_real_tokenizer(which, request, tiny_clip_dir, images_dir, tmp_path):
    import json

    from csr.config import load_config
    from csr.io import read_jsonl
    from csr.loop import run_round

    model_dir = request.getfixturevalue(which)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": "p0", "image": "red.png", "input": "<image>\nDescribe this image in detail."},
                                   {"id": "p1", "image": "blue.png", "input": "What shapes do you see?\n<image>"}]))
    cfg = load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [
        f"model.model_name_or_path={model_dir}", f"score.clip_model={tiny_clip_dir}", f"data.prompts={prompts}",
        f"data.image_root={images_dir}", f"run.output_dir={tmp_path / 'run'}", "pairs.cleaning=none",
        "pairs.min_sentence_chars=0", "pairs.single_path=duplicate"])
    merged, stages = run_round(cfg, str(model_dir), tmp_path / "run" / "round_1")
    assert stages["generate"]["processed"] == 2 and stages["pairs"]["pairs"] >= 1 and stages["train"]["steps"] >= 1
    for tree in read_jsonl(tmp_path / "run" / "round_1" / "generate" / "trees.jsonl"):
        for n in tree["nodes"][1:]:  # every node's text is its tokens' exact text
            assert "token_ids" in n and len(n["token_ids"]) == n["n_tokens"]
    assert (Path(merged) / "config.json").is_file()


def test_sentence_ends_printout(qwen_tokenizer):
    from csr.models import describe_sentence_ends

    text = describe_sentence_ends(qwen_tokenizer)
    assert "official: 13 '.'" in text
    assert "'.\\n'    -> '.\\n'* ' Next'" in text  # a paragraph break ends a sentence only with punctuation


@pytest.mark.parametrize("which", ["toy_sp_llava_dir", "real_llava_dir"])
def test_sft_answers_end_with_eos_on_a_template_that_renders_none(which, request):
    """VIG-selective SFT (and VIG scoring, which collates alike): every answer turn, single or
    multi-turn, ends with EOS although llava-hf's template renders none."""
    from PIL import Image

    from csr.models import load_processor
    from csr.vig.collate import sft_collator, vig_example
    from csr.vig.maths import IGNORE_INDEX

    processor = load_processor(str(request.getfixturevalue(which)))
    eos = processor.tokenizer.eos_token_id
    image = Image.new("RGB", (40, 40), (10, 200, 10))
    collate = sft_collator(processor)
    single = collate([vig_example([{"prompt": "Describe.", "answer": "A green square."}], image)])
    supervised = single["input_ids"][0][single["labels"][0] != IGNORE_INDEX].tolist()
    assert supervised[-1] == eos and supervised.count(eos) == 1
    turns = [{"prompt": "Describe.", "answer": "A green square."}, {"prompt": "Colour?", "answer": "Green."}]
    multi = collate([vig_example(turns, image)])
    labels = multi["labels"][0].tolist()
    ends = [i for i, (a, b) in enumerate(zip(labels, labels[1:] + [IGNORE_INDEX])) if a != IGNORE_INDEX and b == IGNORE_INDEX]
    assert len(ends) == 2 and all(labels[i] == eos for i in ends)  # each answer closes with EOS
