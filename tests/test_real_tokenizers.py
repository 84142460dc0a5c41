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
