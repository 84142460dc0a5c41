"""The fast generator (shared prompt cache, many trees per batch) against the official per-node
reference (every node re-encoded from scratch, one at a time): same trees, same scores, with each
row's own prompt copy ("copies") and with one prompt copy per tree read by all its rows ("cascade",
`csr.generate.cascade`), for every supported model class."""

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from csr.generate import cascade as cascade_module
from csr.generate.cascade import CascadeCache, RowLayout, SharedPart, prefix_suffix_attention
from csr.generate.expander import CachedLlavaExpander, LlavaExpander
from csr.generate.tree import TreeSettings, grow_tree, grow_trees
from csr.models import SUPPORTED_CLASSES, build_chat_prompt, load_policy, sentence_end_ids
from csr.tiny import TINY_BUILDERS

IMAGES = Path(__file__).parent.parent / "data" / "tiny" / "images"
QUESTIONS = ["Describe this image in detail.", "What shapes do you see?",
             "Tell me everything about this picture, please."]


def self_score(siblings):
    return [n["logprob_sum"] for n in siblings]


@pytest.fixture(scope="module")
def policy(tiny_llava_dir):
    return load_policy(str(tiny_llava_dir), device="cpu")


def assert_same_trees(expected, got, past: int | None = 3, n_tokens: bool = False):
    """Each tree with the reference's texts and structure, log-probs and beam scores within 1e-4 (and
    token counts with `n_tokens`); with `past`, each reference tree holds more than 1 + past nodes (the
    search went past its first level)."""
    for want, have in zip(expected, got):
        if past is not None:
            assert len(want) > 1 + past
        assert [n["text"] for n in have] == [n["text"] for n in want]
        assert [(n["parent"], n["final"], n["pruned"]) for n in have] == \
            [(n["parent"], n["final"], n["pruned"]) for n in want]
        for a, b in zip(have[1:], want[1:]):
            if n_tokens:
                assert a["n_tokens"] == b["n_tokens"]
            assert a["logprob_sum"] == pytest.approx(b["logprob_sum"], abs=1e-4)
            assert a["beam_score"] == pytest.approx(b["beam_score"], abs=1e-4)


@pytest.mark.parametrize("prefix_attention", ["copies", "cascade"])
@pytest.mark.parametrize("pruning", ["official", "best"])
def test_cached_batched_trees_equal_the_per_node_reference(policy, pruning, prefix_attention):
    model, processor = policy
    kw = dict(num_candidates=4, diversity_penalty=3.0, max_new_tokens=8,
              stop_ids=sentence_end_ids(processor.tokenizer))
    reference = LlavaExpander(model, processor, node_batch_size=1, **kw)
    fast = CachedLlavaExpander(model, processor, node_batch_size=5, prefix_attention=prefix_attention,
                               **kw)  # chunks cross tree borders
    images = [Image.open(IMAGES / f"{i}.png").convert("RGB") for i in range(3)]
    prompts = [build_chat_prompt(processor, q) for q in QUESTIONS]
    settings = TreeSettings(sentence_beam_width=4, pruning=pruning, max_response_chars=300, max_sentences=3)

    expected = [grow_tree(lambda r, i=i: reference.expand(images[i], prompts[i], r), self_score, settings)
                for i in range(3)]
    cache = fast.encode_prompts(images, prompts)
    got = grow_trees(lambda requests: fast.expand_many(cache, requests), [self_score] * 3, settings)

    assert_same_trees(expected, got, past=4, n_tokens=True)


def chunk_sizes(policy, monkeypatch, node_batch_size: int, fits=lambda n: True):
    """(expander, its one-image prompt cache, the node counts its chunks ran with): chunks of more
    nodes than `fits` allows raise an out-of-memory error."""
    model, processor = policy
    fast = CachedLlavaExpander(model, processor, num_candidates=2, diversity_penalty=1.0, max_new_tokens=4,
                               stop_ids=sentence_end_ids(processor.tokenizer), node_batch_size=node_batch_size)
    real, sizes = fast._expand_cached, []

    def run(prompts, chunk):
        sizes.append(len(chunk))
        if not fits(len(chunk)):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(prompts, chunk)

    monkeypatch.setattr(fast, "_expand_cached", run)
    image = Image.open(IMAGES / "0.png").convert("RGB")
    return fast, fast.encode_prompts([image], [build_chat_prompt(processor, QUESTIONS[0])]), sizes


def test_out_of_memory_halves_the_node_batch_and_retries(policy, monkeypatch, caplog):
    fast, cache, sizes = chunk_sizes(policy, monkeypatch, 4, fits=lambda n: n <= 1)
    out = fast.expand_many(cache, [(0, []), (0, ["A cat."]), (0, ["A dog."])])
    assert len(out) == 3 and all(len(c) == 2 for c in out)
    assert sizes == [3, 2, 1, 1, 1] and fast.node_batch_size == 1  # 3 fail, 2 fail, then one at a time
    assert "retrying with generate.node_batch_size=1" in caplog.text


def test_all_nodes_at_once_stays_all_at_once_after_a_smaller_level(policy, monkeypatch):
    """node_batch_size=0: a level with more nodes than the first (the root alone) is still one batch."""
    fast, cache, sizes = chunk_sizes(policy, monkeypatch, 0)
    fast.expand_many(cache, [(0, [])])
    fast.expand_many(cache, [(0, []), (0, ["A cat."]), (0, ["A dog."])])
    assert sizes == [1, 3] and fast.node_batch_size == 0


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


# ---------------------------------------------------------------------------------------------
# cascade: one prompt copy per tree
# ---------------------------------------------------------------------------------------------


def dense_attention(query, shared, suffix_k, suffix_v, suffix_mask, scaling):
    """Each row on its own: SDPA over [its groups' shared parts; its suffix], kv heads repeated for
    GQA; `shared`: (keys, values, mask, each row's group) per part, in order."""
    R, H, q, _ = query.shape
    rep, Ls = H // suffix_k.shape[1], suffix_k.shape[2]
    causal = torch.arange(Ls)[None, :] <= torch.arange(Ls - q, Ls)[:, None]
    out = []
    for r in range(R):
        ks = [keys[int(group[r])] for keys, _, _, group in shared] + [suffix_k[r]]
        vs = [values[int(group[r])] for _, values, _, group in shared] + [suffix_v[r]]
        masks = [mask[int(group[r])][None].expand(q, -1) for _, _, mask, group in shared] + [suffix_mask[r][None] & causal]
        k, v = torch.cat(ks, dim=1).repeat_interleave(rep, dim=0), torch.cat(vs, dim=1).repeat_interleave(rep, dim=0)
        out.append(torch.nn.functional.scaled_dot_product_attention(query[r], k, v, attn_mask=torch.cat(masks, dim=1),
                                                                    scale=scaling))
    return torch.stack(out).transpose(1, 2)  # [R, q, H, D]


@pytest.mark.parametrize("with_nodes", [False, True], ids=["prompt-and-rows", "prompt-nodes-and-rows"])
@pytest.mark.parametrize("padded_query", [True, False], ids=["a-query-sees-only-its-prompt", "every-query-sees-its-suffix"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-kernel", "matmul"])
@pytest.mark.parametrize("heads,kv_heads,q,max_scores", [(4, 4, 1, 2**26), (4, 2, 1, 2**26), (6, 2, 3, 2**26),
                                                        (4, 1, 5, 2**26), (6, 2, 3, 100)])
def test_prefix_suffix_attention_equals_sdpa_over_the_concatenation(heads, kv_heads, q, max_scores, fused,
                                                                    padded_query, with_nodes, monkeypatch):
    """Grouped-query heads, trees with different prompt padding, rows in any tree order, suffixes
    left-padded (a padded query sees its prompt only), a causal chunk of q new tokens, and the
    queries taken in slices when the scores would be large; with torch's fused CPU kernel where
    every query sees a key (the prompts; the suffixes of the cases without a fully padded row) and
    with the matmul form alone; with a node level between prompt and rows (nodes of different path
    lengths, one with no path at all)."""
    monkeypatch.setattr("csr.generate.cascade.MAX_SCORES", max_scores)
    fused_calls = []
    if fused:
        kernel = cascade_module._CPU_FUSED
        monkeypatch.setattr(cascade_module, "_CPU_FUSED", lambda *a, **k: fused_calls.append(1) or kernel(*a, **k))
    else:
        monkeypatch.setattr(cascade_module, "_CPU_FUSED", None)
    gen = torch.Generator().manual_seed(0)
    T, Lp, Ls, D = 3, 7, 6, 8
    trees = torch.tensor([2, 0, 0, 1, 2, 2, 0])
    R = trees.numel()

    def rand(*shape):
        return torch.randn(*shape, generator=gen)
    query, prefix_k, prefix_v = rand(R, heads, q, D), rand(T, kv_heads, Lp, D), rand(T, kv_heads, Lp, D)
    suffix_k, suffix_v = rand(R, kv_heads, Ls, D), rand(R, kv_heads, Ls, D)
    prefix_mask = torch.ones(T, Lp, dtype=torch.bool)
    prefix_mask[0, :3] = False  # left padding of a shorter prompt
    prefix_mask[2, :1] = False
    suffix_mask = torch.ones(R, Ls, dtype=torch.bool)
    pads = [0, 2, Ls - 1 if padded_query else Ls - q, 4, 0, 1, Ls - q + padded_query]
    for r, pad in enumerate(pads):
        suffix_mask[r, :pad] = False
    parts = [(prefix_k, prefix_v, prefix_mask, trees)]
    if with_nodes:  # 4 nodes of the rows' trees (rows 1, 2 and 6 of tree 0 split over nodes 1 and 3)
        nodes, Ln = torch.tensor([0, 1, 3, 2, 0, 0, 1]), 4
        node_mask = torch.ones(4, Ln, dtype=torch.bool)
        node_mask[1, :2] = False  # a shorter path, left-padded
        node_mask[3] = False      # a node with no path: its rows see nothing there
        parts.append((rand(4, kv_heads, Ln, D), rand(4, kv_heads, Ln, D), node_mask, nodes))
    shared = [SharedPart(k, v, mask, RowLayout.of(group, k.shape[0])) for k, v, mask, group in parts]
    got = prefix_suffix_attention(query, shared, suffix_k, suffix_v, suffix_mask, D ** -0.5)
    want = dense_attention(query, parts, suffix_k, suffix_v, suffix_mask, D ** -0.5)
    assert got.shape == (R, q, heads, D)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    if fused:  # the prompts always; the suffixes too where no query is all padding (a decode step)
        every_suffix_query_sees_a_key = max(pads) <= Ls - q
        assert len(fused_calls) >= 1 + every_suffix_query_sees_a_key


@pytest.fixture(scope="module", params=sorted(SUPPORTED_CLASSES))
def class_policy(request, tiny_llava_dir, tmp_path_factory):
    """(model, processor) of a tiny random model of each supported class."""
    if request.param == "llava":
        return load_policy(str(tiny_llava_dir), device="cpu")
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    TINY_BUILDERS[request.param](folder)
    return load_policy(str(folder), device="cpu")


@pytest.mark.parametrize("pruning", ["official", "best"])
def test_cascade_trees_equal_the_reference_for_every_class(class_policy, pruning):
    """Images of different sizes (LLaVA-NeXT and Qwen2.5-VL give them different numbers of image
    tokens) and questions of different lengths: the trees' prompts are padded differently."""
    model, processor = class_policy
    kw = dict(num_candidates=3, diversity_penalty=3.0, max_new_tokens=6, stop_ids=sentence_end_ids(processor.tokenizer))
    reference = LlavaExpander(model, processor, node_batch_size=1, **kw)
    cascade = CachedLlavaExpander(model, processor, node_batch_size=4, prefix_attention="cascade", **kw)
    assert cascade.prefix_attention == "cascade"
    images = [Image.open(IMAGES / "0.png").convert("RGB"), Image.new("RGB", (64, 30), (20, 20, 220)),
              Image.open(IMAGES / "2.png").convert("RGB").resize((40, 56))]
    prompts = [build_chat_prompt(processor, q) for q in QUESTIONS]
    settings = TreeSettings(sentence_beam_width=3, pruning=pruning, max_response_chars=200, max_sentences=3)

    expected = [grow_tree(lambda r, i=i: reference.expand(images[i], prompts[i], r), self_score, settings)
                for i in range(3)]
    cache = cascade.encode_prompts(images, prompts)
    assert len(set(cache.attention.sum(1).tolist())) > 1  # the prompts' lengths differ: padding matters
    got = grow_trees(lambda requests: cascade.expand_many(cache, requests), [self_score] * 3, settings)
    assert_same_trees(expected, got)


def test_cascade_cache_holds_one_prompt_copy_per_tree_and_one_path_copy_per_node(policy, monkeypatch):
    model, processor = policy
    ex = CachedLlavaExpander(model, processor, num_candidates=3, diversity_penalty=1.0, max_new_tokens=3,
                             stop_ids=sentence_end_ids(processor.tokenizer), prefix_attention="cascade")
    seen, real = [], ex._search

    def spy(first, cache, *args):
        out = real(first, cache, *args)
        seen.append(cache)  # after the search: its rows are the nodes' G groups
        return out
    monkeypatch.setattr(ex, "_search", spy)
    images = [Image.open(IMAGES / f"{i}.png").convert("RGB") for i in range(3)]
    prompts = ex.encode_prompts(images, [build_chat_prompt(processor, q) for q in QUESTIONS])

    ex.expand_many(prompts, [(0, []), (2, ["A cat."]), (1, []), (2, ["A dog."]), (0, ["A hat."])])
    cache = seen[-1]
    assert isinstance(cache, CascadeCache)
    for layer, prompt_layer in zip(cache.layers, prompts.cache.layers):
        assert layer.prefix_keys.shape[0] == layer.prefix_values.shape[0] == 3  # trees, not rows
        assert layer.keys.shape[0] == 5 * 3  # each row's own suffix: nodes x groups
        assert layer.prefix_keys.data_ptr() == prompt_layer.keys.data_ptr()  # every tree used: no copy at all
        # each node's sentences once, read by its 3 rows, whose suffixes hold only what they generated
        assert layer.node_keys.shape[:1] == (5,) and layer.node_keys.shape[2] == cache.node_mask.shape[1] > 0
        assert layer.keys.shape[2] <= 3 - 1

    ex.expand_many(prompts, [(1, []), (1, ["A cat."])])  # one tree: its prompt alone
    assert seen[-1].layers[0].prefix_keys.shape[0] == 1 and seen[-1].layers[0].keys.shape[0] == 2 * 3
    assert torch.equal(seen[-1].layers[0].prefix_keys[0], prompts.cache.layers[0].keys[1])


@pytest.mark.parametrize("feature", ["sliding_window", "model_type"])
def test_cascade_falls_back_to_copies_with_one_log_line(policy, monkeypatch, caplog, feature):
    model, processor = policy
    text_config = model.config.get_text_config()
    if feature == "sliding_window":
        monkeypatch.setattr(text_config, "use_sliding_window", True, raising=False)
    else:
        monkeypatch.setattr(text_config, "model_type", "gemma2")
    kw = dict(num_candidates=2, diversity_penalty=1.0, max_new_tokens=2, stop_ids=sentence_end_ids(processor.tokenizer))
    with caplog.at_level(logging.INFO, logger="csr.generate.expander"):
        ex = CachedLlavaExpander(model, processor, prefix_attention="cascade", **kw)
    assert ex.prefix_attention == "copies"
    lines = [r.getMessage() for r in caplog.records if r.name == "csr.generate.expander"]
    assert len(lines) == 1 and "prefix_attention=cascade" in lines[0] and "using copies" in lines[0]
    assert ("sliding-window" if feature == "sliding_window" else "gemma2") in lines[0]


def test_unknown_prefix_attention_is_refused_naming_the_choices(policy):
    model, processor = policy
    with pytest.raises(ValueError, match="prefix_attention 'shared'.*copies, cascade"):
        CachedLlavaExpander(model, processor, prefix_attention="shared", num_candidates=2, diversity_penalty=1.0,
                            max_new_tokens=2, stop_ids=[])


# ---------------------------------------------------------------------------------------------
# children start from their parent's decode keys/values; finished nodes leave the decode batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("continuation", ["tokens", "text"])
@pytest.mark.parametrize("pruning", ["official", "best"])
def test_reused_decode_kv_trees_equal_the_reference_for_every_class(class_policy, pruning, continuation):
    """Children start from the keys/values of their parent's decode. With continuation=text the
    reference re-tokenises the text, which for some nodes gives other ids than the decoded ones:
    those must be re-encoded (reusing them changes the trees), the others reused."""
    model, processor = class_policy
    kw = dict(num_candidates=3, diversity_penalty=3.0, max_new_tokens=6, stop_ids=sentence_end_ids(processor.tokenizer),
              continuation=continuation)
    reference = LlavaExpander(model, processor, node_batch_size=1, **kw)
    images = [Image.open(IMAGES / f"{i}.png").convert("RGB") for i in range(3)]
    prompts = [build_chat_prompt(processor, q) for q in QUESTIONS]
    settings = TreeSettings(sentence_beam_width=3, pruning=pruning, max_response_chars=300, max_sentences=3)
    expected = [grow_tree(lambda r, i=i: reference.expand(images[i], prompts[i], r), self_score, settings)
                for i in range(3)]
    expanded = sum(not n["final"] and not n["pruned"] for tree in expected for n in tree[1:])
    for prefix_attention in ("cascade", "copies"):
        fast = CachedLlavaExpander(model, processor, node_batch_size=4, prefix_attention=prefix_attention, **kw)
        cache = fast.encode_prompts(images, prompts)
        got = grow_trees(lambda requests: fast.expand_many(cache, requests), [self_score] * 3, settings)
        assert_same_trees(expected, got)
        # every expanded node past the root either started from its parent's decode or was re-encoded
        assert fast.counts["kv_reused"] + fast.counts["kv_reencoded"] == expanded
        if continuation == "tokens":  # the decoded ids are the ids fed: every node reuses them
            assert fast.counts["kv_reused"] == expanded and fast.counts["kv_reencoded"] == 0
            assert fast.counts["node"] == expanded  # one token a node: its last
    if continuation == "text" and pruning == "best":  # both kinds of node occur with these models
        assert fast.counts["kv_reused"] > 0 and fast.counts["kv_reencoded"] > 0


def test_without_decode_kv_reuse_the_paths_are_re_encoded_with_the_same_trees(policy):
    """generate.reuse_decode_kv=false: the old path (each node's tokens re-encoded on the prompt
    cache), the same trees, more token-rows through the model."""
    model, processor = policy
    kw = dict(num_candidates=3, diversity_penalty=3.0, max_new_tokens=6, stop_ids=sentence_end_ids(processor.tokenizer))
    images = [Image.open(IMAGES / f"{i}.png").convert("RGB") for i in range(2)]
    prompts = [build_chat_prompt(processor, q) for q in QUESTIONS[:2]]
    settings = TreeSettings(sentence_beam_width=3, pruning="best", max_response_chars=300, max_sentences=3)
    runs = {}
    for reuse in (True, False):
        ex = CachedLlavaExpander(model, processor, reuse_decode_kv=reuse, **kw)
        cache = ex.encode_prompts(images, prompts)
        trees = grow_trees(lambda requests: ex.expand_many(cache, requests), [self_score] * 2, settings)
        runs[reuse] = ([[n["text"] for n in t] for t in trees], ex.counts, cache)
    assert runs[True][0] == runs[False][0]
    reused, reencoded = runs[True][1], runs[False][1]
    assert reused["kv_reused"] > 0 and reencoded["kv_reused"] == 0
    assert reencoded["kv_reencoded"] == reused["kv_reused"]
    assert reused["node"] < reencoded["node"]
    assert not runs[False][2].decoded.entries  # nothing kept when nothing is reused


def early_stopping_policy(tmp_path):
    """A tiny LLaVA whose '.' logit is scaled up: sentences end after 1-8 tokens, at different steps."""
    TINY_BUILDERS["llava"](tmp_path)
    model, processor = load_policy(str(tmp_path), device="cpu")
    with torch.no_grad():
        model.get_output_embeddings().weight[sentence_end_ids(processor.tokenizer)] *= 5.0
    return model, processor


def decode_rows(trees: list[list[dict]], groups: int, per_node: bool) -> int:
    """Rows a level-by-level search steps: a node's G rows for its longest candidate's length - 1 steps
    (`per_node`), or every node of the level for the level's longest candidate (no row leaves)."""
    rows = 0
    levels: dict[int, list[list[int]]] = {}
    for tree in trees:
        for parent in tree:
            lengths = [n["n_tokens"] for n in tree if n["parent"] == parent["id"]]
            if lengths:
                levels.setdefault(parent["depth"], []).append(lengths)
    for nodes in levels.values():
        if per_node:
            rows += sum(groups * (max(lengths) - 1) for lengths in nodes)
        else:
            rows += len(nodes) * groups * (max(max(lengths) for lengths in nodes) - 1)
    return rows


@pytest.mark.parametrize("prefix_attention,debias", [("cascade", False), ("copies", False), ("cascade", True)])
def test_finished_nodes_leave_the_decode_batch_with_the_same_trees(tmp_path, prefix_attention, debias):
    """Sentences end early and at different steps: a node whose groups have all ended is no longer
    stepped, so the batched search steps exactly the rows the one-node-at-a-time reference steps,
    fewer than stepping every node to the level's longest sentence, and grows the same trees."""
    from csr.debias.sampling import DebiasedCandidates

    model, processor = early_stopping_policy(tmp_path)
    G = 3
    kw = dict(num_candidates=G, diversity_penalty=3.0, max_new_tokens=8, stop_ids=sentence_end_ids(processor.tokenizer),
              debias=DebiasedCandidates(model, processor, alpha=1.0, beta=0.1) if debias else None)
    reference = LlavaExpander(model, processor, node_batch_size=1, **kw)
    fast = CachedLlavaExpander(model, processor, prefix_attention=prefix_attention, **kw)  # a level in one batch
    images = [Image.open(IMAGES / f"{i}.png").convert("RGB") for i in range(3)]
    prompts = [build_chat_prompt(processor, q) for q in QUESTIONS]
    settings = TreeSettings(sentence_beam_width=3, pruning="best", max_response_chars=300, max_sentences=3)
    expected = [grow_tree(lambda r, i=i: reference.expand(images[i], prompts[i], r), self_score, settings)
                for i in range(3)]
    cache = fast.encode_prompts(images, prompts)
    got = grow_trees(lambda requests: fast.expand_many(cache, requests), [self_score] * 3, settings)
    assert_same_trees(expected, got, past=None, n_tokens=True)
    if prefix_attention == "copies":  # the reference batching a tree's nodes drops rows of its own cache
        per_tree = LlavaExpander(model, processor, node_batch_size=0, **kw)
        batched = [grow_tree(lambda r, i=i: per_tree.expand(images[i], prompts[i], r), self_score, settings)
                   for i in range(3)]
        assert [[n["text"] for n in t] for t in batched] == [[n["text"] for n in t] for t in expected]
        assert per_tree.counts["decode"] == reference.counts["decode"]
    lengths = {n["n_tokens"] for tree in got for n in tree[1:]}
    assert min(lengths) < 4 and max(lengths) > 4  # sentences end early, at different steps
    assert fast.counts["decode"] == reference.counts["decode"] == decode_rows(got, G, per_node=True)
    assert fast.counts["decode"] < decode_rows(got, G, per_node=False)
    assert fast.counts["kv_reused"] > 0  # children of dropped nodes start from the rows kept at the drop
