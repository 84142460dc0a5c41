"""The `csr` command: one subcommand per stage, each a thin `main(argv)` in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module:function, one-line help). Modules are imported only when used.
COMMANDS = {
    "run": ("csr.loop:main", "Run CSR rounds end to end from a recipe (resumable)."),
    "generate": ("csr.generate.stage:main", "Stage 1: sentence-level beam search trees."),
    "score": ("csr.score.stage:main", "Stage 2: self-reward + CLIP visual constraint, calibrated."),
    "pairs": ("csr.pairs:main", "Stage 3: chosen/rejected pairs from scored trees."),
    "train": ("csr.train.stage:main", "Stage 4: LoRA DPO with TRL's DPOTrainer."),
    "merge": ("csr.train.merge:main", "Stage 5: merge the LoRA into a model folder."),
    "view": ("csr.view:main", "Static HTML of a run's sentence trees and pairs, per prompt and round."),
    "push": ("csr.push:main", "Upload a round's model (and pairs) to the Hugging Face Hub, with cards."),
    "eval": ("csr.eval.cli:main", "POPE, CHAIR: a model folder, the standard protocols, or existing answers."),
    "debias": ("csr.debias.cli:main", "Debiasing: post-hoc calibration, debias sampling, decoding study."),
    "vig": ("csr.vig.cli:main", "Visual Information Gain: score, view, selective SFT, CSR reward term."),
    "world": ("csr.world.cli:main", "Build the grounded synthetic world and its base models."),
    "build-tiny": ("csr.tiny:main", "Build a tiny LLaVA and a tiny CLIP from config (tests, smoke runs)."),
    "plan": ("csr.plan:main", "What a recipe means before a launch: stages, tree size, LoRA, memory per device."),
    "config": ("csr.config:main", "Show the valid recipe keys with their defaults and help."),
    "sentence-ends": ("csr.models:sentence_ends_main", "Show which tokens end a sentence for a model's tokenizer."),
}


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The options every stage command shares: a recipe and section.key=value overrides."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="Recipe YAML (see recipes/).")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.beta=0.2.")
    return p


def _usage() -> str:
    lines = ["usage: csr [-v] <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help}" for name, (_, help) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     this list", "  --version      csr's version",
              "  -v, --verbose  third-party logs and warnings too (open_clip, transformers, datasets, ...)",
              "", "`csr <command> --help` for a command's options."]
    return "\n".join(lines)


def setup_logging(level: int = logging.INFO, verbose: bool = False) -> None:
    """csr's own log lines at `level`; other libraries' INFO lines, progress bars and FutureWarnings
    (open_clip logs to the root logger, per batch) only with `verbose`."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level if verbose else logging.WARNING)
    logging.getLogger("csr").setLevel(level)
    if verbose:
        return
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("transformers", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose, argv = True, argv[1:]
    if "--verbose" in argv:
        verbose, argv = True, [a for a in argv if a != "--verbose"]
    if argv and argv[0] == "--version":
        from csr import __version__

        print(f"csr {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"csr: unknown command '{name}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    setup_logging(verbose=verbose)
    from csr.config import ConfigError
    from csr.data import BadInput
    from csr.io import StageInputMissing
    from csr.models import ModelLoadError

    prog, sys.argv[0] = sys.argv[0], f"csr {name}"  # argparse names the subcommand in its usage lines
    try:
        return getattr(importlib.import_module(module), func)(rest) or 0
    except (ConfigError, BadInput, StageInputMissing, ModelLoadError, FileNotFoundError) as err:
        # a bad recipe, input or model path: one clear line, no traceback
        print(f"csr {name}: error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:  # a read-only output folder, say
        print(f"csr {name}: error: cannot write '{err.filename}': permission denied. Choose a folder you can "
              f"write to.", file=sys.stderr)
        if verbose:
            raise
        return 2
    except Exception as err:  # noqa: BLE001 - anything else: one line, the traceback with -v
        if verbose:
            raise
        print(f"csr {name}: error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
              f"(rerun with -v for the traceback)", file=sys.stderr)
        return 1
    finally:
        sys.argv[0] = prog


if __name__ == "__main__":
    sys.exit(main())
