"""The package's layering, read from the source with `ast`: lower modules never import higher ones.

Layers, low to high: the shared modules (`csr.config`, `csr.train_config`, `csr.io`, `csr.data`, ...),
the stage packages, then the entry points that compose stages (`csr.loop`, `csr.cli`, a package's
`cli.py`). A base config module that imports a stage would load it (and its heavy dependencies) for
every recipe check, and a change in the stage could break every other stage's config.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "csr"
STAGES = ("csr.generate", "csr.score", "csr.pairs", "csr.train", "csr.eval", "csr.debias", "csr.vig", "csr.world",
          "csr.bench")
ENTRY_POINTS = ("csr.loop", "csr.cli")


def csr_imports(source: str) -> set[str]:
    """Every `csr...` module a source imports, at any depth (imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "csr"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "csr":
            found.add(node.module)
    return found


def _under(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_csr_imports_sees_function_level_and_from_imports():
    src = "import os\nimport csr.io\nfrom csr.data import BadInput\ndef f():\n    from csr.train.stage import run_train\n"
    assert csr_imports(src) == {"csr.io", "csr.data", "csr.train.stage"}


def test_the_base_config_imports_no_stage_and_no_entry_point():
    imported = csr_imports((PACKAGE / "config.py").read_text())
    # Named tables of settings (no torch, no model code) that the recipe validates names against;
    # they live in their stage package beside the code that uses them.
    data_tables = {"csr.eval.presets", "csr.debias.recipes"}
    # `csr config --check` runs the round loop's pre-flight check (the command's entry point)
    cli_only = {"csr.loop"}
    upward = {m for m in imported - data_tables - cli_only if _under(m, STAGES + ENTRY_POINTS)}
    assert not upward, f"csr/config.py imports {sorted(upward)}: move what it needs below the stages"
    assert "csr.train_config" in imported  # the train section's keys come from below the stages


def test_the_train_config_is_below_every_package():
    assert csr_imports((PACKAGE / "train_config.py").read_text()) == set()


@pytest.mark.parametrize("path", sorted(p.name for p in (PACKAGE / "eval").glob("*.py") if p.name != "cli.py"))
def test_eval_library_modules_import_no_other_stage(path):
    upward = {m for m in csr_imports((PACKAGE / "eval" / path).read_text())
              if _under(m, tuple(s for s in STAGES if s != "csr.eval") + ENTRY_POINTS)}
    assert not upward, f"csr/eval/{path} imports {sorted(upward)}; compose stages in csr/eval/cli.py instead"


def test_vig_training_takes_the_shared_fine_tuning_fields_not_the_dpo_stage():
    imported = csr_imports((PACKAGE / "vig" / "train.py").read_text())
    assert "csr.train_config" in imported and not any(_under(m, ("csr.train",)) for m in imported)
