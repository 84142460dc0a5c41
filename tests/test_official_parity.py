"""The official code's choices (docs/method.md §1, issue 15) against the paper's, on hand-made trees.

Every expected value below is worked out by hand from the rules in the comments, not by running
the code under test.
"""

import pytest
import torch

from csr.cleaning import node_drop_reason, official_drop_reason
from csr.config import PairsConfig, ScoreConfig
from csr.generate.beam import Candidate, diverse_group_search
from csr.generate.tree import TreeSettings, grow_tree, prune
from csr.pairs import candidate_paths, pick_pair
from csr.score.reward import path_score
from csr.score.stage import calibrate_tree
from csr.tree_format import final_paths

OFFICIAL_SCORE = ScoreConfig(calibration="rank", self_reward="beam_score", clip_clamp=False, reward_lambda=0.9)
OFFICIAL_PAIRS = PairsConfig(cleaning="official", path_score="official", single_path="duplicate")


# ------------------------------------------------------------------------------------------
# 1. Pruning
# ------------------------------------------------------------------------------------------


def test_official_pruning_keeps_all_when_fewer_than_the_width():
    four = [(1, 0.4), (2, 0.1), (3, 0.3), (4, 0.2)]
    assert prune(four, 5, "official") == [1, 3, 4, 2]  # 4 < N=5: all, best first
    assert prune(four, 4, "official") == [1, 4, 2]     # 4 >= N=4: 4//2-1 = 1 best + 2 worst


def test_official_pruning_at_and_above_the_width():
    # sorted best first: 1 (.4), 3 (.3), 4 (.2), 2 (.1), 5 (.0); 1 best + 2 worst = 1, 2, 5
    five = [(1, 0.4), (2, 0.1), (3, 0.3), (4, 0.2), (5, 0.0)]
    assert prune(five, 5, "official") == [1, 2, 5]
    seven = five + [(6, 0.35), (7, -1.0)]  # best first: 1, 6, 3, 4, 2, 5, 7 -> 1 + (5, 7)
    assert prune(seven, 5, "official") == [1, 5, 7]
    assert prune(five, 5, "best") == [1, 3, 4, 2, 5]


def _expand_k(k, finals_at=2):
    """Each node gets k children 'a', 'b', ... with beam scores -1, -2, ...; depth `finals_at` holds EOS."""
    def expand(responses):
        out = []
        for sentences in responses:
            depth = len(sentences) + 1
            out.append([(f" {'abcdefg'[j]}{depth}.", Candidate(token_ids=[9], logprobs=[-1.0 - j],
                                                              penalised_sum=-1.0 - j, has_eos=depth == finals_at,
                                                              ended_by="stop"))
                        for j in range(k)])
        return out
    return expand


def test_tree_with_four_open_nodes_keeps_all_four_at_width_five():
    nodes = grow_tree(_expand_k(4), lambda sib: [n["beam_score"] for n in sib],
                      TreeSettings(sentence_beam_width=5, pruning="official"))
    level1 = [n for n in nodes if n["depth"] == 1]
    assert len(level1) == 4 and not any(n["pruned"] for n in level1)
    assert sum(1 for n in nodes if n["depth"] == 2) == 16  # every one of the 4 was expanded


# ------------------------------------------------------------------------------------------
# 2. When a sentence ends; 3. the length limit
# ------------------------------------------------------------------------------------------

PAD, EOS, DOT, A = range(4)


def _scripted(sequence):
    """Logits that make every group emit `sequence` in order (one group, no diversity at play)."""
    def logits(tok):
        out = torch.full((4,), -20.0)
        out[tok] = 0.0
        return out
    fed = []

    def step(tokens):
        fed.append(tokens.tolist())
        return torch.stack([logits(sequence[len(fed)]) for _ in tokens])
    return logits(sequence[0])[None], step


def test_eos_stops_a_sentence_only_when_asked():
    first, step = _scripted([A, EOS, A, DOT, A])
    stops = diverse_group_search(first, step, num_groups=1, diversity_penalty=0.0, max_new_tokens=5,
                                 stop_ids=[DOT], eos_ids=[EOS], pad_id=PAD)[0][0]
    assert stops.token_ids == [A, EOS] and stops.ended_by == "eos" and stops.has_eos
    first, step = _scripted([A, EOS, A, DOT, A])
    official = diverse_group_search(first, step, num_groups=1, diversity_penalty=0.0, max_new_tokens=5,
                                    stop_ids=[DOT, EOS], eos_ids=[EOS], pad_id=PAD, eos_stops=False)[0][0]
    # the period alone stops it (EOS is taken out of the stop set even when listed); EOS is recorded
    assert official.token_ids == [A, EOS, A, DOT] and official.ended_by == "stop" and official.has_eos


def test_a_candidate_holding_eos_makes_its_node_final():
    nodes = grow_tree(_expand_k(2, finals_at=1), lambda sib: [0.0] * len(sib), TreeSettings(sentence_beam_width=5))
    assert all(n["final"] and n["final_reason"] == "eos" for n in nodes[1:]) and len(nodes) == 3


def test_length_limit_counts_the_prompt_in_the_official_mode():
    prompt = "P" * 10  # depth 1: "PPPPPPPPPP a1." = 14 chars; depth 2: + " a2." = 18 chars
    settings = dict(sentence_beam_width=5, max_response_chars=15, max_sentences=5)
    official = grow_tree(_expand_k(1, finals_at=9), lambda sib: [0.0] * len(sib),
                         TreeSettings(length_limit="prompt_and_response", **settings), prompt)
    assert [n["final_reason"] for n in official[1:]] == [None, "max_response_chars"]
    # the response alone: "a1. a2. a3. a4." reaches 15 characters at depth 4
    response_only = grow_tree(_expand_k(1, finals_at=9), lambda sib: [0.0] * len(sib),
                              TreeSettings(length_limit="response", **settings), prompt)
    assert [n["final_reason"] for n in response_only[1:]] == [None, None, None, "max_response_chars"]


# ------------------------------------------------------------------------------------------
# 4. Which nodes get ranked; 5. path score; ties
# ------------------------------------------------------------------------------------------


def make_tree(spec):
    """spec: (parent, text, beam_score, clip, final) rows; node 0 is the root. Texts are exact: a
    sentence keeps the space the model wrote before it."""
    nodes = [{"id": 0, "parent": None, "depth": 0, "text": "", "final": False}]
    for parent, text, beam, clip, final in spec:
        nodes.append({"id": len(nodes), "parent": parent, "depth": nodes[parent]["depth"] + 1, "text": text,
                      "beam_score": beam, "logprob_sum": beam, "logprob_mean": beam, "clip": clip, "final": final})
    return {"id": "t", "image": "/x.png", "prompt": "Describe.", "nodes": nodes}


RANKED = make_tree([
    (0, "A red ball.", -1.0, 30.0, False),                 # 1
    (0, "Ok.", -0.5, 40.0, False),                         # 2: 3 characters -> dropped with 7
    (0, "A blue cube sits here.", -2.0, 20.0, False),      # 3
    (0, "Привет мир.", -0.1, 50.0, False),                 # 4: Cyrillic -> dropped
    (1, " It is big.", -1.0, 25.0, True),                   # 5
    (1, " It is small.", -3.0, 10.0, True),                 # 6
    (2, " This child goes with its parent.", -0.2, 60.0, True),  # 7
    (3, " It is round.", -0.5, 35.0, True),                 # 8
])


def test_ranks_are_computed_among_surviving_siblings():
    tree = calibrate_tree(make_tree_copy(RANKED), OFFICIAL_SCORE, OFFICIAL_PAIRS)
    nodes = tree["nodes"]
    assert {n["id"]: n["dropped"] for n in nodes[1:] if "dropped" in n} == {
        2: "short_sentence", 4: "unexpected_script", 7: "ancestor_dropped"}
    assert all(nodes[i]["reward"] is None for i in (2, 4, 7))
    # root's survivors 1, 3 (n = 2): beam -1 > -2 and CLIP 30 > 20, so node 1 ranks 1/2 on both and
    # node 3 ranks 2/2; mixed 0.1*rank + 0.9*clip_rank: 0.5 and 1.0 (stored negated: higher = better)
    assert nodes[1]["reward"] == pytest.approx(-0.5) and nodes[3]["reward"] == pytest.approx(-1.0)
    # node 1's children 5, 6: beam -1 > -3, CLIP 25 > 10 -> 0.5 and 1.0; node 3's only child 8: 1/1 -> 1.0
    assert [nodes[i]["reward"] for i in (5, 6, 8)] == pytest.approx([-0.5, -1.0, -1.0])


def make_tree_copy(tree):
    import copy
    return copy.deepcopy(tree)


def test_official_pair_from_ranks_and_the_n_plus_one_path_score():
    tree = calibrate_tree(make_tree_copy(RANKED), OFFICIAL_SCORE, OFFICIAL_PAIRS)
    # paths depth-first: [1,5] (0.5 + 0.5) / 3 = 1/3; [1,6] (0.5 + 1.0) / 3 = 1/2; [3,8] (1 + 1) / 3 = 2/3
    # official: lowest mixed rank chosen, highest rejected
    paths = candidate_paths(tree["nodes"], OFFICIAL_PAIRS)
    assert [p[0] for p in paths] == ["A red ball. It is big.", "A red ball. It is small.",
                                     "A blue cube sits here. It is round."]
    assert [p[1] for p in paths] == pytest.approx([-1 / 3, -1 / 2, -2 / 3])
    pair, reason = pick_pair(tree, OFFICIAL_PAIRS)
    assert reason is None
    assert pair["chosen"] == "A red ball. It is big." and pair["rejected"] == "A blue cube sits here. It is round."
    assert pair["margin"] == pytest.approx(1 / 3)


def _rewarded(spec):
    """spec: (parent, text, reward, final) rows."""
    nodes = [{"id": 0, "parent": None, "depth": 0, "text": "", "final": False}]
    for parent, text, reward, final in spec:
        nodes.append({"id": len(nodes), "parent": parent, "depth": nodes[parent]["depth"] + 1,
                      "text": text, "reward": reward, "final": final})
    return {"id": "p", "image": "/x.png", "prompt": "Describe.", "nodes": nodes}


def test_path_score_mean_against_sum_over_n_plus_one():
    assert path_score([-0.2, -1.0], "mean") == pytest.approx(-0.6)
    assert path_score([-0.2, -1.0], "official") == pytest.approx(-0.4)
    tree = _rewarded([(0, "Alpha one.", -0.7, True),      # [1]:   mean -0.7, official -0.7/2 = -0.35
                      (0, "Beta two.", -0.2, False),      # [2,3]: mean -0.6, official -1.2/3 = -0.4
                      (2, " Gamma three.", -1.0, True)])
    mean = pick_pair(tree, PairsConfig(path_score="mean"))[0]
    assert (mean["chosen"], mean["rejected"]) == ("Beta two. Gamma three.", "Alpha one.")
    official = pick_pair(tree, PairsConfig(path_score="official"))[0]
    assert (official["chosen"], official["rejected"]) == ("Alpha one.", "Beta two. Gamma three.")


def test_ties_go_first_for_chosen_and_last_for_rejected_in_depth_first_order():
    # node ids: 1 (open), 2 (final), 3 (final, child of 1); depth-first paths: [1,3] then [2]
    tree = _rewarded([(0, "First node here.", -1.0, False), (0, "Second final one.", -1.0, True),
                      (1, " Child of the first.", -1.0, True)])
    assert final_paths(tree["nodes"]) == [[1, 3], [2]]
    pair = pick_pair(tree, PairsConfig())[0]  # every path scores -1
    assert pair["chosen"] == "First node here. Child of the first." and pair["rejected"] == "Second final one."


# ------------------------------------------------------------------------------------------
# 6. Cleaning: official exactly, strict beside it
# ------------------------------------------------------------------------------------------

STRICT = PairsConfig(cleaning="strict", min_sentence_chars=0)
OFFICIAL = PairsConfig(cleaning="official", min_sentence_chars=0)


@pytest.mark.parametrize("text, official, strict", [
    ("the the the the the the cat.", "repeats", "repeats"),      # 6 words: both
    ("the the the the the cat.", None, "repeats"),               # 5 words: strict only (> 4)
    ("The the the the the the cat.", None, "repeats"),           # official is case-sensitive: 1 + 5
    ("aaaaaaaaaaa", "repeats", "repeats"),                       # 11 characters
    ("aaaaaaaaaa", None, "repeats"),                             # 10: strict only
    (". . . . . . . . . . .", "repeats", "repeats"),             # 11 dots, spaces between (strict: 11 '.' words)
    (". . . . . . . . . .", None, "repeats"),                    # 10: strict only
    ("a" + " " * 11 + "b", "repeats", None),                     # 11 spaces in a row: official only
    ("'" * 10, "repeats", "repeats"),                            # its 10-apostrophe literal
    ("x&nbsp;&nbsp;y", "nbsp", None),
    ("a\nb\nc\nd\ne\nf\ng", "too_many_newlines", "too_many_newlines"),  # 6 newlines
    ("a\nb\nc\nd\ne\nf", None, None),                            # 5
    ("안녕하세요 cat.", "unexpected_script", "unexpected_script"),  # Hangul syllables
    ("\u1100 cat.", None, "unexpected_script"),                  # Hangul jamo: outside the official ranges
    ("猫がいます。", "unexpected_script", "unexpected_script"),    # kana
    ("猫。", None, None),                                          # kanji alone: neither checks it
    ("Привет мир.", "unexpected_script", "unexpected_script"),
    ("A cat 😀.", None, "unexpected_script"),                    # official removes emoji before checking
])
def test_cleaning_modes(text, official, strict):
    assert official_drop_reason(text) == official
    assert node_drop_reason(text, OFFICIAL) == official
    assert node_drop_reason(text, STRICT) == strict


def test_short_rule_sees_the_official_visible_text():
    # official: "A 😀😀😀." is checked as "A ." (emoji removed): 3 characters -> short
    assert node_drop_reason("A 😀😀😀.", PairsConfig(cleaning="official")) == "short_sentence"
    assert node_drop_reason("A 😀😀😀.", PairsConfig(cleaning="none")) is None  # 6 characters
    assert node_drop_reason("Ok.", PairsConfig(cleaning="none")) == "short_sentence"
    assert node_drop_reason("Ok.", PairsConfig(cleaning="none", min_sentence_chars=0)) is None


# ------------------------------------------------------------------------------------------
# 7. Degenerate trees
# ------------------------------------------------------------------------------------------


def test_single_path_is_skipped_or_duplicated():
    tree = _rewarded([(0, "The only answer.", -1.0, True), (0, "Ok.", -0.5, True)])  # "Ok." is dropped
    assert pick_pair(tree, PairsConfig()) == (None, "fewer_than_two_paths")
    pair, reason = pick_pair(tree, PairsConfig(single_path="duplicate"))
    assert reason is None and pair["chosen"] == pair["rejected"] == "The only answer." and pair["margin"] == 0
    empty = _rewarded([(0, "Ok.", -0.5, True)])
    assert pick_pair(empty, PairsConfig(single_path="duplicate")) == (None, "no_final_path")


# ------------------------------------------------------------------------------------------
# 8. Prompt format, image shape, training settings; the shipped recipes
# ------------------------------------------------------------------------------------------

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def test_vicuna_v1_prompt_and_answer(tiny_llava_dir):
    from csr.models import build_chat_prompt, load_processor

    processor = load_processor(str(tiny_llava_dir), chat_template="vicuna_v1")
    # the data's trailing '\n<image>' moves in front, as LLaVA's get_prompts writes it
    assert build_chat_prompt(processor, "What is this?\n<image>") == \
        SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    assert processor.apply_chat_template(messages, tokenize=False) == SYSTEM + " USER: <image>\nQ? ASSISTANT: A cat.</s>"
    own = load_processor(str(tiny_llava_dir))  # the model's own template is untouched by default
    assert not build_chat_prompt(own, "What is this?").startswith(SYSTEM)


def test_vicuna_v1_is_refused_for_a_non_llava_class(tiny_llava_dir):
    from csr.models import ModelLoadError, load_processor, set_chat_template

    with pytest.raises(ModelLoadError, match="qwen2_5_vl"):
        set_chat_template(load_processor(str(tiny_llava_dir)), "vicuna_v1", "qwen2_5_vl")


def test_pad_to_square_with_the_truncated_mean_colour(tiny_llava_dir):
    from PIL import Image

    from csr.models import PadImages, load_processor, processor_mean_colour

    processor = load_processor(str(tiny_llava_dir))
    processor.image_processor.image_mean = [0.48145466, 0.4578275, 0.40821073]  # CLIP's
    assert processor_mean_colour(processor) == (122, 116, 104)  # int(x * 255), as LLaVA's code
    seen = []
    collate = PadImages(lambda examples: seen.extend(examples) or "batch", processor, "pad")
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    assert collate([{"images": [wide]}]) == "batch"
    padded = seen[0]["images"][0]
    assert padded.size == (40, 40)
    assert padded.getpixel((0, 0)) == (122, 116, 104) and padded.getpixel((20, 20)) == (255, 0, 0)
    assert padded.getpixel((20, 9)) == (122, 116, 104) and padded.getpixel((20, 10)) == (255, 0, 0)  # (40-20)//2


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

OFFICIAL_POINTS = {
    "generate.pruning": "official", "generate.selection": "self", "generate.max_new_tokens": 70,
    "generate.max_response_chars": 1024, "generate.length_limit": "prompt_and_response",
    "generate.stop_at_eos": False, "generate.sentence_end": "official", "generate.continuation": "text", "generate.num_candidates": 5, "generate.diversity_penalty": 3.0,
    "generate.sentence_beam_width": 5,
    "score.calibration": "rank", "score.self_reward": "beam_score", "score.clip_clamp": False,
    "score.reward_lambda": 0.9,
    "pairs.cleaning": "official", "pairs.min_sentence_chars": 4, "pairs.path_score": "official",
    "pairs.single_path": "duplicate",
    "model.chat_template": "vicuna_v1", "model.image_aspect": "pad",
    "train.lora_dropout": 0.0, "train.disable_dropout": True, "train.train_projector": True,
    "train.projector_learning_rate": 2.0e-5, "train.learning_rate": 1.0e-7, "train.lora_r": 128,
    "train.lora_alpha": 256, "train.beta": 0.1,
}
PAPER_POINTS = {
    "generate.pruning": "official", "generate.selection": "calibrated", "generate.max_new_tokens": 74,
    "generate.length_limit": "response", "generate.stop_at_eos": True,
    "score.calibration": "raw", "score.self_reward": "prob", "score.clip_clamp": True, "score.reward_lambda": 0.9,
    "pairs.path_score": "mean", "pairs.single_path": "skip", "pairs.min_sentence_chars": 4,
    "model.chat_template": "model", "model.image_aspect": "pad",
    "train.lora_dropout": 0.05, "train.train_projector": False, "train.learning_rate": 1.0e-7,
}


def _value(cfg, dotted):
    section, key = dotted.split(".")
    part = getattr(cfg, section)
    return part[key] if isinstance(part, dict) else getattr(part, key)


@pytest.mark.parametrize("size", ["7b", "13b"])
@pytest.mark.parametrize("recipe, points", [("csr_official", OFFICIAL_POINTS), ("csr_paper", PAPER_POINTS)])
def test_shipped_recipes_set_every_point(size, recipe, points):
    from csr.config import load_config

    cfg = load_config(ROOT / "recipes" / f"llava-1.5-{size}" / f"{recipe}.yaml")
    wrong = {k: (_value(cfg, k), v) for k, v in points.items() if _value(cfg, k) != v}
    assert not wrong, f"{recipe}: (recipe value, expected) {wrong}"


# ------------------------------------------------------------------------------------------
# 9. Rescore without a model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tiny_llava_dir, tiny_clip_dir, tmp_path_factory):
    """Trees from the tiny LLaVA (search by self-score, so no CLIP is stored at generate time)."""
    from csr.generate.stage import run_generate

    tmp = tmp_path_factory.mktemp("rescore")
    cfg = _tiny_cfg(tiny_llava_dir, tiny_clip_dir, tmp)
    run_generate(cfg, str(tiny_llava_dir), tmp / "gen")
    return tiny_llava_dir, tiny_clip_dir, tmp


def _tiny_cfg(llava, clip, tmp, *extra):
    from csr.config import load_config

    return load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [
        f"model.model_name_or_path={llava}", f"score.clip_model={clip}",
        f"data.prompts={ROOT / 'data' / 'tiny' / 'prompts.json'}", f"data.image_root={ROOT / 'data' / 'tiny' / 'images'}",
        f"run.output_dir={tmp / 'run'}", "generate.selection=self", "pairs.cleaning=none",
        "pairs.min_sentence_chars=0", "pairs.single_path=duplicate", *extra])


def _pair_view(path):
    from csr.io import read_jsonl

    return [(p["id"], p["chosen"], p["rejected"], round(p["chosen_score"], 9), round(p["rejected_score"], 9))
            for p in read_jsonl(path)]


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9])
def test_rescore_gives_the_pairs_of_scoring_from_scratch(generated, lam):
    from csr.pairs import run_pairs
    from csr.score.stage import run_rescore, run_score

    llava, clip, tmp = generated
    base = tmp / "score-0.9"
    if not base.exists():
        run_score(_tiny_cfg(llava, clip, tmp), tmp / "gen", base)
    cfg = _tiny_cfg(llava, clip, tmp, f"score.reward_lambda={lam}")
    scratch = tmp / f"scratch-{lam}"
    run_score(cfg, tmp / "gen", scratch / "score")
    run_pairs(cfg, scratch / "score", scratch / "pairs")
    run_rescore(cfg, base, tmp / f"rescored-{lam}")
    assert _pair_view(tmp / f"rescored-{lam}" / "pairs" / "pairs.jsonl") == _pair_view(scratch / "pairs" / "pairs.jsonl")


def test_rescore_with_the_official_settings_needs_no_model(generated, monkeypatch):
    from csr.score.stage import run_rescore

    llava, clip, tmp = generated
    base = tmp / "score-0.9"
    if not base.exists():
        from csr.score.stage import run_score
        run_score(_tiny_cfg(llava, clip, tmp), tmp / "gen", base)
    import csr.models
    import csr.score.clip
    monkeypatch.setattr(csr.models, "load_policy", lambda *a, **k: pytest.fail("rescore loaded a model"))
    monkeypatch.setattr(csr.score.clip, "load_clip_from_config", lambda *a, **k: pytest.fail("rescore loaded CLIP"))
    cfg = _tiny_cfg(llava, clip, tmp, "score.calibration=rank", "score.self_reward=beam_score",
                    "score.clip_clamp=false", "pairs.path_score=official")
    summary = run_rescore(cfg, base, tmp / "rescored-official")
    assert summary["pairs"] >= 1


def test_rescore_refuses_records_without_raw_scores(generated, tmp_path):
    import json

    from csr.cli import main as csr_main
    from csr.config import ConfigError
    from csr.io import mark_done, read_jsonl, write_jsonl
    from csr.score.stage import run_rescore

    llava, clip, tmp = generated
    trees = read_jsonl(tmp / "gen" / "trees.jsonl")  # generate output: no 'clip' on any node
    write_jsonl(tmp_path / "score" / "scored.jsonl", trees)
    mark_done(tmp_path / "score", {"stage": "score"})
    cfg = _tiny_cfg(llava, clip, tmp)
    with pytest.raises(ConfigError, match="no 'clip'.*rerun the score stage"):
        run_rescore(cfg, tmp_path / "score", tmp_path / "out")
    for t in trees:
        for n in t["nodes"][1:]:
            n.pop("beam_score")
            n["clip"] = 1.0
    write_jsonl(tmp_path / "score" / "scored.jsonl", trees)
    cfg = _tiny_cfg(llava, clip, tmp, "score.self_reward=beam_score")
    with pytest.raises(ConfigError, match="no 'beam_score'.*rerun the generate stage"):
        run_rescore(cfg, tmp_path / "score", tmp_path / "out")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"score": {"self_reward": "beam_score"}}))
    assert csr_main(["score", "--config", str(recipe), "--rescore", str(tmp_path / "score"),
                     "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "score").exists()  # nothing written before the check


def test_an_eos_alone_ends_its_path_without_being_a_sentence():
    # with generate.stop_at_eos (csr), a candidate that is EOS alone marks the end of the response:
    # it is not dropped as short, gets no reward, and its path is the response before it
    tree = make_tree([(0, "A red ball.", -1.0, 30.0, False),     # 1
                      (0, "A blue cube.", -2.0, 20.0, False),    # 2
                      (1, "", -0.1, 0.0, True),                  # 3: EOS alone
                      (2, " It is round.", -0.5, 35.0, True)])   # 4: final by length, say
    tree["nodes"][3].update(ended_by="eos", final_reason="eos")
    tree["nodes"][4].update(ended_by="stop", final_reason="max_response_chars")
    cfg = PairsConfig(path_score="official")
    calibrate_tree(tree, OFFICIAL_SCORE, cfg)
    nodes = tree["nodes"]
    assert "dropped" not in nodes[3] and nodes[3]["reward"] is None
    assert nodes[4]["reward"] == pytest.approx(-1.0)  # the only ranked child of 2: 1/1 on both
    paths = candidate_paths(nodes, cfg)
    # [1,(3)]: -0.5 / 2 = -0.25, ended by EOS; [2,4]: (-1 - 1) / 3 = -2/3, ended by the length limit
    assert [(p.response, p.ends_with_eos) for p in paths] == [("A red ball.", True), ("A blue cube. It is round.", False)]
    assert [p.score for p in paths] == pytest.approx([-0.25, -2 / 3])
    pair = pick_pair(tree, cfg)[0]
    assert pair["chosen_ends_with_eos"] is True and pair["rejected_ends_with_eos"] is False
