"""Stage pairs: one chosen/rejected pair per scored tree (CSR §3.3).

Among a tree's root-to-final paths, the path with the highest mean sentence reward is chosen and
the lowest is rejected. The official cleaning runs first: sentences shorter than
`min_sentence_chars` are left out of a path, and a node whose text has a run of repeated words or
characters, too many newlines, or an unexpected script (Korean, Japanese, Cyrillic, emoji) is
dropped with its whole subtree.

Writes `pairs.jsonl` in TRL's conversational preference format (prompt/chosen/rejected/images,
loadable with `datasets`), the same as `pairs.parquet` with the images embedded (ready for
`push_to_hub`), and `pairs_csr.json` in the official CSR/POVID format.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from csr.cli import stage_parser
from csr.config import CSRConfig, PairsConfig, load_config
from csr.generate.tree import final_paths, join_sentences
from csr.export import PAIRS_PARQUET, export_pairs_parquet
from csr.faults import fault_point
from csr.io import StageSummary, atomic_write_json, is_done, iter_jsonl, mark_done, read_done, require_done, write_jsonl
from csr.score.reward import path_score
from csr.vig.reward import path_vig, vig_pair_filter

log = logging.getLogger(__name__)

PAIRS = "pairs.jsonl"
PAIRS_CSR = "pairs_csr.json"

_UNEXPECTED_SCRIPT = re.compile(
    "[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"   # Hangul
    "\u3040-\u30ff\u31f0-\u31ff"                   # Hiragana, Katakana
    "\u0400-\u04ff"                                # Cyrillic
    "\U0001f300-\U0001faff\u2600-\u27bf]"          # emoji and symbols
)


def has_repeats(text: str, max_repeats: int) -> bool:
    """A run of more than `max_repeats` identical words, or of identical non-space characters."""
    if re.search(r"(\S)\1{%d,}" % max_repeats, text):
        return True
    words = text.lower().split()
    run = 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        if run > max_repeats:
            return True
    return False


def node_is_bad(text: str, cfg: PairsConfig) -> str | None:
    if text.count("\n") > cfg.max_newlines:
        return "too_many_newlines"
    if has_repeats(text, cfg.max_repeats):
        return "repeats"
    if cfg.drop_unexpected_scripts and _UNEXPECTED_SCRIPT.search(text):
        return "unexpected_script"
    return None


def candidate_paths(nodes: list[dict], cfg: PairsConfig) -> list[tuple[str, float, float | None]]:
    """(response, path score, path VIG or None) for every usable root-to-final path of a scored tree."""
    bad = {n["id"] for n in nodes[1:] if cfg.clean and node_is_bad(n["text"], cfg)}
    out = []
    for ids in final_paths(nodes):
        if bad.intersection(ids):
            continue
        kept = [nodes[i] for i in ids
                if nodes[i]["text"] and (not cfg.clean or len(nodes[i]["text"].strip()) >= cfg.min_sentence_chars)]
        if not kept:
            continue
        response = join_sentences([n["text"] for n in kept])
        if cfg.clean and response.count("\n") > cfg.max_newlines:
            continue
        out.append((response, path_score([n["reward"] for n in kept]), path_vig(kept)))
    return out


def pick_pair(tree: dict, cfg: PairsConfig) -> tuple[dict | None, str | None]:
    """(pair, None) or (None, reason the tree gives no pair)."""
    paths = candidate_paths(tree["nodes"], cfg)
    if len(paths) < 2:
        return None, "fewer_than_two_paths"
    ranked = sorted(paths, key=lambda p: p[1])  # ascending path score
    chosen = ranked[-1]
    # quantile 0 is the lowest-scored path; the top quantile stops one short of the chosen
    rejected = ranked[min(int(cfg.rejected_quantile * (len(ranked) - 1)), len(ranked) - 2)]
    if chosen[0] == rejected[0]:
        return None, "identical_responses"
    margin = chosen[1] - rejected[1]
    if margin < cfg.min_margin:
        return None, "below_min_margin"
    pair = {"id": tree["id"], "image": tree["image"], "prompt": tree["prompt"], "chosen": chosen[0],
            "rejected": rejected[0], "chosen_score": chosen[1], "rejected_score": rejected[1],
            "margin": margin, "n_paths": len(paths), "chosen_vig": chosen[2], "rejected_vig": rejected[2]}
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
    }


def to_csr(pair: dict) -> dict:
    """The official CSR / POVID format."""
    human = {"from": "human", "value": f"<image>\n{pair['prompt']}"}
    return {"id": pair["id"], "image": pair["image"],
            "conversations": [human, {"from": "gpt", "value": pair["chosen"]}],
            "rejected_conversations": [human, {"from": "gpt", "value": pair["rejected"]}]}


def run_pairs(cfg: CSRConfig, score_dir: str | Path, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    if is_done(out_dir):
        log.info("[pairs] %s is finished; skipping", out_dir)
        return read_done(out_dir)
    scored = require_done(score_dir, "score") / "scored.jsonl"
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
    mark_done(out_dir, summary.as_dict())
    return summary.as_dict()


def main(argv=None) -> int:
    p = stage_parser("Stage pairs: chosen/rejected pairs from scored trees.")
    p.add_argument("--scored", required=True, help="Folder of a finished score stage.")
    p.add_argument("--out", required=True, help="Output folder (pairs.jsonl, pairs_csr.json, DONE.json).")
    args = p.parse_args(argv)
    run_pairs(load_config(args.config, args.overrides), args.scored, args.out)
    return 0
