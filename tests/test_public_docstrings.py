"""Every public class and function carries a docstring with a runnable example (STYLE.md, issue 14).

The public surface is what a user can reach by a documented name: every name
in `__all__` of `effax`, `effax.handlers`, `effax.nn`, `effax.lift`,
`effax.inspect`, `effax.checkpoint`, `effax.sharding` and `effax.testing`,
and of the kit's modules named in `effax.testing.__all__` (`laws`, `models`,
`strategies`); a module without `__all__` contributes its names not starting
with `_`. Each class or function defined in effax must have a docstring with
a `>>>` line; `--doctest-modules` then runs it (errors report module `effax`,
so their examples run as `effax/__init__.py::effax.SomeError`).

Left out, because they cannot sensibly carry an example: modules themselves,
constants and registries (`LAWS`, `SHRINK_SECONDS`, plain values), type
aliases (`fx.sharding.Rules`) and whatever effax re-exports from elsewhere
(`typing.Any`, `collections.abc` names). Exception classes are held to the
same rule, one example each, as the checkpoint errors already do: showing
the call that raises it is the quickest way to say what it means. The one
exception: the core's errors (`effax/core/_errors.py`) keep one-line
docstrings so the core stays under its 400-line budget; each is raised by a
real call, message checked, in `tests/core/test_errors.py` instead.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import types

import pytest

import effax
import effax.core._errors

MODULES = (
    "effax",
    "effax.handlers",
    "effax.nn",
    "effax.lift",
    "effax.inspect",
    "effax.checkpoint",
    "effax.sharding",
    "effax.testing",
    "effax.testing.laws",
    "effax.testing.models",
    "effax.testing.strategies",
)


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return list(names)


def _needs_example(obj: object) -> bool:
    """A class or function of effax's own; not a module, constant, type alias or re-export."""
    if isinstance(obj, types.ModuleType):
        return False
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return False  # constants, registries, `X | Y` and `Mapping[...]` aliases
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "effax"


def _surface() -> dict[str, object]:
    """`{qualified public name: object}`, one entry per distinct object (its first public name)."""
    seen: dict[int, str] = {}
    surface: dict[str, object] = {}
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # effax.testing needs hypothesis, a test dependency; the rest must import
            if module_name.startswith("effax.testing"):
                continue
            raise
        for name in _public_names(module):
            obj = getattr(module, name)
            if not _needs_example(obj) or id(obj) in seen:
                continue
            seen[id(obj)] = f"{module_name}.{name}"
            surface[f"{module_name}.{name}"] = obj
    return surface


def _defined_in(obj: object) -> str:
    """The file that defines `obj`, under `effax/`; errors report module `effax`, so look for `class Name(`."""
    root = pathlib.Path(effax.__file__).parent
    if inspect.isclass(obj) and obj.__module__ == "effax":
        pattern = re.compile(rf"^class {obj.__name__}\b", re.M)
        for file in sorted(root.rglob("*.py")):
            if pattern.search(file.read_text()):
                return str(file.relative_to(root.parent))
    try:
        return str(pathlib.Path(inspect.getsourcefile(obj)).relative_to(root.parent))
    except (TypeError, ValueError):
        return "?"


def test_the_surface_is_found():
    surface = _surface()
    for name in ("effax.param", "effax.handlers.InitParams", "effax.nn.Dense", "effax.checkpoint.save"):
        assert name in surface, f"{name} was not walked; the walk is broken"
    assert "effax.sharding.Rules" not in surface  # a type alias


def test_every_public_name_has_a_runnable_example():
    offenders = []
    core_errors = set(effax.core._errors.__all__)
    for name, obj in _surface().items():
        if inspect.isclass(obj) and obj.__name__ in core_errors:
            continue  # shown in tests/core/test_errors.py (see this module's docstring)
        doc = obj.__doc__  # its own, not a base class's
        if not doc or ">>>" not in doc:
            offenders.append(f"  {name}  ({_defined_in(obj)}){'' if doc else ', no docstring at all'}")
    if offenders:
        pytest.fail(
            f"{len(offenders)} public names have no runnable example (`>>>`) in their docstring; "
            "add a short one, tiny shapes and exact output, like `fx.param`'s:\n" + "\n".join(offenders),
            pytrace=False,
        )
