"""Stage yesno (optional, `yesno.enabled`): yes/no pairs from the model itself, mixed into the round's pairs.

    round_N/yesno/questions.jsonl   every question asked: object, source, CLIP and what it scored (`evidence`),
                                    the reference, p, p_cf, q, rewards, kept or why not
    round_N/yesno/pairs.jsonl       the round's caption pairs + the sampled yes/no pairs (TRL format): what train reads
    round_N/yesno/DONE.json         counts, skip reasons, the yes-share of the chosen answers

The rules are in `csr.yesno.questions`. An image whose sentences name no object of the vocabulary
gets no question (skipped with a counted reason); the caption pairs train as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from csr.yesno.questions import (Question, answer_rewards, answer_vig, form_questions, mix_pairs, named_objects,
                                 naming_sentences, pick_answer, prior_partners, quantile, two_class_threshold)
from csr.config import CSRConfig
from csr.data import BadInput, load_tree_images
from csr.io import StageSummary, iter_jsonl, mark_done, read_done, read_jsonl, require_done, write_jsonl
from csr.runstate import StageGuard

log = logging.getLogger(__name__)

QUESTIONS = "questions.jsonl"
PAIRS = "pairs.jsonl"


def vocabulary(cfg: CSRConfig):
    """The synonym table the questions ask about (yesno.objects, else synonyms.json beside run.eval_chair)."""
    from csr.eval.chair import load_synonyms

    path = cfg.yesno.objects or (str(Path(cfg.run.eval_chair).parent / "synonyms.json") if cfg.run.eval_chair else "")
    if not path or not Path(path).is_file():
        raise BadInput("yesno_objects", f"yesno.objects: no object vocabulary at {path or '(unset)'}; set "
                                         f"yesno.objects=FILE (JSON {{object: [forms]}} or CHAIR's synonyms.txt).")
    return load_synonyms(path)


@torch.no_grad()
def no_image_continuations(model, processor, prompts: list[str], sentences: list[str], max_new_tokens: int,
                           batch_size: int) -> list[str]:
    """Greedy text-only continuation of each (user prompt, the model's own sentence): what the language
    prior says comes next when there is no image to look at."""
    from csr.content_free import content_free_prompt
    from csr.models import build_chat_prompt
    from csr.tree_format import prefix_text

    tok = processor.tokenizer
    texts = [prefix_text(content_free_prompt(build_chat_prompt(processor, p), processor, "none"), [s])
             for p, s in zip(prompts, sentences)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[str] = []
    old, tok.padding_side = tok.padding_side, "left"
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, return_tensors="pt").to(model.device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = old
    return out


def _sentences(tree: dict) -> list[str]:
    return [n["text"] for n in tree["nodes"] if n.get("parent") is not None and n.get("text")]


def stored_clip(tree: dict) -> dict[str, float]:
    """The score stage's CLIP (100·cos) of the tree's sentences, by their stripped text (as it scored them)."""
    return {n["text"].strip(): n["clip"] for n in tree["nodes"] if n.get("parent") is not None and "clip" in n}


def _first_naming(sentences: list[str], table) -> dict[str, str]:
    """Each object the sentences name -> the first sentence naming it."""
    first: dict[str, str] = {}
    for s in sentences:
        for _, canonical in table.mentions(s):
            first.setdefault(canonical, s)
    return first


def questions_for(trees: list[dict], table, cfg: CSRConfig, model, processor) -> list[list[Question]]:
    """Each tree's questions: its named objects, then its no-image partners of them, each with the model's
    own sentences naming the object (its candidates'; a prior partner's, its continuations')."""
    sentences = [_sentences(t) for t in trees]
    named = [named_objects(s, table) for s in sentences]
    firsts = [_first_naming(s, table) for s in sentences]
    asks = [(i, firsts[i][o]) for i in range(len(trees)) for o in named[i]]  # most named first, as before
    continuations = no_image_continuations(model, processor, [trees[i]["prompt"] for i, _ in asks],
                                           [s for _, s in asks], cfg.yesno.prior_tokens,
                                           cfg.yesno.batch_size) if cfg.yesno.max_prior and asks else []
    by_tree: dict[int, list[str]] = {}
    for (i, _), text in zip(asks, continuations):
        by_tree.setdefault(i, []).append(text)
    out = []
    for i in range(len(trees)):
        evidence = {**naming_sentences(by_tree.get(i, []), table), **naming_sentences(sentences[i], table)}
        out.append(form_questions(named[i], prior_partners(by_tree.get(i, []), named[i], table), cfg.yesno, evidence))
    return out


def score_questions(images: list, questions: list[list[Question]], table, cfg: CSRConfig, model, processor,
                    clip, statement_features, stored: list[dict[str, float]] | None = None) -> list[list[dict]]:
    """Every question's visual score (`clip`, what yesno.visual names, with the sentence it came from), its
    per-image reference where the statement's is per image (else None: `reward_rows` sets it for the round),
    and the calibrated yes-probability.

    `statement_features`: CLIP's features of every vocabulary object's statement, in `table.canonicals`
    order (the same for every image, so encoded once per stage). `stored`: per image, the CLIP scores the
    score stage already holds by sentence (`stored_clip`); only the other sentences are scored here."""
    from csr.debias.label_probs import calibrated_predictions, score_closed_set

    flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
    if not flat:
        return [[] for _ in questions]
    if cfg.yesno.visual == "statement":
        clip_all = (100.0 * clip.image_features(images) @ statement_features.T).tolist()  # 100·cos, [image, object]
        by_object = [dict(zip(table.canonicals, row)) for row in clip_all]
        references = [quantile(row, cfg.yesno.reference_quantile) for row in clip_all]
        visual = [(by_object[i][q.object], q.statement, references[i]) for i, q in flat]
    else:
        # every question's own sentences, scored once per image unless the score stage already did
        known = stored or [{} for _ in questions]
        texts = [list(dict.fromkeys(s for q in qs for s in q.clip_texts if s not in known[i]))
                 for i, qs in enumerate(questions)]
        new = clip.scores_many(images, texts)
        scored = [{**known[i], **dict(zip(texts[i], new[i]))} for i in range(len(questions))]
        visual = []
        for i, q in flat:
            best = max(q.clip_texts, key=lambda s: scored[i][s])
            visual.append((scored[i][best], best, None))
    kinds = cfg.yesno.content_free_inputs
    scored_kinds = kinds + (["none"] if cfg.yesno.vig_weight and "none" not in kinds else [])  # VIG: without image
    scores = score_closed_set(model, processor, [images[i] for i, _ in flat], [q.question for _, q in flat],
                              ["yes", "no"], cf_inputs=scored_kinds, batch_size=cfg.yesno.batch_size,
                              seed=cfg.run.seed)
    calibrated = calibrated_predictions(scores, cf_inputs=kinds)
    out: list[list[dict]] = [[] for _ in questions]
    for row, ((i, q), (value, evidence, reference)) in enumerate(zip(flat, visual)):
        out[i].append({"object": q.object, "source": q.source, "question": q.question, "clip": value,
                       "evidence": evidence, "reference": reference, "p_yes": float(scores.p[row][0]),
                       "p_cf_yes": float(calibrated["p_cf"][row][0]), "q_yes": float(calibrated["q"][row][0]),
                       **(dict(zip(("vig_yes", "vig_no"), answer_vig(scores.p_raw[row], scores.p_cf_raw["none"][row])))
                          if cfg.yesno.vig_weight else {})})
    return out


def reward_rows(rows: list[dict], cfg: CSRConfig) -> float | None:
    """Fill every row's reference (visual=sentences: the two-class split of the round's visual scores, returned)
    and its answer rewards, in place."""
    split = None
    if cfg.yesno.visual == "sentences" and rows:
        split = two_class_threshold([r["clip"] for r in rows])
        for r in rows:
            r["reference"] = split
    for r in rows:
        r.update(answer_rewards(r["clip"], r["reference"], r["q_yes"], cfg.yesno.reward_lambda,
                                (r.get("vig_yes", 0.0), r.get("vig_no", 0.0)), cfg.yesno.vig_weight))
    return split


def yesno_pair(tree: dict, question: Question, scored: dict, margin: float) -> tuple[dict | None, str | None]:
    """A TRL-format yes/no pair for one question of a tree, or (None, reason)."""
    from csr.pairs import to_trl

    picked, reason = pick_answer(question, scored, margin)
    if picked is None:
        return None, reason
    pair = {"id": f"{tree['id']}/yesno/{question.object}/{picked['chosen_answer']}", "image": tree["image"],
            "prompt": question.question,
            "chosen": picked["chosen"], "rejected": picked["rejected"], "chosen_score": picked["chosen_score"],
            "rejected_score": picked["rejected_score"], "margin": picked["margin"]}
    # exactly the caption pairs' keys (one datasets column set); the answer is in the id and questions.jsonl
    return to_trl(pair), None


def run_yesno(cfg: CSRConfig, policy_path: str, score_dir: str | Path, pairs_dir: str | Path,
               out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    guard = StageGuard(out_dir, "yesno", cfg, inputs=(score_dir, pairs_dir, policy_path))
    done = guard.finished()
    if done is not None:
        return done
    scored_path = require_done(score_dir, "score") / "scored.jsonl"
    caption_pairs = read_jsonl(require_done(pairs_dir, "pairs") / PAIRS)
    table = vocabulary(cfg)
    guard.start()

    from csr.models import load_policy
    from csr.score.clip import load_clip_from_config

    model, processor = load_policy(policy_path, dtype=cfg.model.torch_dtype, device=cfg.model.device,
                                   trust_remote_code=cfg.model.trust_remote_code,
                                   chat_template=cfg.model.chat_template)
    clip = load_clip_from_config(cfg.score, cfg.model.device)
    statement_features = clip.text_features([cfg.yesno.statement_template.format(object=o) for o in table.canonicals]) \
        if cfg.yesno.visual == "statement" else None
    summary = StageSummary("yesno")
    asked = []                                         # (tree, question, scored row) of the whole round
    trees = list(iter_jsonl(scored_path))
    step = max(1, cfg.yesno.batch_size // (cfg.yesno.max_named + cfg.yesno.max_prior))  # >= 1 (validated)
    for start in tqdm(range(0, len(trees), step), desc="yesno", unit="batch"):
        batch, images = load_tree_images(trees[start:start + step], summary)
        questions = questions_for(batch, table, cfg, model, processor)
        scored = score_questions(images, questions, table, cfg, model, processor, clip, statement_features,
                                 [stored_clip(t) for t in batch])
        for tree, qs, rows in zip(batch, questions, scored):
            if not qs:
                summary.skip("no_object_named", f"tree {tree['id']}")
                continue
            summary.processed += 1
            asked += [(tree, q, row) for q, row in zip(qs, rows)]
    split = reward_rows([row for _, _, row in asked], cfg)  # the round's scores set the split: all of them first
    records, yesno_pairs = [], []
    for tree, q, row in asked:
        pair, reason = yesno_pair(tree, q, row, cfg.yesno.margin)
        records.append({"id": tree["id"], **row, "kept": pair is not None, "why_not": reason})
        if pair is None:
            summary.skipped[f"question_{reason}"] += 1
        else:
            yesno_pairs.append(pair)
    mixed, sample = mix_pairs(caption_pairs, yesno_pairs, cfg.yesno.ratio, cfg.run.seed,
                              [p["id"].endswith("/yes") for p in yesno_pairs] if cfg.yesno.balance else None)
    write_jsonl(out_dir / QUESTIONS, records)
    write_jsonl(out_dir / PAIRS, mixed)
    yes = sum(p["id"].endswith("/yes") for p in sample)  # ids end with the chosen answer
    summary.extra.update(questions=len(records), yesno_pairs_available=len(yesno_pairs), yesno_pairs=len(sample),
                         caption_pairs=len(caption_pairs), pairs=len(mixed),
                         chosen_yes_share=(yes / len(sample)) if sample else None, visual=cfg.yesno.visual,
                         visual_split=split,
                         questions_by_source={s: sum(r["source"] == s for r in records) for s in ("named", "prior")})
    summary.log()
    mark_done(out_dir, guard.record(summary.as_dict()))
    return read_done(out_dir)
