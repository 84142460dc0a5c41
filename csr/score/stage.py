"""Stage score: self-reward and CLIP visual constraint for every node, calibrated among siblings.

Reads generate/trees.jsonl, writes score/scored.jsonl: the same trees with, on every node,
`clip` (100·cos), `self_reward`, `visual_reward` and `reward` (see `csr.score.reward`).
CLIP scores computed during the search (selection=calibrated) are reused, not recomputed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from csr.cli import stage_parser
from csr.config import CSRConfig, load_config
from csr.data import BadInput, load_image
from csr.faults import fault_point
from csr.io import (JsonlAppender, StageSummary, is_done, iter_jsonl, mark_done, read_done,
                    repair_jsonl_tail, require_done)
from csr.score.reward import score_siblings

log = logging.getLogger(__name__)

SCORED = "scored.jsonl"


def siblings_by_parent(nodes: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = defaultdict(list)
    for n in nodes[1:]:
        groups[n["parent"]].append(n)
    return groups


def calibrate_tree(tree: dict, score_cfg) -> dict:
    """Fill self/visual/reward on every node of a tree whose nodes hold `clip` (and `vig`) (in place)."""
    for siblings in siblings_by_parent(tree["nodes"]).values():
        if score_cfg.vig_weight > 0:
            from csr.vig.reward import score_siblings_with_vig

            score_siblings_with_vig(siblings, lam=score_cfg.reward_lambda, mode=score_cfg.calibration,
                                    self_kind=score_cfg.self_reward, clamp=score_cfg.clip_clamp,
                                    w_vig=score_cfg.vig_weight, vig_scale=score_cfg.vig_scale)
        else:
            score_siblings(siblings, lam=score_cfg.reward_lambda, mode=score_cfg.calibration,
                           self_kind=score_cfg.self_reward, clamp=score_cfg.clip_clamp)
    return tree


def add_clip_scores(trees: list[dict], images: list, clip) -> None:
    """`clip` (100·cos) on every node that lacks one, for many trees in one batched pass."""
    missing = [[n for n in t["nodes"][1:] if "clip" not in n] for t in trees]
    scores = clip.scores_many(images, [[n["text"] for n in nodes] for nodes in missing])
    for nodes, values in zip(missing, scores):
        for n, c in zip(nodes, values):
            n["clip"] = c


def _batches(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _vig_scorer(cfg: CSRConfig, policy_path: str | None):
    """(trees, images) -> None adding node VIG, when the reward or the pair filter needs it."""
    if not (cfg.score.vig_weight > 0 or cfg.pairs.vig_filter):
        return None
    from csr.models import load_policy
    from csr.vig.reward import add_node_vig
    from csr.vig.score import VIGOptions

    model, processor = load_policy(policy_path or cfg.model.model_name_or_path, dtype=cfg.model.torch_dtype,
                                   device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
                                   allow_pickle_weights=cfg.model.allow_pickle_weights)
    options = VIGOptions(content_free=cfg.score.vig_content_free, blur_radius=cfg.score.vig_blur_radius,
                         batch_size=cfg.score.vig_batch_size)
    return lambda trees, images: add_node_vig(trees, images, model, processor, options)


def run_score(cfg: CSRConfig, generate_dir: str | Path, out_dir: str | Path, policy_path: str | None = None) -> dict:
    out_dir = Path(out_dir)
    if is_done(out_dir):
        log.info("[score] %s is finished; skipping", out_dir)
        return read_done(out_dir)
    trees_path = require_done(generate_dir, "generate") / "trees.jsonl"
    scored_path = out_dir / SCORED
    repair_jsonl_tail(scored_path)
    finished = {t["id"] for t in iter_jsonl(scored_path)} if scored_path.exists() else set()

    from csr.score.clip import load_clip_from_config

    clip = load_clip_from_config(cfg.score, cfg.model.device)
    add_vig = _vig_scorer(cfg, policy_path)  # the round's policy: VIG is the model's own gain
    summary = StageSummary("score")
    todo = (t for t in iter_jsonl(trees_path) if t["id"] not in finished)
    with JsonlAppender(scored_path) as sink, tqdm(desc="score", unit="tree") as bar:
        for batch in _batches(todo, cfg.score.tree_batch_size):
            trees, images = [], []
            for tree in batch:
                try:
                    images.append(load_image(tree["image"]))
                    trees.append(tree)
                except BadInput as e:
                    summary.skip(e.reason, f"tree {tree['id']} ({e})")
            add_clip_scores(trees, images, clip)
            if add_vig is not None:
                add_vig(trees, images)
            for tree in trees:
                sink.write(calibrate_tree(tree, cfg.score))
                fault_point("score.tree_written")
                summary.processed += 1
            bar.update(len(batch))
    summary.extra["trees"] = len(finished) + summary.processed
    summary.log()
    mark_done(out_dir, summary.as_dict())
    return summary.as_dict()


def main(argv=None) -> int:
    p = stage_parser("Stage score: calibrated rewards for every tree node.")
    p.add_argument("--trees", required=True, help="Folder of a finished generate stage.")
    p.add_argument("--policy", help="The round's policy, for node VIG (default: model.model_name_or_path).")
    p.add_argument("--out", required=True, help="Output folder (scored.jsonl, DONE.json).")
    args = p.parse_args(argv)
    run_score(load_config(args.config, args.overrides), args.trees, args.out, args.policy)
    return 0
