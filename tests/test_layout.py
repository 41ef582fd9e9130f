"""The import direction of the layout (docs/design.md, "Layout"): data flows one way; the core knows nothing above it.

Each package may import only the packages listed for it (and itself). Checked on the source, with `ast`, so a
lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1] / "effax"

ALLOWED = {
    "core": set(),
    "effects": {"core"},
    "handlers": {"core", "effects"},
    "discharge": {"core", "effects", "handlers"},
    "inspect": {"core", "effects", "handlers", "discharge"},
    "lift": {"core", "effects", "handlers", "inspect"},
    "nn": {"core", "effects", "lift"},
    "interop": {"core", "effects"},
    "checkpoint": {"core", "handlers", "inspect", "sharding"},  # a `like` whose shardings cannot split: ShardingError
    "sharding": {"core", "handlers", "inspect"},
}


def package_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def effax_imports(path: pathlib.Path) -> set[str]:
    """The effax packages a module imports (`effax.handlers._tree` -> `handlers`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "effax":
                found.add(parts[1] if len(parts) > 1 else "effax")
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py") if package_of(p) in ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_each_module_imports_only_the_layers_below_it(path):
    package = package_of(path)
    wrong = effax_imports(path) - ALLOWED[package] - {package}
    assert not wrong, (
        f"effax/{path.relative_to(ROOT)} ({package}) imports {sorted(wrong)}; {package} may import only "
        f"{sorted(ALLOWED[package]) or 'nothing else of effax'}"
    )


def test_the_core_stays_small():
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "core").glob("*.py"))
    assert lines < 400, f"effax/core is {lines} lines; the budget is 400: move what is not routing out of it"


def test_the_check_can_fail():
    assert effax_imports(ROOT / "lift" / "_body.py") >= {"core", "effects"}
    assert "nn" not in ALLOWED["handlers"] and "interop" not in ALLOWED["handlers"]
