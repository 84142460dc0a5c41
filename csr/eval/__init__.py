"""Evaluation: POPE and CHAIR metrics (pure, `csr.eval.pope`, `csr.eval.chair`) and `csr eval`
(`csr.eval.run`: generate answers and captions with a model folder, then score them)."""

from csr.eval.chair import SynonymTable, chair_metrics, load_synonyms  # noqa: F401
from csr.eval.pope import parse_yes_no, pope_metrics, score_pope  # noqa: F401


def evaluate_model(*args, **kwargs):
    """See `csr.eval.run.evaluate_model` (imported on use: it needs torch and transformers)."""
    from csr.eval.run import evaluate_model as _evaluate

    return _evaluate(*args, **kwargs)
