"""Stage pairs: one chosen/rejected pair per scored tree (CSR §3.3).

Among a tree's root-to-final paths that survive cleaning (`csr.cleaning`: a dropped sentence takes
its whole subtree with it), the best-scored path is chosen and the worst rejected. A path's score
(`pairs.path_score`) is the mean of its sentences' rewards (paper) or their sum divided by the
number of nodes including the root, n + 1 (official code). Ties go the official code's way: paths
are listed depth-first, the first of the best is chosen and the last of the worst rejected.

Writes `pairs.jsonl` in TRL's conversational preference format (prompt/chosen/rejected/images,
loadable with `datasets`), the same as `pairs.parquet` with the images embedded (ready for
`push_to_hub`), and `pairs_csr.json` in the official CSR/POVID format.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from csr.cleaning import dropped_nodes, response_too_many_newlines
from csr.cli import stage_parser
from csr.config import ConfigError, CSRConfig, PairsConfig, load_config
from csr.export import PAIRS_PARQUET, export_pairs_parquet
from csr.faults import fault_point
from csr.runstate import StageGuard, lock_if_main_process
from csr.io import StageSummary, atomic_write_json, iter_jsonl, mark_done, read_done, require_done, write_jsonl
from csr.score.reward import path_score
from csr.tree_format import final_paths, is_end_marker, join_sentences
from csr.vig.reward import path_vig, vig_pair_filter

log = logging.getLogger(__name__)

PAIRS = "pairs.jsonl"
PAIRS_CSR = "pairs_csr.json"


class CandidatePath(NamedTuple):
    response: str            # the sentences' exact texts concatenated, ends stripped
    score: float             # pairs.path_score of the sentences' rewards
    vig: float | None        # token-weighted VIG of the sentences, when the score stage computed it
    ends_with_eos: bool      # the model ended this response with EOS (not a length or depth limit)
    sentences: int           # how many sentences the response holds


def candidate_paths(nodes: list[dict], cfg: PairsConfig) -> list[CandidatePath]:
    """Every usable root-to-final path, depth-first."""
    dropped = dropped_nodes(nodes, cfg)
    keep = {n["id"] for n in nodes[1:]} - dropped.keys()
    out = []
    for ids in final_paths(nodes, keep):
        ended = nodes[ids[-1]]
        path = [nodes[i] for i in ids if not is_end_marker(nodes[i])]  # an EOS alone is no sentence
        if not path:
            continue
        if any(n.get("reward") is None for n in path):
            raise ConfigError(f"node {path[-1]['id']}'s path holds a node without a reward: the score stage "
                              f"dropped it under other cleaning settings than these. Recompute with "
                              f"`csr score --rescore SCORE_DIR --out DIR` under this recipe.")
        response = join_sentences([n["text"] for n in path])
        if response_too_many_newlines(response, cfg):
            continue
        out.append(CandidatePath(response, path_score([n["reward"] for n in path], cfg.path_score), path_vig(path),
                                 ended.get("final_reason") == "eos", len(path)))
    return out


def pick_pair(tree: dict, cfg: PairsConfig) -> tuple[dict | None, str | None]:
    """(pair, None) or (None, reason the tree gives no pair)."""
    paths = candidate_paths(tree["nodes"], cfg)
    if not paths:
        return None, "no_final_path"
    if len(paths) < 2 and cfg.single_path == "skip":
        return None, "fewer_than_two_paths"
    # best first; a stable sort keeps depth-first order among ties, so the chosen is the first of
    # the best and the rejected the last of the worst, as the official code's ascending rank sort
    ranked = sorted(paths, key=lambda p: -p[1])
    chosen = ranked[0]
    pool = ranked
    if cfg.rejected_pool == "same_length":  # the chosen heads its own length's pool
        same = [p for p in ranked if p.sentences == chosen.sentences]
        pool = same if len(same) >= 2 else ranked
    # quantile 0 is the lowest-scored path; the top quantile stops one short of the chosen
    # (a single path, with single_path=duplicate, is its own rejected, as the official code writes it)
    rejected = pool[len(pool) - 1 - min(int(cfg.rejected_quantile * (len(pool) - 1)), max(len(pool) - 2, 0))]
    if chosen.response == rejected.response and cfg.single_path == "skip":
        return None, "identical_responses"
    margin = chosen.score - rejected.score
    if margin < cfg.min_margin:
        return None, "below_min_margin"
    pair = {"id": tree["id"], "image": tree["image"], "prompt": tree["prompt"], "chosen": chosen.response,
            "rejected": rejected.response, "chosen_score": chosen.score, "rejected_score": rejected.score,
            "margin": margin, "n_paths": len(paths), "chosen_vig": chosen.vig, "rejected_vig": rejected.vig,
            "chosen_ends_with_eos": chosen.ends_with_eos, "rejected_ends_with_eos": rejected.ends_with_eos}
    if cfg.vig_filter:
        reason = vig_pair_filter(pair, cfg.vig_min_gap)
        if reason:
            return None, reason
    return pair, None


def to_trl(pair: dict) -> dict:
    """TRL's conversational preference format with one image."""
    return {
        "id": pair["id"],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": pair["prompt"]}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair["chosen"]}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair["rejected"]}]}],
        "images": [pair["image"]],
        "chosen_score": pair["chosen_score"], "rejected_score": pair["rejected_score"], "margin": pair["margin"],
        "chosen_vig": pair.get("chosen_vig"), "rejected_vig": pair.get("rejected_vig"),
        # whether the model ended each response with EOS: training closes those completions with EOS
        # whatever the chat template renders (llava-hf's renders none)
        "chosen_ends_with_eos": pair.get("chosen_ends_with_eos", False),
        "rejected_ends_with_eos": pair.get("rejected_ends_with_eos", False),
    }


def to_csr(pair: dict) -> dict:
    """The official CSR / POVID format."""
    human = {"from": "human", "value": f"<image>\n{pair['prompt']}"}
    return {"id": pair["id"], "image": pair["image"],
            "conversations": [human, {"from": "gpt", "value": pair["chosen"]}],
            "rejected_conversations": [human, {"from": "gpt", "value": pair["rejected"]}]}


def run_pairs(cfg: CSRConfig, score_dir: str | Path, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    guard = StageGuard(out_dir, "pairs", cfg, inputs=(score_dir,))
    done = guard.finished()
    if done is not None:
        return done
    scored = require_done(score_dir, "score") / "scored.jsonl"
    guard.start()
    summary = StageSummary("pairs")
    pairs = []
    for tree in iter_jsonl(scored):
        pair, reason = pick_pair(tree, cfg.pairs)
        if pair is None:
            summary.skip(reason, f"tree {tree['id']}")
            continue
        pairs.append(pair)
        summary.processed += 1
    if not pairs:
        raise RuntimeError(f"[pairs] no usable pair from {scored} (skipped: {dict(summary.skipped)}); "
                           f"check the generate settings (more candidates, deeper trees) or pairs.min_margin.")
    fault_point("pairs.before_write")
    trl_records = [to_trl(p) for p in pairs]
    write_jsonl(out_dir / PAIRS, trl_records)
    export_pairs_parquet(trl_records, out_dir / PAIRS_PARQUET)  # images embedded: ready for push_to_hub
    atomic_write_json(out_dir / PAIRS_CSR, [to_csr(p) for p in pairs])
    margins = [p["margin"] for p in pairs]
    summary.extra.update(pairs=len(pairs),
                         chosen_score_mean=sum(p["chosen_score"] for p in pairs) / len(pairs),
                         rejected_score_mean=sum(p["rejected_score"] for p in pairs) / len(pairs),
                         margin_mean=sum(margins) / len(margins))
    summary.log()
    mark_done(out_dir, guard.record(summary.as_dict()))
    return read_done(out_dir)


def main(argv=None) -> int:
    p = stage_parser("Stage pairs: chosen/rejected pairs from scored trees.")
    p.add_argument("--scored", required=True, help="Folder of a finished score stage.")
    p.add_argument("--out", required=True, help="Output folder (pairs.jsonl, pairs_csr.json, DONE.json).")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    with lock_if_main_process(args.out):
        run_pairs(cfg, args.scored, args.out)
    return 0
