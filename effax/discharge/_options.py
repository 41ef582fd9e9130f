"""Reconciling `init`/`apply` arguments with a preset: one rule for both, in one place."""

from __future__ import annotations

from typing import Any

from effax.core import EffaxError, Handler
from effax.handlers import KeysFromRngs, Preset, normalize_mutable, static_training
from effax.handlers._presets import brief


def split_presets(handlers: Any) -> tuple[Preset | None, list[Any]]:
    """Take the (at most one) preset out of nested `handlers`; return it and the other handlers."""
    presets: list[Preset] = []
    rest: list[Any] = []

    def walk(h: Any) -> None:
        preset = h if isinstance(h, Preset) else getattr(h, "preset", None)
        if isinstance(preset, Preset):  # a preset, or one of its handlers (`[*preset, lora]`): the preset
            if not any(p is preset for p in presets):
                presets.append(preset)
        elif isinstance(h, (list, tuple)):
            for x in h:
                walk(x)
        else:
            rest.append(h)

    walk(handlers)
    if len(presets) > 1:
        raise EffaxError(
            f"handlers= holds {len(presets)} presets ({', '.join(map(repr, presets))}); a run has "
            "one mode: pass one preset."
        )
    return (presets[0] if presets else None), rest


def _conflict(preset: Preset, what: str, given: Any) -> EffaxError:
    shown = brief(given) if what == "rngs" else repr(given)
    hint = ""
    if what == "mutable" and not preset.training and given is not True:
        names = sorted(normalize_mutable(given))  # type: ignore[arg-type]
        hint = (
            " For inference state (a decode cache) in eval, name it in the preset: "
            f"`fx.handlers.eval(mutable={names!r})`."
        )
    return EffaxError(
        f"{what}={shown} conflicts with the preset {preset!r} in handlers=. A preset sets the "
        f"run's training flag, rngs and mutable collections: drop `{what}=`, or drop the preset "
        "and pass the options one by one." + hint
    )


def apply_options(
    preset: Preset | None, training: Any, rngs: Any, mutable: Any
) -> tuple[Any, Handler, Any]:
    """`(training, keys handler, mutable)` for `apply`, the preset's options in place of the arguments."""
    if preset is None:
        return training, KeysFromRngs(rngs), mutable
    if training is not None and static_training(training) != preset.training:
        raise _conflict(preset, "training", training)
    if rngs is not None and rngs is not preset.rngs:
        raise _conflict(preset, "rngs", rngs)
    if preset.mutable is None:
        return preset.training, preset.keys, mutable
    if normalize_mutable(mutable) and normalize_mutable(mutable) != preset.mutable:
        raise _conflict(preset, "mutable", mutable)
    return preset.training, preset.keys, preset.mutable


def init_options(preset: Preset | None, training: Any, rngs: Any) -> tuple[bool, Any]:
    """`(training, rngs)` for `init`: the preset's mode, and `init`'s own key.

    The one rule for both: an argument given explicitly wins over nothing,
    and conflicts with a preset that sets it otherwise. `init`'s key is not
    optional (init makes params), so it is always its own: a preset's rngs
    serve `apply`'s draws, and `t.init(key, x, handlers=fx.handlers.train(k2))`
    initializes from `key` in training mode. Init takes keys even with the
    eval preset (its no-draw rule is for `apply`), and creates every
    collection whatever `mutable` says.
    """
    if preset is None:
        return training, rngs
    if static_training(training) and not preset.training:  # False is init's default: the preset decides
        raise _conflict(preset, "training", training)
    return preset.training, preset.rngs if rngs is None else rngs
