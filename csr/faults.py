"""Fault injection for the kill-and-resume tests: a named point where a run can be SIGKILLed.

Set CSR_KILL_AT=<point>:<n> and the process kills itself (SIGKILL: no cleanup, no atexit) the n-th
time it passes <point>. Unset (always, outside tests), `fault_point` is a dictionary lookup.
Points: generate.tree_written, score.tree_written, pairs.before_write, train.checkpoint_saved,
merge.before_rename.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_passed: Counter = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get("CSR_KILL_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _passed[name] += 1
    if _passed[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def train_callback():
    """A transformers TrainerCallback that passes `train.checkpoint_saved` after each checkpoint."""
    from transformers import TrainerCallback

    class _KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            fault_point("train.checkpoint_saved")

    return _KillAfterSave()
