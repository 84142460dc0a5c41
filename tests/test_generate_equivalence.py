"""The fast generator (shared prompt cache, many trees per batch) against the official per-node
reference (every node re-encoded from scratch, one at a time): same trees, same scores."""

from pathlib import Path

import pytest
from PIL import Image

from csr.generate.expander import CachedLlavaExpander, LlavaExpander
from csr.generate.tree import TreeSettings, grow_tree, grow_trees
from csr.models import build_chat_prompt, load_policy, sentence_end_ids

IMAGES = Path(__file__).parent.parent / "data" / "tiny" / "images"
QUESTIONS = ["Describe this image in detail.", "What shapes do you see?",
             "Tell me everything about this picture, please."]


def self_score(siblings):
    return [n["logprob_sum"] for n in siblings]


@pytest.fixture(scope="module")
def policy(tiny_llava_dir):
    return load_policy(str(tiny_llava_dir), device="cpu")


@pytest.mark.parametrize("pruning", ["official", "best"])
def test_cached_batched_trees_equal_the_per_node_reference(policy, pruning):
    model, processor = policy
    kw = dict(num_candidates=4, diversity_penalty=3.0, max_new_tokens=8,
              stop_ids=sentence_end_ids(processor.tokenizer))
    reference = LlavaExpander(model, processor, node_batch_size=1, **kw)
    fast = CachedLlavaExpander(model, processor, node_batch_size=5, **kw)  # chunks cross tree borders
    images = [Image.open(IMAGES / f"{i}.png").convert("RGB") for i in range(3)]
    prompts = [build_chat_prompt(processor, q) for q in QUESTIONS]
    settings = TreeSettings(sentence_beam_width=4, pruning=pruning, max_response_chars=300, max_sentences=3)

    expected = [grow_tree(lambda r, i=i: reference.expand(images[i], prompts[i], r), self_score, settings)
                for i in range(3)]
    cache = fast.encode_prompts(images, prompts)
    got = grow_trees(lambda requests: fast.expand_many(cache, requests), [self_score] * 3, settings)

    for want, have in zip(expected, got):
        assert len(want) > 1 + 4  # the search went past the first level
        assert [n["text"] for n in have] == [n["text"] for n in want]
        assert [(n["parent"], n["final"], n["pruned"]) for n in have] == \
            [(n["parent"], n["final"], n["pruned"]) for n in want]
        for a, b in zip(have[1:], want[1:]):
            assert a["n_tokens"] == b["n_tokens"]
            assert a["logprob_sum"] == pytest.approx(b["logprob_sum"], abs=1e-4)
            assert a["beam_score"] == pytest.approx(b["beam_score"], abs=1e-4)


def test_out_of_memory_halves_the_node_batch_and_retries(policy, monkeypatch, caplog):
    model, processor = policy
    fast = CachedLlavaExpander(model, processor, num_candidates=2, diversity_penalty=1.0, max_new_tokens=4,
                               stop_ids=sentence_end_ids(processor.tokenizer), node_batch_size=4)
    real, sizes = fast._expand_cached, []

    def tight_memory(prompts, chunk):
        sizes.append(len(chunk))
        if len(chunk) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(prompts, chunk)

    monkeypatch.setattr(fast, "_expand_cached", tight_memory)
    image = Image.open(IMAGES / "0.png").convert("RGB")
    cache = fast.encode_prompts([image], [build_chat_prompt(processor, QUESTIONS[0])])
    out = fast.expand_many(cache, [(0, []), (0, ["A cat."]), (0, ["A dog."])])
    assert len(out) == 3 and all(len(c) == 2 for c in out)
    assert sizes == [3, 2, 1, 1, 1] and fast.node_batch_size == 1  # 3 fail, 2 fail, then one at a time
    assert "retrying with generate.node_batch_size=1" in caplog.text


def test_debias_candidate_mode_in_both_expanders(policy):
    """generate.candidate_mode=debias: the fast and reference paths still agree, and α=β=0 is plain."""
    from csr.debias.sampling import DebiasedCandidates

    model, processor = policy
    kw = dict(num_candidates=3, diversity_penalty=3.0, max_new_tokens=6, stop_ids=sentence_end_ids(processor.tokenizer))
    images = [Image.open(IMAGES / f"{i}.png").convert("RGB") for i in range(2)]
    prompts = [build_chat_prompt(processor, q) for q in QUESTIONS[:2]]
    settings = TreeSettings(sentence_beam_width=3, pruning="best", max_response_chars=300, max_sentences=2)

    def trees(expander_cls, debias):
        ex = expander_cls(model, processor, debias=debias, **kw)
        if expander_cls is CachedLlavaExpander:
            cache = ex.encode_prompts(images, prompts)
            return grow_trees(lambda req: ex.expand_many(cache, req), [self_score] * 2, settings)
        return [grow_tree(lambda r, i=i: ex.expand(images[i], prompts[i], r), self_score, settings) for i in range(2)]

    def texts(ts):
        return [[n["text"] for n in t] for t in ts]
    debias = DebiasedCandidates(model, processor, alpha=1.0, beta=0.1)
    assert texts(trees(CachedLlavaExpander, debias)) == texts(trees(LlavaExpander, debias))
    neutral = DebiasedCandidates(model, processor, alpha=0.0, beta=0.0)
    assert texts(trees(CachedLlavaExpander, neutral)) == texts(trees(CachedLlavaExpander, None))
