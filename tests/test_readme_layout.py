"""The README's layout block names every module of the package, so the map a newcomer reads is the tree."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def layout_rows() -> dict[str, str]:
    """The text of each `csr/...` row of the README's layout block, continuation lines included."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```", text.index("## Layout")) + 3
    out, current = {}, None
    for line in text[start:text.index("```", start)].splitlines():
        if line.startswith("csr/"):
            current = line.split()[0]
            out[current] = line
        elif line.startswith(" ") and current:
            out[current] += " " + line.strip()
        else:
            current = None
    return out


def named(row: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", row) is not None


def test_the_readme_layout_names_every_module_and_every_file_of_each_package():
    rows = layout_rows()
    missing = []
    for path in sorted((ROOT / "csr").iterdir()):
        if path.suffix == ".py" and not path.name.startswith("__") and path.name != "cli.py":
            # a top-level module has its own row or is named in one ("csr/data.py, io.py", "launch.py: ...")
            if not any(key == f"csr/{path.name}" or named(row, path.name) for key, row in rows.items()):
                missing.append(f"csr/{path.name}")
        elif path.is_dir() and (path / "__init__.py").is_file():
            row = rows.get(f"csr/{path.name}/")
            if row is None:
                missing.append(f"csr/{path.name}/")
                continue
            modules = sorted(m.name for m in path.glob("*.py") if m.name != "__init__.py")
            if len(modules) > 1:  # a package's row names each of its modules
                missing += [f"csr/{path.name}/{m}" for m in modules if not named(row, m)]
    assert not missing, f"README.md's layout does not name: {missing}"
