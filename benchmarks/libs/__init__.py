"""One module per library; each has `build(spec, variant) -> Bench` for the models it supports.

`LIBRARIES` maps a row label to `(module, variant, models)`; a library whose
package is not installed is skipped by the runner and reported as such.
The decoding benchmark's two decoders (`effax_decoder`, `pure_jax_decoder`)
are not in it: `benchmarks/decode.py` runs them.
"""

from __future__ import annotations

import importlib
import importlib.util

ALL_MODELS = ("mlp", "mlp_stateful", "transformer")

# label -> (module in benchmarks.libs, variant, models it builds, packages it needs)
LIBRARIES: dict[str, tuple[str, str | None, tuple[str, ...], tuple[str, ...]]] = {
    "pure JAX": ("pure_jax", None, ALL_MODELS, ()),
    "effax": ("effax_raw", None, ALL_MODELS, ()),
    "effax.nn": ("effax_nn", None, ALL_MODELS, ("effax.nn",)),
    "Flax linen": ("flax_linen", None, ALL_MODELS, ("flax",)),
    "Flax linen nn.scan": ("flax_linen", "scan", ("mlp",), ("flax",)),
    "Flax NNX": ("flax_nnx", None, ALL_MODELS, ("flax",)),
    "Haiku": ("dm_haiku", None, ALL_MODELS, ("haiku",)),
    "Haiku layer_stack": ("dm_haiku", "layer_stack", ("mlp",), ("haiku",)),
    "Equinox": ("equinox_lib", None, ALL_MODELS, ("equinox",)),
    "Penzai v1": ("penzai_v1", None, ("mlp",), ("penzai",)),
}


def missing_packages(label: str) -> list[str]:
    """The packages `label` needs that cannot be imported here (an unfinished `effax.nn` counts)."""
    missing = []
    for name in LIBRARIES[label][3]:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    if label == "effax.nn" and not missing:
        try:
            nn = importlib.import_module("effax.nn")
        except Exception:  # noqa: BLE001 - being written in parallel; any failure means "not there yet"
            return ["effax.nn"]
        if not all(hasattr(nn, n) for n in ("Dense", "Dropout", "LayerNorm")):
            return ["effax.nn (no Dense/Dropout/LayerNorm yet)"]
    return missing


def build(label: str, spec):
    """The `Bench` of `spec` in library `label`."""
    module, variant, models, _ = LIBRARIES[label]
    if spec.model not in models:
        raise ValueError(f"{label} has no {spec.model} model")
    return importlib.import_module(f"benchmarks.libs.{module}").build(spec, variant)
