"""Save and restore variables with Orbax: nothing lost, nothing silent.

`save(path, variables, step=...)` writes an Orbax PyTree checkpoint (the
format Flax users write with `ocp.StandardCheckpointer` or a
`CheckpointManager`, so theirs load here too) with a checksum of every array
beside it, in Orbax's own metadata. `restore(path, like=...)` compares the
checkpoint with `like` (from `jax.eval_shape(t.init, ...)`), reports every
missing, unexpected, mis-shaped and mis-typed entry at once in a
`CheckpointMismatchError`, places each array on the sharding its `like` leaf
carries, and verifies each checksum (`CheckpointCorruptError` names the
entry). Orbax is imported only when these functions run
(`pip install effax[checkpoint]`).

What a save may touch, and when (the contract's "Checkpoints lose nothing"):

- A save writes only the step it names (`path/<step>`, or `path` itself
  without `step=`). It refuses a target that holds anything but an effax
  checkpoint, and `save(path, v)` without `step=` where `path` holds steps:
  existing files are never deleted.
- A checkpoint is written to `<target>.effax-tmp-<pid>-<host>` and renamed
  into place; an overwrite first moves the previous one to
  `<target>.effax-old-<pid>-<host>`. The rename of the new one is the commit.
  At every instant `steps()` lists exactly the complete steps: a step whose
  directory is missing while its `.effax-old-...` exists (a crash between the
  two renames) is listed, and restored, from there.
- The next save or restore of that directory cleans what crashed saves left
  behind (temp directories, a previous version whose replacement is in place)
  and moves an `.effax-old-...` back where its replacement never arrived. The
  leftovers of a save still running on this host are left alone. A leftover
  that cannot be removed blocks nothing but a save of its own target.
- A target that is a symbolic link is written through: the tmp/old dance
  happens beside the directory the link points at, and the link stays a link
  to the new checkpoint (a user keeps `run -> /disk/run`). A save never
  renames or removes the link itself, and a leftover that is a link is
  unlinked, never followed.
- A save records in the effax metadata every file and directory the new
  checkpoint holds (`files`); an overwrite refuses a checkpoint holding
  anything not in that list, at any depth (a user's `d/README.txt` too).
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import EffaxError
from effax.handlers._tree import key_path_names
from effax.inspect._diff import _is_box, diff_specs
from effax.sharding import ShardingError

__all__ = [
    "CheckpointCorruptError",
    "CheckpointIOError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "restore",
    "save",
    "steps",
]

_FORMAT = 1  # the version of the effax metadata written beside Orbax's
_LEFTOVER = re.compile(r"^(?P<target>.+)\.effax-(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})(?P<rest>.*)$")
_ORBAX_FILES = ("_METADATA", "manifest.ocdbt", "checkpoint")


class CheckpointMismatchError(EffaxError, ValueError):
    """The checkpoint does not match `like`: every missing, unexpected, mis-shaped and mis-typed entry.

    The lists are also attributes (`missing`, `unexpected`, `mis_shaped`,
    `mis_typed`), entries written `collection:path`.

    >>> e = fx.CheckpointMismatchError("...", ["params:w (float32[2])"], [], [], [])
    >>> e.missing
    ['params:w (float32[2])']
    """

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mis_shaped: list[str], mis_typed: list[str]):
        super().__init__(message)
        self.missing, self.unexpected = missing, unexpected
        self.mis_shaped, self.mis_typed = mis_shaped, mis_typed


class CheckpointNotFoundError(EffaxError, FileNotFoundError):
    """No checkpoint at the path (or at the step) asked for.

    >>> import tempfile
    >>> fx.checkpoint.restore(tempfile.mkdtemp() + "/none", like={})
    Traceback (most recent call last):
    effax.CheckpointNotFoundError: no checkpoint at `.../none`. Check the path ...
    """


class CheckpointCorruptError(EffaxError, ValueError):
    """The stored data is damaged: a checksum differs, or a file is missing, truncated or garbled.

    `entry` names the array whose checksum failed (`collection:path`), or is
    None when the damage could not be pinned to one array; `path` is the
    checkpoint directory. Restore an earlier step, or save again.

    >>> e = fx.CheckpointCorruptError("checksum of `params:w` differs", entry="params:w", path="/ckpt")
    >>> e.entry
    'params:w'
    """

    def __init__(self, message: str, *, entry: str | None = None, path: Any = None):
        super().__init__(message)
        self.entry, self.path = entry, None if path is None else os.fspath(path)


class CheckpointIOError(EffaxError, OSError):
    """The storage layer failed (a permission, a full disk, a path that is a file) at the path named.

    It is also an `OSError`, so `except OSError` keeps working.

    >>> import tempfile
    >>> f = tempfile.mkstemp()[1]
    >>> fx.checkpoint.save(f + "/ckpt", {"params": {"w": jnp.ones(2)}})
    Traceback (most recent call last):
    effax.CheckpointIOError: cannot create the checkpoint directory `...`: ...
    """


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError:  # pragma: no cover - depends on the environment
        raise EffaxError(
            "`fx.checkpoint` needs Orbax: `pip install 'effax[checkpoint]'` (or `pip install orbax-checkpoint`)."
        ) from None
    return ocp


def _fault(point: str) -> None:
    """Called at each step of a save; the fault-injection tests replace it to kill the process there."""


# --- paths: local paths go through `os`; `gs://...` and other URLs through `etils.epath`


def _path(path: Any) -> Any:
    from etils import epath

    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _local(p: Any) -> bool:
    return "://" not in os.fspath(p)


def _storage(action: str, p: Any, error: BaseException) -> CheckpointIOError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointIOError(f"cannot {action} `{p}`: {detail}. Check the path and its permissions (and free space).")


def _exists(p: Any) -> bool:
    try:
        return p.exists()
    except OSError as e:
        raise _storage("read", p, e) from e


def _listdir(p: Any) -> list[Any]:
    try:
        return list(p.iterdir()) if _exists(p) and p.is_dir() else []
    except OSError as e:
        raise _storage("list", p, e) from e


def _present(p: Any) -> bool:
    """Whether `p` is there, a symbolic link too (even one that leads nowhere), never following it."""
    if not _local(p):  # pragma: no cover - remote storage has no links
        return _exists(p)
    return os.path.lexists(os.fspath(p))


def _is_link(p: Any) -> bool:
    return _local(p) and os.path.islink(os.fspath(p))


def _remove(p: Any) -> None:
    """Remove leftover `p`: a symbolic link is unlinked (what it points at is not ours), a directory removed."""
    if not _present(p):
        return
    if _local(p):
        text = os.fspath(p)
        if _is_link(p) or not os.path.isdir(text):
            os.unlink(text)
        else:
            shutil.rmtree(text, ignore_errors=False)
    else:  # pragma: no cover - remote storage
        p.rmtree()


def _rename(src: Any, dst: Any) -> None:
    if _local(src):
        os.rename(os.fspath(src), os.fspath(dst))
    else:  # pragma: no cover - remote storage
        src.rename(dst)


def _fsync_tree(p: Any) -> None:
    """Flush a freshly written checkpoint to disk before it is renamed into place (local paths only)."""
    if not _local(p):  # pragma: no cover - remote storage commits on write
        return
    root = os.fspath(p)
    for where, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(where, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(where)


def _fsync_dir(where: Any) -> None:
    if not _local(where):  # pragma: no cover - remote storage
        return
    try:
        fd = os.open(os.fspath(where), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# --- who owns a leftover: the saving process, by pid and host


def _host() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFFFF:08x}"


def _owner() -> str:
    """`<pid>-<host>` of process 0, the one that renames (the same string on every process)."""
    pid, host = os.getpid(), int(_host(), 16)
    if jax.process_count() > 1:  # pragma: no cover - multi-process runs
        from jax.experimental import multihost_utils

        words = multihost_utils.broadcast_one_to_all(np.array([pid, host], np.uint32))
        pid, host = int(words[0]), int(words[1])
    return f"{pid}-{host:08x}"


# A leftover of another host (a restarted job often gets another host name) is taken as dead once nothing in
# it has changed for this long: a running save writes its files continuously, and moving a checkpoint aside
# (the commit) stamps the directory's change time.
_STALE_SECONDS = 3600.0


def _untouched_for(p: Any) -> float:
    """Seconds since anything in leftover `p` was written or renamed (0 for remote storage: never stale)."""
    if not _local(p):  # pragma: no cover - remote storage keeps no change times to trust
        return 0.0
    newest = 0.0
    for where, _, files in os.walk(os.fspath(p)):
        for f in [where, *(os.path.join(where, name) for name in files)]:
            try:
                st = os.lstat(f)
            except OSError:  # removed while we look: its save is alive (or its cleaner is)
                return 0.0
            newest = max(newest, st.st_mtime, st.st_ctime)
    return time.time() - newest


def _alive(pid: int, host: str, p: Any = None) -> bool:
    """Whether the save that left leftover `p` may still be running: on this host, whether its process is;
    on another, whether anything in `p` changed in the last `_STALE_SECONDS`."""
    if host != _host():
        return p is None or _untouched_for(p) < _STALE_SECONDS
    if pid == os.getpid():
        return True  # another thread's save in progress (a failed save of ours cleans up after itself)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _leftovers(parent: Any) -> dict[str, dict[str, list[tuple[Any, re.Match]]]]:
    """`{target name: {"tmp": [(path, match)], "old": [...]}}` of the effax leftovers in `parent`."""
    found: dict[str, dict[str, list[tuple[Any, re.Match]]]] = {}
    for child in _listdir(parent):
        m = _LEFTOVER.match(child.name)
        if m:
            found.setdefault(m["target"], {"tmp": [], "old": []})[m["kind"]].append((child, m))
    return found


def _is_complete_old(m: re.Match) -> bool:
    return m["rest"] == ""  # an Orbax temp dir inside our name (`...-<host>.orbax-checkpoint-tmp-1`) never is


def _recover(parent: Any, only: str | None = None, force: bool = False, strict: bool = False) -> None:
    """Clean the leftovers of crashed saves in `parent` (for target `only`, or all).

    Temp directories go; a previous version moved aside goes once its
    replacement is in place, and moves back where the replacement never
    arrived. Leftovers of a save still running here are kept, unless `force`
    (a save of that very target: two saves of one step at once are a race).

    Cleaning is housekeeping: a leftover that cannot be removed (a read-only
    directory, a file another user owns) is left for a later try, so it never
    blocks the saves and restores of other checkpoints in `parent`. Only with
    `strict` (a save about to write `only`) is it an error, naming the leftover.
    """
    for target, kinds in _leftovers(parent).items():
        if only is not None and target != only:
            continue
        dead = lambda p, m: force or not _alive(int(m["pid"]), m["host"], p)  # noqa: E731
        final = parent / target
        try:
            olds = sorted((p for p, m in kinds["old"] if dead(p, m) and _is_complete_old(m)), key=lambda p: p.name)
        except OSError:  # pragma: no cover - a leftover vanished while we looked: its cleaner is at work
            continue
        p = final
        try:
            if olds and not _present(final):
                p = olds.pop()
                _rename(p, final)  # roll back: the new version was never renamed in
                _fsync_dir(parent)
            for p, m in kinds["tmp"] + kinds["old"]:
                if not (dead(p, m) and _present(p) and p != final):
                    continue
                if _is_link(final) and not _exists(final) and m["kind"] == "old" and _is_complete_old(m):
                    continue  # `final` is a link that leads nowhere: a previous version may be all there is
                _remove(p)
        except OSError as e:  # a `CheckpointIOError` too
            if strict:
                detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointIOError(
                    f"cannot clean up `{p}`, left by an interrupted save of `{final}`: {detail}. Remove it "
                    "yourself (a symbolic link with `rm`, a directory with `rm -r`), or fix its permissions, "
                    "then save again."
                ) from e


# --- what a directory is


def _read_metadata(d: Any) -> dict | None:
    """Orbax's `_METADATA` JSON of checkpoint `d`, or None when there is none."""
    f = d / "_METADATA"
    if not _exists(f):
        return None
    try:
        text = f.read_text()
    except OSError as e:
        raise _storage("read", f, e) from e
    try:
        meta = json.loads(text)
    except ValueError:
        raise CheckpointCorruptError(
            f"the checkpoint metadata `{f}` is not valid JSON (truncated or overwritten). The checkpoint "
            "is damaged: restore an earlier step, or save again.",
            path=d,
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointCorruptError(f"the checkpoint metadata `{f}` is not a JSON object: the checkpoint is damaged.",
                                     path=d)
    return meta


def _effax_meta(meta: dict | None) -> dict | None:
    custom = (meta or {}).get("custom_metadata")
    found = custom.get("effax") if isinstance(custom, dict) else None
    return found if isinstance(found, dict) else None


def _is_checkpoint(d: Any) -> bool:
    return any(_exists(d / name) for name in _ORBAX_FILES)


def _is_step_dir(d: Any) -> bool:
    """An effax or Orbax checkpoint, or a `CheckpointManager` step holding checkpoint items."""
    if not d.is_dir():
        return False
    return _is_checkpoint(d) or any(c.is_dir() and _is_checkpoint(c) for c in _listdir(d))


def _step_names(root: Any) -> dict[int, Any]:
    """`{step: directory}`: complete step directories, and previous versions standing in for missing ones."""
    found: dict[int, Any] = {}
    children = _listdir(root)
    names = {c.name for c in children}
    for child in children:
        if child.name.isdigit() and child.name.isascii():
            if _is_step_dir(child):
                found[int(child.name)] = child
            elif (old := _old_behind_link(child)) is not None:
                found[int(child.name)] = old  # a crash between the two renames of an overwrite through a link
    for target, kinds in _leftovers(root).items():
        if target.isdigit() and target.isascii() and target not in names:
            olds = sorted((p for p, m in kinds["old"] if _is_complete_old(m)), key=lambda p: p.name)
            if olds:
                found[int(target)] = olds[-1]  # a crash between the two renames of an overwrite
    return dict(sorted(found.items()))


def _old_behind_link(p: Any) -> Any:
    """For a symbolic link `p` that leads nowhere, the previous version moved aside beside where it leads."""
    if not _is_link(p) or _exists(p):
        return None
    real = _path(os.path.realpath(os.fspath(p)))
    olds = [q for q, m in _leftovers(real.parent).get(real.name, {}).get("old", []) if _is_complete_old(m)]
    return sorted(olds, key=lambda q: q.name)[-1] if olds else None


def _through_link(p: Any, saving: bool = False) -> Any:
    """`p`, or the directory it leads to when `p` is a symbolic link (local paths), so a save writes through it.

    A user who links `run -> /disk/run` expects a save to `run` to replace
    the checkpoint in `/disk/run` and keep the link. Replacing the link
    itself (renaming it aside, renaming a directory over it) would turn it
    into a directory and strand the data behind it; so the whole save,
    temp and old directories included, happens beside the real directory,
    which is where the renames are atomic. A link that loops, or one whose
    directory is missing (an unmounted disk), is refused by a save rather
    than followed into creating directories.
    """
    if not _is_link(p):
        return p
    real = os.path.realpath(os.fspath(p))
    if not saving:
        return _path(real)
    if os.path.islink(real):
        raise CheckpointIOError(
            f"cannot save to `{p}`: it is a symbolic link that leads back to itself (through `{real}`). "
            "Point the link at a directory (`ln -sfn /disk/run run`), or save to the directory itself."
        )
    if not os.path.isdir(os.path.dirname(real)):
        raise CheckpointIOError(
            f"cannot save to `{p}`: it is a symbolic link to `{real}`, whose directory "
            f"`{os.path.dirname(real)}` does not exist (a disk not mounted?). Create that directory, or "
            "point the link elsewhere (`ln -sfn /disk/run run`); effax does not create directories behind a link."
        )
    return _path(real)


def _check_step(step: Any, what: str = "step") -> int | None:
    if step is None:
        return None
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
        raise EffaxError(
            f"`{what}={step!r}`: a step is a non-negative int (the training step, e.g. `step=1000`), "
            f"got {type(step).__name__}. Pass `step=int(n)`; to restore the latest, leave `step` out."
        )
    return int(step)


def _not_a_dir(root: Any) -> None:
    if _exists(root) and not root.is_dir():
        raise CheckpointIOError(
            f"`{root}` is a file, not a checkpoint directory. Pass the directory that "
            "`fx.checkpoint.save` wrote (effax never replaces a file with a checkpoint)."
        )


def steps(path: str | os.PathLike) -> list[int]:
    """The steps saved under `path` with `save(..., step=n)`, in increasing order; each one restores.

    A step interrupted while being overwritten is listed (its previous
    version is complete); a save that never finished is not.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> for n in (10, 2):
    ...     _ = fx.checkpoint.save(d, {"params": {"w": jnp.ones(2)}}, step=n)
    >>> fx.checkpoint.steps(d)
    [2, 10]
    """
    root = _through_link(_path(path))
    _not_a_dir(root)
    return list(_step_names(root))


# --- checksums: position-weighted sums of mixed 32-bit words, computed where the array lives


def _fmix(h: jax.Array) -> jax.Array:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _bits(dtype: Any) -> int:
    """Bits per element: 4 for `int4`, whose NumPy `itemsize` says 1."""
    for info in (jnp.iinfo, jnp.finfo):
        try:
            return int(info(dtype).bits)
        except (TypeError, ValueError):
            pass
    return 8 * jnp.dtype(dtype).itemsize


def _is_narrow_unsigned(dtype: Any) -> bool:
    """`uint4`, `uint2`: sub-byte unsigned ints, which TensorStore cannot store (it stores `int4` and `int2`)."""
    return dtype != jnp.bool_ and jnp.issubdtype(dtype, jnp.unsignedinteger) and _bits(dtype) < 8


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, in its own shape (each element widened, or split into words
    along a new last axis): never reshaped, so a sharded array keeps its sharding (an `Explicit` mesh
    axis on a minor dimension cannot be flattened without a resharding)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if _bits(x.dtype) < 8:  # int4, uint4, float4, ...: widened exactly (each value keeps its own word), not bitcast
        wide = jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32
        return jax.lax.bitcast_convert_type(x.astype(wide), jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 4 bytes: one word each; 8 bytes: two, on a new axis


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's position in the flattened (C-order) array, mod 2**32, built without a reshape."""
    i = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        i = i + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride % 2**32)
        stride *= shape[d]
    return i


@jax.jit
def _digest(x: jax.Array) -> jax.Array:
    """Two independent 32-bit sums; each term is a bijection of its word, so any one changed word shows."""
    w = _words(x)
    i = _flat_index(w.shape)
    a = jnp.sum(_fmix(w + _fmix(i * np.uint32(0x9E3779B9) + np.uint32(0x7F4A7C15))), dtype=jnp.uint32)
    b = jnp.sum(_fmix((w ^ _fmix(i * np.uint32(0x85EBCA77) + np.uint32(0x165667B1))) * np.uint32(0x27D4EB2F)),
                dtype=jnp.uint32)
    return jnp.stack([a, b])


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _checksums(leaves: dict[str, Any]) -> dict[str, str]:
    """`{entry: 16 hex digits}`; every process computes them (a sharded array's sum spans processes).

    Outside any context mesh: under `jax.set_mesh(mesh)` (where the guides restore), a leaf on one device
    (unsharded in `like`) is no argument a jitted function may take, while a sharded one brings its own mesh.
    """
    with jax.set_mesh(None):
        sums = {name: _digest(x) for name, x in leaves.items()}
    out = {}
    for name, s in sums.items():
        words = np.asarray(s.addressable_data(0) if hasattr(s, "addressable_data") else s)
        out[name] = f"{int(words[0]):08x}{int(words[1]):08x}"
    return out


def _name(key_path: tuple) -> str:
    return _join(key_path_names(key_path))


def _join(names: tuple[str, ...]) -> str:
    """An entry's name, `collection:path/to/leaf`."""
    return names[0] if len(names) == 1 else f"{names[0]}:{'/'.join(names[1:])}"


def _prepare(variables: Any) -> tuple[dict, dict]:
    """The tree Orbax writes (typed keys as their key data) and the effax metadata beside it."""
    if not isinstance(variables, Mapping):
        raise EffaxError(
            f"`variables` must be a dict like {{'params': {{...}}}}, got {type(variables).__name__}. "
            "Pass what `t.init` returned (merged with the updates of later runs)."
        )
    keys: dict[str, str] = {}
    data: dict[str, Any] = {}
    widened: dict[str, str] = {}

    def leaf(key_path: tuple, x: Any) -> Any:
        name = _name(key_path)
        if _is_box(x):  # a Flax box (`nn.Partitioned`): saved as the array inside, as `t.apply` reads it
            x = x.unbox()
            if not (hasattr(x, "shape") and hasattr(x, "dtype")):
                raise EffaxError(
                    f"`{name}` in `variables` is a Flax box around a {type(x).__name__}, not an array: a "
                    "checkpoint holds arrays only. Unbox it first: `flax.linen.meta.unbox(variables)`."
                )
        if _is_key(x):
            keys[name] = str(jax.random.key_impl(x))
            x = jax.random.key_data(x)
        elif isinstance(x, (bool, int, float, complex, np.number, np.bool_)) or (
            isinstance(x, np.ndarray) and x.dtype != object
        ):
            x = jnp.asarray(x)
        elif not isinstance(x, jax.Array):
            raise EffaxError(
                f"`{name}` in `variables` is {type(x).__name__} {x!r:.60}, not an array: a checkpoint "
                "holds arrays only. Drop it, or convert it (`jnp.asarray(...)`)."
            )
        if x.size == 0:
            raise EffaxError(
                f"`{name}` in `variables` is a zero-size array ({_spec(x)}): Orbax cannot store arrays "
                "with no elements. Leave it out of what you save (and of `like` when restoring), or give "
                "it a size of at least 1."
            )
        data[name] = x
        if _is_narrow_unsigned(x.dtype):  # TensorStore has no uint4: stored as uint8, read back as uint4
            widened[name] = jnp.dtype(x.dtype).name
            return x.astype(jnp.uint8)
        return x

    tree = jax.tree_util.tree_map_with_path(leaf, dict(variables), is_leaf=lambda x: x is None or _is_box(x))
    if not data:
        raise EffaxError(
            f"`variables` holds no arrays ({sorted(variables)}), so there is no checkpoint to write: "
            "a model without params or state has nothing to save. Pass what `t.init` returned."
        )
    if jax.process_count() > 1:  # pragma: no cover - multi-process runs (tests/distributed)
        tree = _global(tree)
    meta = {"version": _FORMAT, "checksums": _checksums(data), "keys": keys, "widened": widened}
    return tree, meta


def _global(tree: dict) -> dict:
    """On several processes, each leaf one process holds alone (a step counter, a NumPy array, a key) made a
    global array replicated on every device, as Orbax writes only global arrays and `restore` gives such
    leaves back replicated. Every process must hold the same value: a differing one is refused by name."""
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    local = {_name(path): np.asarray(x) for path, x in leaves if x.is_fully_addressable}
    if not local:
        return tree
    digests = np.array([zlib.crc32(x.tobytes()) for x in local.values()], np.uint32)
    every = np.asarray(multihost_utils.process_allgather(digests))  # (processes, entries)
    differ = [name for i, name in enumerate(local) if (every[:, i] != every[0, i]).any()]
    if differ:
        raise EffaxError(
            f"{', '.join(f'`{n}`' for n in differ[:5])} in `variables` differ between processes: each is held "
            "by every process alone (not a global array), so the checkpoint can hold only one value of it. "
            "Save the same value on every process (computed alike, e.g. the step counter), or make it a global "
            "array (`jax.make_array_from_process_local_data`)."
        )
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("processes",)), PartitionSpec())

    def leaf(key_path: tuple, x: Any) -> Any:
        host = local.get(_name(key_path))
        if host is None:
            return x
        return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

    return jax.tree_util.tree_map_with_path(leaf, tree)


# --- save


def _refuse(target: Any, why: str) -> EffaxError:
    return EffaxError(
        f"refusing to save to `{target}`: {why}. effax never deletes files it did not write: save to "
        "a new path, or into a directory of steps with `step=n`."
    )


def _check_target(root: Any, target: Any, step: int | None) -> None:
    """Refuse any target whose present contents are not an effax checkpoint this save may replace."""
    _not_a_dir(root)
    if step is not None and _exists(root) and _is_checkpoint(root):
        raise _refuse(root, "it is itself a single checkpoint, so it cannot hold steps")
    if not _exists(target):
        return
    if not target.is_dir():
        raise _refuse(target, "it is a file")
    children = _listdir(target)
    if not children:
        return  # an empty directory: replaced by the rename
    if step is None:
        found = list(_step_names(target))
        if found:
            raise EffaxError(
                f"`{target}` holds the steps {found}; saving there without `step=` would replace "
                f"them all. Pass the step: `fx.checkpoint.save(path, variables, step={found[-1] + 1})`."
            )
    try:
        ours = _effax_meta(_read_metadata(target)) is not None
    except CheckpointCorruptError:
        raise _refuse(target, "it holds a checkpoint whose metadata is unreadable; delete it yourself "
                      "if it is no longer needed") from None
    if not ours:
        shown = ", ".join(sorted(c.name + ("/" if c.is_dir() else "") for c in children)[:5])
        what = (
            "an Orbax checkpoint that effax did not write (by Flax or Orbax, or by an effax without checksums)"
            if _is_checkpoint(target)
            else f"files ({shown})"
        )
        raise _refuse(target, f"it holds {what}")


_ORBAX_WRITES = re.compile(  # every entry an Orbax PyTree checkpoint holds, hashes and process numbers as `#`
    r"(_METADATA|_CHECKPOINT_METADATA|_sharding|manifest\.ocdbt|commit_success\.txt"
    r"|d/|d/#|array_metadatas/|array_metadatas/process_#"
    r"|ocdbt\.process_#/|ocdbt\.process_#/manifest\.ocdbt|ocdbt\.process_#/d/|ocdbt\.process_#/d/#)"
)


def _entries(d: Any) -> list[str]:
    """Everything checkpoint `d` holds, at any depth: relative paths, directories ending in `/`, links not followed."""
    if not _local(d):  # pragma: no cover - remote storage has no links
        try:
            return sorted(str(c.relative_to(d)) + ("/" if c.is_dir() else "") for c in d.rglob("*"))
        except OSError as e:
            raise _storage("list", d, e) from e
    out: list[str] = []

    def walk(where: str, rel: str) -> None:
        with os.scandir(where) as found:
            for e in found:
                if e.is_dir(follow_symlinks=False):
                    out.append(f"{rel}{e.name}/")
                    walk(e.path, f"{rel}{e.name}/")
                else:
                    out.append(rel + e.name)

    try:
        walk(os.fspath(d), "")
    except OSError as e:
        raise _storage("list", d, e) from e
    return sorted(out)


def _record_files(d: Any) -> None:
    """Add to the effax metadata of the checkpoint `d` just written the list of everything it holds (`files`).

    `_foreign` needs to know, when this checkpoint is overwritten, which of
    its files effax wrote: any other one is the user's. Orbax's file names
    alone cannot tell (a user's `d/README.txt` looks like Orbax's `d/<hash>`),
    and Orbax's metadata is written before its data files exist, so the list
    is added to it afterwards, in the temp directory, before the commit.
    """
    f = d / "_METADATA"
    meta = _read_metadata(d)
    ours = _effax_meta(meta)
    if ours is None:  # pragma: no cover - Orbax always writes `_METADATA` with our custom metadata
        return
    ours["files"] = _entries(d)
    try:
        f.write_text(json.dumps(meta))
    except OSError as e:
        raise _storage("write", f, e) from e


def _foreign(target: Any, written: Any) -> list[str]:
    """What the checkpoint `target` holds that effax did not write (a user's `eval_metrics.json` beside the
    arrays, a `d/README.txt` among them), the topmost of each: replacing `target` would delete it.

    Effax's own files are the ones `_record_files` listed in the checkpoint's
    metadata at save; anything else, at any depth, is foreign. A checkpoint
    written before that list existed falls back to Orbax's layout: an entry
    is Orbax's only if the new checkpoint `written` holds one at the same
    place, or Orbax's PyTree format puts one there (`d/<hash>`,
    `ocdbt.process_<n>/...`), hashes and process numbers aside. A user file
    that mimics a hash name there is the one thing that fallback misses.
    """
    if not _exists(target):
        return []
    present = _entries(target)
    listed = (_effax_meta(_read_metadata(target)) or {}).get("files")
    if isinstance(listed, list):
        known = {str(x) for x in listed}
        ours = lambda entry: entry in known  # noqa: E731
    else:
        norm = lambda e: re.sub(r"(?<=process_)\d+|(?<=/)[0-9a-f]{16,}(?=/|$)", "#", e)  # noqa: E731
        layout = {norm(e) for e in _entries(written)}
        ours = lambda entry: norm(entry) in layout or bool(_ORBAX_WRITES.fullmatch(norm(entry)))  # noqa: E731
    foreign: list[str] = []
    for entry in present:  # sorted: a directory comes before what it holds
        if not ours(entry) and not any(f.endswith("/") and entry.startswith(f) for f in foreign):
            foreign.append(entry)
    return foreign


def save(path: str | os.PathLike, variables: Mapping[str, Any], *, step: int | None = None) -> Any:
    """Write `variables` as an Orbax checkpoint at `path` (or `path/<step>`); returns the directory.

    The checkpoint is written beside the target and renamed into place, so
    a save that fails or is killed at any instant leaves the previous
    checkpoint there intact and listed; every array's checksum is stored
    beside it. It refuses a target holding anything but an effax checkpoint,
    and a save without `step=` where steps exist. Typed PRNG keys are saved
    as their key data and come back as keys. Flax boxes (`nn.Partitioned`)
    are saved as the arrays inside them, as `t.apply` reads them. Sub-byte
    dtypes round-trip (`uint4`, which TensorStore lacks, is stored as
    `uint8`); zero-size arrays, which Orbax cannot store, are refused by
    name before anything is written. Sharded arrays are saved shard
    by shard; on several hosts every process calls `save` (as with Orbax),
    and a leaf each process holds alone (a step counter) is saved once,
    replicated, if every process holds the same value. A `path` (or step)
    that is a symbolic link is written through: the directory it leads to
    gets the new checkpoint, and the link stays a link to it.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> variables = {"params": {"w": jnp.ones(2)}}
    >>> _ = fx.checkpoint.save(d + "/ckpt", variables)
    >>> fx.checkpoint.restore(d + "/ckpt", like=variables)
    {'params': {'w': Array([1., 1.], dtype=float32)}}
    """
    ocp = _orbax()
    step = _check_step(step)
    tree, meta = _prepare(variables)
    root = _path(path)
    asked = root / str(step) if step is not None else root
    target = _through_link(asked, saving=True)  # a link is written through: it stays a link, to the new one
    primary = jax.process_index() == 0
    owner = _owner()
    tmp = target.parent / f"{target.name}.effax-tmp-{owner}"
    old = target.parent / f"{target.name}.effax-old-{owner}"
    _check_target(root, target, step)  # on every process (read only), so a refusal never leaves one waiting
    if primary:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _storage("create the checkpoint directory", target.parent, e) from e
        if asked.parent != target.parent and _exists(asked.parent):
            _recover(asked.parent)
        _recover(target.parent)
        _recover(target.parent, only=target.name, force=True, strict=True)
    _fault("start")
    _sync("effax_checkpoint_save_start")
    try:
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(
            tmp, args=ocp.args.PyTreeSave(tree, custom_metadata={"effax": meta})
        )
        if primary:
            _record_files(tmp)
        _fault("written")
        if primary:
            _fsync_tree(tmp)
        _fault("synced")
        foreign = _foreign(target, tmp)  # on every process (read only), as `_check_target`
        if foreign:
            raise _refuse(target, f"it is an effax checkpoint that also holds files effax did not write "
                          f"({', '.join(foreign[:5])}), which replacing it would delete; move them out first")
    except Exception as e:
        if primary:
            _recover(target.parent, only=target.name, force=True)
        if isinstance(e, EffaxError):
            raise
        raise _storage("write the checkpoint", target, e) from e
    except BaseException:
        if primary:
            _recover(target.parent, only=target.name, force=True)
        raise
    if primary:
        try:
            if _exists(target) and _listdir(target):
                _rename(target, old)
                _fault("moved_old")
            _rename(tmp, target)  # the commit (over an empty directory, if one was there)
            _fsync_dir(target.parent)
            _fault("committed")
            _remove(old)
        except BaseException as e:
            _recover(target.parent, only=target.name, force=True)  # the previous one back, or the new one kept
            if isinstance(e, OSError):
                raise _storage("move the new checkpoint into place at", target, e) from e
            raise
    _fault("done")
    _sync("effax_checkpoint_save_done")
    return asked


def _sync(name: str) -> None:
    if jax.process_count() > 1:  # pragma: no cover - multi-process runs
        _orbax().multihost.sync_global_processes(name)


# --- restore


def _resolve(root: Any, step: int | None) -> Any:
    """The directory holding the PyTree: `root`, its `step` (default: the latest), or a step's one item."""
    _not_a_dir(root)
    found = _step_names(root) if _exists(root) else {}
    if step is not None:
        d = found.get(step, root / str(step))
    elif _exists(root) and _is_checkpoint(root):
        d = root
    elif found:
        d = found[max(found)]
    else:
        d = root
        olds = [p for p, m in _leftovers(root.parent).get(root.name, {}).get("old", []) if _is_complete_old(m)]
        if not _exists(root) and olds:
            d = olds[-1]  # a crash between the two renames of an overwrite, its save still running
    if not _exists(d):
        raise CheckpointNotFoundError(
            f"no checkpoint at `{d}`"
            + (f"; steps saved under `{root}`: {list(found)}" if found else "")
            + ". Check the path (and `step=`), or write one with `fx.checkpoint.save`."
        )
    if _is_checkpoint(d):
        return d
    items = sorted(c.name for c in _listdir(d) if c.is_dir() and _is_checkpoint(c))
    step_dir = d is not root or (d.name.isdigit() and d.name.isascii())
    if step_dir and len(items) == 1:
        return d / items[0]  # a CheckpointManager step with one item (`default`, `state`, ...)
    if items:
        raise CheckpointNotFoundError(
            f"`{d}` is not a checkpoint; it holds the checkpoints {items}. Pass the one to restore, "
            f"e.g. `fx.checkpoint.restore('{d / items[0]}', like=...)`."
        )
    raise CheckpointNotFoundError(
        f"`{d}` is not a checkpoint and holds neither checkpoints nor steps. Check the path, or "
        "write one with `fx.checkpoint.save`."
    )


def _spec(x: Any) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def _compare(where: Any, like: dict, stored: dict, strict: bool, kinds: tuple[dict, dict | None]) -> None:
    """Report every mismatch between `like` and the checkpoint at once, through the one tree diff."""
    like_kind, stored_kind = kinds  # entry -> "key<impl>" for typed keys; None: not written by effax
    # a checkpoint not written by effax does not say which arrays are keys: compare their data's dtype
    want_kind = like_kind if stored_kind is not None else {}
    report = diff_specs(like, stored, labels=("like", "checkpoint"), unused=strict,
                        dtypes=(want_kind, stored_kind or {}))
    if report.ok:
        return
    problems = report.problems
    lines = [f"the checkpoint at `{where}` does not match `like` ({problems} problem{'s' * (problems > 1)}):"]
    lines += [f"  {line}" for line in report.lines(unused="unexpected")]
    lines.append(
        "Restore into variables of the model and config that wrote it (`like=jax.eval_shape(t.init, "
        "key, x)`), convert the checkpoint, or pass `strict=False` to skip entries `like` does not "
        "name (an optimizer state saved beside the params)."
    )
    raise CheckpointMismatchError(
        "\n".join(lines), report.missing, report.unused, report.mis_shaped, report.mis_typed
    )


def _keys_as_keys(wanted: dict, stored: dict, like_keys: dict, stored_keys: dict) -> tuple[dict, dict]:
    """`wanted` and `stored` with each entry that is a key on both sides compared as keys, not as their data.

    Keys of two implementations store data of different lengths (`key<fry>`
    two words, `key<rbg>` four), so their data would differ in shape; the
    difference is the key's type, and `fx.check_variables` calls it
    mis-typed. Here too: each side becomes its key shape and key dtype.
    """
    wanted, stored = dict(wanted), dict(stored)
    for name in like_keys.keys() & stored_keys.keys() & wanted.keys() & stored.keys():
        try:
            data = jax.ShapeDtypeStruct(tuple(stored[name].shape), jnp.uint32)
            have = jax.eval_shape(lambda d, impl=stored_keys[name]: jax.random.wrap_key_data(d, impl=impl), data)
        except Exception:  # an unknown implementation, or data of the wrong shape: compared as saved
            continue
        want = like_keys[name]
        wanted[name] = jax.ShapeDtypeStruct(tuple(want.shape), want.dtype)
        stored[name] = jax.ShapeDtypeStruct(tuple(have.shape), have.dtype)
    return wanted, stored


def _key_dtype(impl: str, data: Any) -> str:
    """The dtype name (`key<fry>`) of keys of implementation `impl` stored as `data`."""
    try:
        spec = jax.ShapeDtypeStruct(tuple(data.shape), jnp.uint32)
        return str(jax.eval_shape(lambda d: jax.random.wrap_key_data(d, impl=impl), spec).dtype)
    except Exception:  # an unknown implementation, or data of the wrong shape: shown as saved
        return f"key<{impl}>"


def _key_impl(x: Any) -> str:
    try:
        return str(jax.random.key_impl(x))
    except TypeError:  # a jax.ShapeDtypeStruct of keys
        return str(getattr(x.dtype, "_impl", "threefry2x32"))


def _unbox_like(like: Any) -> Any:
    """`like` with each Flax box (`nn.Partitioned`) replaced by the one leaf inside it (never `unbox()`, which
    would constrain an abstract value); restore puts the boxes back around what it read."""
    inner = lambda b: jax.tree.leaves(b)[0] if _is_box(b) and len(jax.tree.leaves(b)) == 1 else b  # noqa: E731
    return jax.tree.map(inner, dict(like), is_leaf=_is_box)


def _not_like(name: str, x: Any) -> EffaxError:
    """A `like` leaf that is not an array or its shape: what it is, and how to build what restore needs."""
    if x is None or isinstance(x, str):
        what = repr(x) if x is None else f"the str {x!r:.40} (a tree of logical axes?)"
    elif isinstance(x, jax.sharding.PartitionSpec):
        what = f"the PartitionSpec {x} (logical axes?)"
    else:
        what = f"a {type(x).__name__}"
    if isinstance(x, (jax.sharding.Sharding, jax.sharding.PartitionSpec, str)):
        fix = (
            "`like` gives each entry's shape and dtype; to restore onto shardings, put them on the shapes: "
            "`like = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), "
            "jax.eval_shape(t.init, key, x), shardings)` (shardings from `fx.sharding.logical_to_mesh`)."
        )
    else:
        fix = "pass `like=jax.eval_shape(t.init, key, x)` (or real variables)."
    return EffaxError(f"`like` entry `{name}` is {what}, not an array or its shape: {fix}")


def _on_devices(name: str, sharding: Any) -> Any:
    """`sharding`, with an abstract mesh (what `jax.eval_shape` gives for sharded arrays) replaced by the
    concrete mesh set with `jax.set_mesh` when it is that mesh; refused, with the fix, when there is none."""
    mesh = getattr(sharding, "mesh", None)
    if not isinstance(mesh, jax.sharding.AbstractMesh):
        return sharding
    current = jax.sharding.get_mesh()
    if not current.empty and current.abstract_mesh == mesh:
        return jax.sharding.NamedSharding(current, sharding.spec)
    axes = ", ".join(f"{a}: {n}" for a, n in mesh.shape.items())
    raise ShardingError(
        f"`like` entry `{name}` has a sharding on an abstract mesh ({axes}), what `jax.eval_shape` gives for "
        "sharded arrays: it names no devices to restore onto. Restore inside "
        "`with jax.set_mesh(mesh):` (that mesh is used), or put the shardings on your mesh: `like = jax.tree.map("
        "lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.NamedSharding(mesh, s.sharding.spec)), like)`."
    )


def _check_sharding(name: str, x: Any, sharding: Any) -> None:
    """Refuse, before anything is read, a `like` sharding that cannot hold its entry's shape."""
    if sharding is None:
        return

    shape, spec, mesh = tuple(x.shape), getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    shown = f"`like` entry `{name}` ({getattr(x.dtype, 'name', x.dtype)}{list(shape)})"
    fix = (
        "The checkpoint is fine: give that entry a sharding whose mesh axes divide its dimensions, or "
        "change the mesh (`fx.sharding.logical_to_mesh(fx.summary(t, x), mesh, rules)` checks every dimension)."
    )
    if spec is not None and mesh is not None:
        if len(spec) > len(shape):
            raise ShardingError(f"{shown} has sharding {spec} with {len(spec)} entries for {len(shape)} "
                                f"dimensions. {fix}")
        for dim, (n, entry) in enumerate(zip(shape, spec, strict=False)):
            if entry is None or entry is jax.sharding.PartitionSpec.UNCONSTRAINED:
                continue
            axes = (entry,) if isinstance(entry, str) else tuple(entry)
            sizes = [int(mesh.shape[a]) for a in axes]
            parts = int(np.prod(sizes))
            if n % parts:
                which = (f"mesh axis {axes[0]!r} (size {parts})" if len(axes) == 1 else
                         f"mesh axes {axes} (sizes {' x '.join(map(str, sizes))} = {parts})")
                raise ShardingError(
                    f"{shown} cannot be restored onto its sharding {spec}: dimension {dim} has size {n}, "
                    f"which {which} cannot split into equal parts. {fix}"
                )
        return
    try:
        sharding.shard_shape(shape)
    except Exception as e:  # another kind of sharding: its own words, one line
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ShardingError(f"{shown} cannot be restored onto its sharding {sharding}: {detail}. {fix}") from None


def _abstract_like(like: Any) -> tuple[dict, dict]:
    """`like` as `jax.ShapeDtypeStruct`s of what is stored (key data for keys); and `{entry: key dtype}`."""
    keys: dict[str, Any] = {}

    def leaf(key_path: tuple, x: Any) -> Any:
        name = _name(key_path)
        if not (hasattr(x, "shape") and hasattr(x, "dtype")) or isinstance(x, str):
            if not isinstance(x, (bool, int, float, complex)):
                raise _not_like(name, x)
            x = jnp.asarray(x)
        sharding = _on_devices(name, getattr(x, "sharding", None))
        _check_sharding(name, x, sharding)
        if _is_key(x):
            keys[name] = x
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)

    plain = lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    return jax.tree_util.tree_map_with_path(leaf, _unbox_like(like), is_leaf=plain), keys


def _without_empty(tree: Any) -> Any:
    """`tree` without the dict entries that hold no array (Orbax cannot match empty containers)."""
    if not isinstance(tree, Mapping):
        return tree
    kept = {k: _without_empty(v) for k, v in tree.items()}
    return {k: v for k, v in kept.items() if jax.tree.leaves(v)}


def _echo(error: Any, where: Any) -> bool:
    """Whether an error reported from elsewhere is an echo of a failed Orbax read (others pass through)."""
    text = f"{error} {where!r}"
    return "Event loop is closed" in text or "orbax" in text or "TensorStore" in text


class _quiet_orbax:
    """Keep the echoes of a failed read off stderr: Orbax's other reads fail after the first one and
    report "Event loop is closed" and "Exception ignored in <coroutine>" when they are collected."""

    def __init__(self, collect: bool = False):
        self.collect = collect

    def __enter__(self) -> None:
        self.hooks = unraisable, excepthook = sys.unraisablehook, threading.excepthook
        sys.unraisablehook = lambda u: None if _echo(u.exc_value, u.object) else unraisable(u)
        threading.excepthook = lambda a: None if _echo(a.exc_value, None) else excepthook(a)

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.collect:
                gc.collect()  # collect the abandoned coroutines while their echoes are silenced
        finally:
            sys.unraisablehook, threading.excepthook = self.hooks


def _orbax_read(d: Any, read: Any, damaged: Any = None) -> Any:
    """`read()`, with any failure raised as a `CheckpointCorruptError` naming `d` (and the entry `damaged()` finds)."""
    failure = None
    try:
        with _quiet_orbax():
            return read()
    except MemoryError:
        failure = "MemoryError", ""
    except Exception as e:  # dropped here, so Orbax's abandoned reads are collected while silenced
        failure = type(e).__name__, str(e)
    with _quiet_orbax(collect=True):
        pass
    if failure[0] == "MemoryError" or re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory", failure[1]):
        # not the files' fault: the arrays do not fit where `like` puts them
        raise EffaxError(
            f"not enough memory to restore the checkpoint at `{d}` onto the devices `like` names "
            f"({failure[0]}). Restore onto shardings that split the large arrays over more devices "
            "(`jax.ShapeDtypeStruct(..., sharding=...)` leaves in `like`), or free memory first."
        )
    raise _corrupt(d, failure, None if damaged is None else damaged())


def _damaged_entry(ocp: Any, d: Any, item: dict) -> str | None:
    """After a failed read, the first entry that cannot be read alone (None if each one can)."""
    leaves = jax.tree_util.tree_leaves_with_path(item)
    if len(leaves) > 256:
        return None  # too many to try one by one; the message names the directory
    for key_path, leaf in leaves:
        one: Any = leaf
        for k in reversed(key_path):
            one = {k.key: one}
        failed = False
        try:
            with _quiet_orbax():
                ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
                    d,
                    args=ocp.args.PyTreeRestore(
                        item=one, restore_args=ocp.checkpoint_utils.construct_restore_args(one), partial_restore=True
                    ),
                )
        except Exception:
            failed = True
        if failed:
            with _quiet_orbax(collect=True):
                pass
            return _name(key_path)
    return None


def _corrupt(d: Any, error: BaseException | tuple[str, str], entry: str | None = None) -> CheckpointCorruptError:
    kind, text = error if isinstance(error, tuple) else (type(error).__name__, str(error))
    lines = [line for line in text.strip().splitlines() if line.strip()]
    detail = re.split(r" See full TensorStore details| \[tensorstore_spec", lines[0])[0][:300] if lines else kind
    where = f"entry `{entry}` of " if entry else ""
    return CheckpointCorruptError(
        f"cannot read {where}the checkpoint at `{d}`: its files are missing, truncated or damaged "
        f"({kind}: {detail}). Restore an earlier step, or save again.",
        entry=entry,
        path=d,
    )


def restore(
    path: str | os.PathLike, like: Mapping[str, Any], *, step: int | None = None, strict: bool = True
) -> Any:
    """Read the checkpoint at `path` into the structure, shapes, dtypes and shardings of `like`.

    `like` is abstract variables (`jax.eval_shape(t.init, key, x)`) or real
    ones; a leaf with a `.sharding` (a `jax.ShapeDtypeStruct(...,
    sharding=...)`, an array) is restored onto it, others onto the default
    device. `like` holds shapes, not shardings: a `Sharding` or
    `PartitionSpec` leaf is refused with the one-line fix, and a sharding that
    cannot split its entry raises `ShardingError` before anything is read.
    Every mismatch is reported at once in a `CheckpointMismatchError`
    before anything is read; with `strict=False` entries that `like` does not
    name are skipped. A Flax box saved as it is (`kernel/value`, by Orbax)
    restores into a plain `kernel` of `like`, and boxes in `like` come back
    around the arrays read. Under a directory of steps, `step=None` reads the latest.
    Each array written by `save` is checked against its checksum
    (`CheckpointCorruptError` names the entry); damaged or unreadable files
    raise `CheckpointCorruptError` too, never wrong values. Nothing else does:
    running out of memory while reading is an `EffaxError` saying so.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = fx.checkpoint.save(d, {"params": {"w": jnp.ones(2)}})
    >>> fx.checkpoint.restore(d, like={"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}})
    Traceback (most recent call last):
    effax.CheckpointMismatchError: the checkpoint at `...` does not match `like` (1 problem):
      mis-shaped: params:w: like float32[3], checkpoint float32[2]
    ...
    """
    ocp = _orbax()
    if not isinstance(like, Mapping):
        raise EffaxError(
            f"`like` must be the variables to restore into, a dict like {{'params': {{...}}}}, got "
            f"{type(like).__name__}. Pass `like=jax.eval_shape(t.init, key, x)` (no memory is "
            "allocated) or real variables of the same model."
        )
    step = _check_step(step)
    asked = _path(path)
    root = _through_link(asked)  # a link to a checkpoint: its leftovers lie beside where it leads
    _not_a_dir(root)
    if jax.process_index() == 0:
        for p in {asked, root}:
            if _exists(p.parent):
                _recover(p.parent, only=p.name)
        if _exists(root) and root.is_dir():
            _recover(root)
    _sync("effax_checkpoint_restore_start")
    d = _resolve(root, step)
    meta = _read_metadata(d)
    ours = _effax_meta(meta)
    tree = _orbax_read(d, lambda: ocp.PyTreeCheckpointHandler().metadata(d))
    tree = getattr(tree, "tree", tree)
    is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    stored = {_name(p): m for p, m in jax.tree.leaves_with_path(tree, is_leaf=is_meta) if is_meta(m)}
    widened = {n: jnp.dtype(t) for n, t in (ours.get("widened", {}) if ours else {}).items() if n in stored}
    stored.update({n: jax.ShapeDtypeStruct(tuple(stored[n].shape), t) for n, t in widened.items()})
    boxed = jax.tree.structure(dict(like), is_leaf=lambda x: x is None)  # restored into, Flax boxes included
    item, like_keys = _abstract_like(like)
    names = {_name(p): key_path_names(p) for p, _ in jax.tree.leaves_with_path(item)}
    # A Flax box saved as it is (Orbax, or an older effax) stores `kernel/value` where `like` asks for `kernel`.
    alias = {n: _join(k + ("value",)) for n, k in names.items() if n not in stored and _join(k + ("value",)) in stored}
    wanted = {alias.get(_name(p), _name(p)): x for p, x in jax.tree.leaves_with_path(item)}
    stored_keys = ours.get("keys", {}) if ours else {}
    kinds = (
        {alias.get(n, n): str(k.dtype) for n, k in like_keys.items()},
        {n: _key_dtype(impl, stored.get(n)) for n, impl in stored_keys.items()} if ours else None,
    )
    if ours is not None:
        wanted, stored_keyed = _keys_as_keys(wanted, stored, {alias.get(n, n): x for n, x in like_keys.items()},
                                             stored_keys)
    else:
        stored_keyed = stored
    _compare(d, wanted, stored_keyed, strict, kinds)
    # An entry `like` gives no sharding (a step counter, a key beside sharded params) is replicated on the mesh
    # of the others, so the restored state enters the same jitted step; with no mesh, it goes to one device.
    mesh = next((s.mesh for s in (x.sharding for x in jax.tree.leaves(item)) if isinstance(s, jax.NamedSharding)), None)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if mesh is None else jax.NamedSharding(
        mesh, jax.sharding.PartitionSpec()
    )
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or device), item)
    shape = jax.tree.structure(item)

    def to_read(key_path: tuple, x: Any) -> Any:
        name = alias.get(_name(key_path), _name(key_path))
        if name in widened:
            x = jax.ShapeDtypeStruct(x.shape, jnp.uint8, sharding=x.sharding)
        return {"value": x} if name != _name(key_path) else x

    read = jax.tree_util.tree_map_with_path(to_read, item)
    read = _without_empty(read)
    # Every entry was compared above, so Orbax reads only what `read` names: a partial restore, which
    # also lets the two trees differ in empty containers (an optax `EmptyState`, a `{}` collection).
    args = ocp.args.PyTreeRestore(
        item=read, restore_args=ocp.checkpoint_utils.construct_restore_args(read), partial_restore=True
    )
    restored = read if not jax.tree.leaves(read) else _orbax_read(  # no array wanted: nothing to read
        d, lambda: ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(d, args=args),
        lambda: _damaged_entry(ocp, d, read),
    )
    restored = jax.tree.unflatten(shape, jax.tree.leaves(restored))  # `like`'s structure, empty parts too
    if widened:
        narrow = lambda p, x: x.astype(widened[n]) if (n := alias.get(_name(p), _name(p))) in widened else x  # noqa: E731
        restored = jax.tree_util.tree_map_with_path(narrow, restored)
    if ours is not None:
        sums = ours.get("checksums", {})
        got = _checksums({alias.get(n, n): x for n, x in
                          ((_name(p), x) for p, x in jax.tree.leaves_with_path(restored))})
        for name, digest in got.items():
            if name in sums and sums[name] != digest:
                raise CheckpointCorruptError(
                    f"entry `{name}` of the checkpoint at `{d}` is damaged: its checksum is {digest}, "
                    f"but {sums[name]} was saved. Its files changed after the save (a disk or copy "
                    "error): restore an earlier step, or save again.",
                    entry=name,
                    path=d,
                )
            if name not in sums:
                raise CheckpointCorruptError(
                    f"entry `{name}` of the checkpoint at `{d}` has no checksum in its metadata: the "
                    "metadata was changed after the save. Restore an earlier step, or save again.",
                    entry=name,
                    path=d,
                )

    def rekey(key_path: tuple, x: Any) -> Any:
        name = _name(key_path)
        if name in like_keys:
            impl = stored_keys.get(name) or _key_impl(like_keys[name])
            return jax.random.wrap_key_data(x, impl=impl)
        return x

    return jax.tree.unflatten(boxed, jax.tree.leaves(jax.tree_util.tree_map_with_path(rekey, restored)))
