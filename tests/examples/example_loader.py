"""Load a script of `examples/` as a module, the one way every example test does it."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(name: str):
    """Import `examples/<name>.py`; it is registered in `sys.modules` because dataclasses (and so
    Flax and effax modules) look up the module of a class's annotations there."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
