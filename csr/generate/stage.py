"""Stage generate: one sentence-level search tree per (image, prompt), appended to trees.jsonl.

Resumable: trees are appended (and fsynced) one prompt at a time; a rerun repairs a torn last
line and continues at the first prompt without a tree. The stage is finished when DONE.json exists.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from csr.cli import stage_parser
from csr.config import CSRConfig, load_config
from csr.data import BadInput, load_image, load_prompts
from csr.generate.expander import LlavaExpander
from csr.generate.tree import TreeSettings, grow_tree
from csr.io import JsonlAppender, StageSummary, is_done, iter_jsonl, mark_done, read_done, repair_jsonl_tail
from csr.models import build_chat_prompt, load_policy, sentence_end_ids
from csr.score.reward import score_siblings, self_reward

log = logging.getLogger(__name__)

TREES = "trees.jsonl"


def make_sibling_scorer(cfg: CSRConfig, clip=None, image=None):
    """The search score of new siblings: self-score only (official) or the calibrated reward (paper)."""
    s = cfg.score
    if cfg.generate.selection == "self":
        return lambda siblings: [self_reward(n, s.self_reward) for n in siblings]
    image_feat = clip.image_features([image])[0]

    def calibrated(siblings):
        texts = [n["text"] for n in siblings]
        clip_scores = (100.0 * clip.text_features(texts) @ image_feat).tolist()
        for n, c in zip(siblings, clip_scores):
            n["clip"] = c  # reused by the score stage
        return score_siblings(siblings, lam=s.reward_lambda, mode=s.calibration,
                              self_kind=s.self_reward, clamp=s.clip_clamp)
    return calibrated


def run_generate(cfg: CSRConfig, policy_path: str, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    if is_done(out_dir):
        log.info("[generate] %s is finished; skipping", out_dir)
        return read_done(out_dir)
    summary = StageSummary("generate")
    records = load_prompts(cfg.data.prompts, cfg.data.image_root, cfg.data.image_pattern,
                           cfg.data.max_prompts, cfg.data.allow_absolute_image_paths, summary)
    trees_path = out_dir / TREES
    repair_jsonl_tail(trees_path)
    finished = {t["id"] for t in iter_jsonl(trees_path)} if trees_path.exists() else set()
    todo = [r for r in records if r.id not in finished]
    log.info("[generate] %d prompts, %d already done, %d to go", len(records), len(finished), len(todo))

    g = cfg.generate
    model, processor = load_policy(policy_path, dtype=cfg.model.torch_dtype, device=cfg.model.device,
                                   trust_remote_code=cfg.model.trust_remote_code,
                                   allow_pickle_weights=cfg.model.allow_pickle_weights)
    clip = None
    if g.selection == "calibrated":
        from csr.score.clip import load_clip_from_config

        clip = load_clip_from_config(cfg.score, cfg.model.device)
    expander = LlavaExpander(model, processor, num_candidates=g.num_candidates,
                             diversity_penalty=g.diversity_penalty, max_new_tokens=g.max_new_tokens,
                             stop_ids=sentence_end_ids(processor.tokenizer), node_batch_size=g.node_batch_size)
    settings = TreeSettings(g.sentence_beam_width, g.pruning, g.max_response_chars, g.max_sentences)

    n_candidates, start = 0, time.perf_counter()
    with JsonlAppender(trees_path) as sink:
        for rec in tqdm(todo, desc="generate", unit="prompt"):
            try:
                image = load_image(rec.image)
            except BadInput as e:
                summary.skip(e.reason, f"prompt {rec.id} ({e})")
                continue
            prompt_text = build_chat_prompt(processor, rec.prompt)
            nodes = grow_tree(lambda responses: expander.expand(image, prompt_text, responses),
                              make_sibling_scorer(cfg, clip, image), settings)
            n_candidates += len(nodes) - 1
            sink.write({"id": rec.id, "image": rec.image, "prompt": rec.prompt, "nodes": nodes})
            summary.processed += 1
    elapsed = time.perf_counter() - start
    summary.extra.update(trees=len(finished) + summary.processed, candidates_this_run=n_candidates,
                         seconds_this_run=round(elapsed, 2),
                         candidates_per_second=round(n_candidates / elapsed, 2) if elapsed > 0 else None)
    summary.log()
    mark_done(out_dir, summary.as_dict())
    return summary.as_dict()


def main(argv=None) -> int:
    p = stage_parser("Stage generate: sentence-level beam search trees.")
    p.add_argument("--policy", help="Model folder or hub id (default: model.model_name_or_path).")
    p.add_argument("--out", required=True, help="Output folder (trees.jsonl, DONE.json).")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_generate(cfg, args.policy or cfg.model.model_name_or_path, args.out)
    return 0
