"""Save and restore variables with Orbax, checked against the model before any array is read.

`save(path, variables, step=...)` writes an Orbax PyTree checkpoint (the
format Flax users write with `ocp.StandardCheckpointer` or a
`CheckpointManager`, so theirs load here too). It writes beside the target
and renames into place, so a save that fails midway leaves the previous
checkpoint as it was. `restore(path, like=...)` compares the checkpoint with
`like` (from `jax.eval_shape(t.init, ...)`) and reports every missing,
unexpected, mis-shaped and mis-typed entry at once in a
`CheckpointMismatchError`; it places each array on the sharding its `like`
leaf carries. Orbax is imported only when these functions run
(`pip install effax[checkpoint]`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from effax.core import EffaxError

__all__ = ["CheckpointMismatchError", "CheckpointNotFoundError", "restore", "save", "steps"]

_TMP = ".effax-tmp"  # the new checkpoint is written here, then renamed into place
_OLD = ".effax-old"  # the previous checkpoint while the rename happens


class CheckpointMismatchError(EffaxError, ValueError):
    """The checkpoint does not match `like`: every missing, unexpected, mis-shaped and mis-typed entry.

    The lists are also attributes (`missing`, `unexpected`, `mis_shaped`,
    `mis_typed`), entries written `collection:path`.
    """

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mis_shaped: list[str], mis_typed: list[str]):
        super().__init__(message)
        self.missing, self.unexpected = missing, unexpected
        self.mis_shaped, self.mis_typed = mis_shaped, mis_typed


class CheckpointNotFoundError(EffaxError, FileNotFoundError):
    """No checkpoint at the path (or at the step) asked for."""


CheckpointMismatchError.__module__ = CheckpointNotFoundError.__module__ = "effax"


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError:  # pragma: no cover - depends on the environment
        raise EffaxError(
            "`fx.checkpoint` needs Orbax: `pip install 'effax[checkpoint]'` (or `pip install orbax-checkpoint`)."
        ) from None
    return ocp


def _path(path: Any) -> Any:
    from etils import epath

    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _is_checkpoint(d: Any) -> bool:
    return any((d / name).exists() for name in ("_METADATA", "manifest.ocdbt", "checkpoint"))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        _orbax().multihost.sync_global_processes(name)


def _name(key_path: tuple) -> str:
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in key_path]
    return names[0] if len(names) == 1 else f"{names[0]}:{'/'.join(names[1:])}"


def steps(path: str | os.PathLike) -> list[int]:
    """The steps saved under `path` with `save(..., step=n)`, in increasing order.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> for n in (10, 2):
    ...     _ = fx.checkpoint.save(d, {"params": {"w": jnp.ones(2)}}, step=n)
    >>> fx.checkpoint.steps(d)
    [2, 10]
    """
    root = _path(path)
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def save(path: str | os.PathLike, variables: Mapping[str, Any], *, step: int | None = None) -> Any:
    """Write `variables` as an Orbax checkpoint at `path` (or `path/<step>`); returns the directory.

    The checkpoint is written beside the target and renamed into place, so a
    save that fails midway leaves the previous checkpoint there intact.
    Sharded arrays are saved shard by shard; on several hosts every process
    calls `save` (as with Orbax).

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> variables = {"params": {"w": jnp.ones(2)}}
    >>> _ = fx.checkpoint.save(d + "/ckpt", variables)
    >>> fx.checkpoint.restore(d + "/ckpt", like=variables)
    {'params': {'w': Array([1., 1.], dtype=float32)}}
    """
    ocp = _orbax()
    if not isinstance(variables, Mapping):
        raise EffaxError(
            f"`variables` must be a dict like {{'params': {{...}}}}, got {type(variables).__name__}. "
            "Pass what `t.init` returned (merged with the updates of later runs)."
        )
    root = _path(path)
    target = root / str(step) if step is not None else root
    tmp = target.parent / (target.name + _TMP)
    old = target.parent / (target.name + _OLD)
    primary = jax.process_index() == 0

    def clean() -> None:
        for leftover in target.parent.glob(target.name + _TMP + "*"):  # ours and Orbax's own temp dirs
            leftover.rmtree()

    if primary:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean()
    _sync("effax_checkpoint_save_start")
    try:
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(tmp, args=ocp.args.PyTreeSave(dict(variables)))
    except BaseException:
        if primary:
            clean()
        raise
    if primary:
        if old.exists():
            old.rmtree()
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        if old.exists():
            old.rmtree()
    _sync("effax_checkpoint_save_done")
    return target


def _resolve(path: Any, step: int | None) -> Any:
    """The directory holding the PyTree: `path`, its `step` (default: the latest), or the one item in it."""
    root = _path(path)
    if step is not None:
        d = root / str(step)
    elif _is_checkpoint(root) or (root.parent / (root.name + _OLD)).exists():
        d = root
    else:
        found = steps(root)
        d = root / str(found[-1]) if found else root
    if not d.exists() and (d.parent / (d.name + _OLD)).exists():
        d = d.parent / (d.name + _OLD)  # a save was interrupted while swapping: the previous one is here
    if not d.exists():
        found = steps(root)
        raise CheckpointNotFoundError(
            f"no checkpoint at `{d}`"
            + (f"; steps saved under `{root}`: {found}" if found else "")
            + ". Check the path (and `step=`), or write one with `fx.checkpoint.save`."
        )
    if not _is_checkpoint(d):
        items = sorted(c.name for c in d.iterdir() if c.is_dir() and _is_checkpoint(c))
        if len(items) != 1:
            raise CheckpointNotFoundError(
                f"`{d}` is not an Orbax PyTree checkpoint"
                + (f"; it holds the items {items}: pass the one to restore, e.g. `{d / items[0]}`." if items
                   else " and holds none. Check the path.")
            )
        d = d / items[0]  # a CheckpointManager step with one item (`default`, `state`, ...)
    return d


def _spec(x: Any) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def _compare(where: Any, like: dict, stored: dict, strict: bool) -> None:
    missing, unexpected, mis_shaped, mis_typed = [], [], [], []
    for name, want in like.items():
        have = stored.get(name)
        if have is None:
            near = difflib.get_close_matches(name, [n for n in stored if n not in like], n=1, cutoff=0.6)
            missing.append(f"{name} ({_spec(want)})" + (f"; the checkpoint has {near[0]!r}" if near else ""))
            continue
        if tuple(have.shape) != tuple(want.shape):
            mis_shaped.append(f"{name}: like {tuple(want.shape)}, checkpoint {tuple(have.shape)}")
        if jnp.dtype(have.dtype) != jnp.dtype(want.dtype):
            mis_typed.append(f"{name}: like {jnp.dtype(want.dtype).name}, checkpoint {jnp.dtype(have.dtype).name}")
    if strict:
        unexpected = [f"{name} ({_spec(have)})" for name, have in stored.items() if name not in like]
    problems = len(missing) + len(unexpected) + len(mis_shaped) + len(mis_typed)
    if not problems:
        return
    lines = [f"the checkpoint at `{where}` does not match `like` ({problems} problem{'s' * (problems > 1)}):"]
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", mis_shaped), ("mis-typed", mis_typed)):
        lines.extend(f"  {label}: {item}" for item in items)
    lines.append(
        "Restore into variables of the model and config that wrote it (`like=jax.eval_shape(t.init, "
        "key, x)`), convert the checkpoint, or pass `strict=False` to skip entries `like` does not "
        "name (an optimizer state saved beside the params)."
    )
    raise CheckpointMismatchError("\n".join(lines), missing, unexpected, mis_shaped, mis_typed)


def restore(
    path: str | os.PathLike, like: Mapping[str, Any], *, step: int | None = None, strict: bool = True
) -> Any:
    """Read the checkpoint at `path` into the structure, shapes, dtypes and shardings of `like`.

    `like` is abstract variables (`jax.eval_shape(t.init, key, x)`) or real
    ones; a leaf with a `.sharding` (a `jax.ShapeDtypeStruct(...,
    sharding=...)`, an array) is restored onto it, others onto the default
    device. Every mismatch is reported at once in a `CheckpointMismatchError`
    before anything is read; with `strict=False` entries that `like` does not
    name are skipped. Under a directory of steps, `step=None` reads the latest.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = fx.checkpoint.save(d, {"params": {"w": jnp.ones(2)}})
    >>> fx.checkpoint.restore(d, like={"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}})
    Traceback (most recent call last):
    effax.CheckpointMismatchError: the checkpoint at `...` does not match `like` (1 problem):
      mis-shaped: params:w: like (3,), checkpoint (2,)
    ...
    """
    ocp = _orbax()
    d = _resolve(path, step)
    tree = ocp.PyTreeCheckpointHandler().metadata(d)
    tree = getattr(tree, "tree", tree)
    is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    stored = {_name(p): m for p, m in jax.tree.leaves_with_path(tree, is_leaf=is_meta) if is_meta(m)}
    like = jax.tree.map(lambda x: x if hasattr(x, "shape") and hasattr(x, "dtype") else jnp.asarray(x), dict(like))
    wanted = {_name(p): x for p, x in jax.tree.leaves_with_path(like)}
    _compare(d, wanted, stored, strict)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding or device)

    item = jax.tree.map(target, like)
    args = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=not strict and len(stored) > len(wanted),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(d, args=args)
