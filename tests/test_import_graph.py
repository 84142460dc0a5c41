"""No import circle among csr's modules: the import graph read from the source (`ast`), and every module
imported for real in a fresh interpreter."""

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

import csr

PACKAGE = Path(csr.__file__).parent

# Imports inside a function (run on use, not at import) that close a circle today, each for a reason
# of its own. Nothing else may: a new circle fails `test_no_import_circle_lazy_imports_included`.
KNOWN_LAZY_CIRCLE_EDGES = {
    ("csr.config", "csr.loop"): "`csr config --check` runs the loop's checks before any work",
    ("csr.eval.presets", "csr.eval.run"): "the presets generate answers with `csr eval`'s generator",
    ("csr.data", "csr.models"): "strip_image_token asks the model's processor for its image token text",
    ("csr.content_free", "csr.models"): "the content-free prompts ask the processor for its image token text",
}


def module_names() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["csr", *path.relative_to(PACKAGE).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _inside(module: str, package: str) -> bool:
    return module.startswith(package + ".")


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """{module: the csr modules it imports}: at import time (with the packages that importing a
    submodule runs first), and with `lazy` also inside functions."""
    modules = module_names()

    def targets(node, importer: str, with_packages: bool) -> set[str]:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            return set()
        found = set()
        for target in names:
            if target.split(".")[0] != "csr":
                continue
            parts = target.split(".")
            # importing csr.a.b runs csr/__init__ and csr/a/__init__ first, unless the importer is inside
            # them (a package is set up before its modules run) or it is a function (imported long ago)
            heads = range(1, len(parts) + 1) if with_packages else [len(parts)]
            found.update(head for head in (".".join(parts[:i]) for i in heads)
                         if head in modules and (head == target or not _inside(importer, head)))
        return found

    graph = {}
    for name, path in modules.items():
        deps: set[str] = set()

        def visit(node, in_function: bool):
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if not inside:
                    deps.update(targets(child, name, with_packages=True))
                elif lazy:  # a package that imports its own modules on use is their facade, not a circle
                    deps.update(d for d in targets(child, name, with_packages=False) if not _inside(d, name))
                visit(child, inside)

        visit(ast.parse(path.read_text(), str(path)), False)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a, b, ..., a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = walk(nxt)
                if circle:
                    return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            circle = walk(start)
            if circle:
                return circle
    return None


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_at_import_time():
    circle = find_circle(import_graph(lazy=False))
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_no_import_circle_lazy_imports_included():
    graph = import_graph(lazy=True)
    eager = import_graph(lazy=False)
    for (a, b), why in KNOWN_LAZY_CIRCLE_EDGES.items():
        assert b not in eager.get(a, ()), f"{a} imports {b} at import time, which the exception ({why}) does not cover"
        graph.get(a, set()).discard(b)
    circle = find_circle(graph)
    assert circle is None, ("import circle (imports inside functions included): " + " -> ".join(circle)
                            + "; move the shared code to a module both can import")


def test_the_reward_and_tree_format_import_no_stage():
    """The pure cores stay leaves: no stage, no model code under them."""
    graph = import_graph(lazy=True)
    assert graph["csr.tree_format"] == set()
    assert graph["csr.score.reward"] <= {"csr", "csr.config"}


@pytest.mark.slow  # a fresh interpreter that imports torch, transformers, trl, open_clip: ~15 s
def test_every_module_imports_in_a_fresh_interpreter_in_any_order():
    names = sorted(module_names())
    seed = random.randrange(10**6)
    random.Random(seed).shuffle(names)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=600)
    assert done.returncode == 0, f"importing in the order of seed {seed} failed:\n{done.stderr[-3000:]}"
