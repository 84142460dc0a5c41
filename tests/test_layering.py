"""The package's layering, read from the source (the import graph of `test_import_graph`, imports inside
functions included): lower modules never import higher ones.

Layers, low to high: the shared modules (`csr.config`, `csr.train_config`, `csr.io`, `csr.data`, ...),
the stage packages, then the entry points that compose stages (`csr.loop`, `csr.cli`, a package's
`cli.py`). A base config module that imports a stage would load it (and its heavy dependencies) for
every recipe check, and a change in the stage could break every other stage's config.
"""

import pytest
from test_import_graph import PACKAGE, import_graph  # one reader of the import graph

STAGES = ("csr.generate", "csr.score", "csr.pairs", "csr.train", "csr.eval", "csr.debias", "csr.vig", "csr.world",
          "csr.bench", "csr.yesno")
ENTRY_POINTS = ("csr.loop", "csr.cli")
GRAPH = import_graph(lazy=True)


def _under(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_base_config_imports_no_stage_and_no_entry_point():
    imported = GRAPH["csr.config"]
    # Named tables of settings (no torch, no model code) that the recipe validates names against;
    # they live in their stage package beside the code that uses them.
    data_tables = {"csr.eval.presets", "csr.debias.recipes"}
    # `csr config --check` runs the round loop's pre-flight check (the command's entry point)
    cli_only = {"csr.loop"}
    upward = {m for m in imported - data_tables - cli_only if _under(m, STAGES + ENTRY_POINTS)}
    assert not upward, f"csr/config.py imports {sorted(upward)}: move what it needs below the stages"
    assert "csr.train_config" in imported  # the train section's keys come from below the stages


def test_the_train_config_is_below_every_package():
    assert GRAPH["csr.train_config"] == set()


@pytest.mark.parametrize("path", sorted(p.name for p in (PACKAGE / "eval").glob("*.py") if p.name != "cli.py"))
def test_eval_library_modules_import_no_other_stage(path):
    module = "csr.eval" if path == "__init__.py" else f"csr.eval.{path[:-3]}"
    upward = {m for m in GRAPH[module] if _under(m, tuple(s for s in STAGES if s != "csr.eval") + ENTRY_POINTS)}
    assert not upward, f"csr/eval/{path} imports {sorted(upward)}; compose stages in csr/eval/cli.py instead"


def test_vig_training_takes_the_shared_fine_tuning_fields_not_the_dpo_stage():
    imported = GRAPH["csr.vig.train"]
    assert "csr.train_config" in imported and not any(_under(m, ("csr.train",)) for m in imported)
