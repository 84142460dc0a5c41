"""Evaluation: POPE and CHAIR metrics (pure, `csr.eval.pope`, `csr.eval.chair`; the reference CHAIR
script's rules for COCO in `csr.eval.coco_chair`), the standard protocols (`csr.eval.presets`) and
`csr eval` (`csr.eval.run`: generate answers and captions with a model folder, then score them, or
score answers another tool wrote)."""

from csr.eval.chair import SynonymTable, chair_metrics, load_synonyms  # noqa: F401
from csr.eval.coco_chair import CocoChair, score_caption_file  # noqa: F401
from csr.eval.pope import parse_yes_no, pope_metrics, score_pope, score_pope_files  # noqa: F401


def evaluate_model(*args, **kwargs):
    """See `csr.eval.run.evaluate_model` (imported on use: it needs torch and transformers)."""
    from csr.eval.run import evaluate_model as _evaluate

    return _evaluate(*args, **kwargs)
