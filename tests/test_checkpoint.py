"""fx.checkpoint: round trips, every restore error at once, atomic saves, sharded restores, Flax checkpoints."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from effax.checkpoint import CheckpointMismatchError, CheckpointNotFoundError

ocp = pytest.importorskip("orbax.checkpoint")
init = jax.nn.initializers


def model(x):
    with fx.scope("dense"):
        w = fx.param("kernel", init.lecun_normal(), (3, 4))
        b = fx.param("bias", init.normal(), (4,), jnp.bfloat16)
    n = fx.local_state("count", lambda: jnp.zeros((), jnp.int32), collection="stats")
    if fx.is_training():
        n.set(n.get() + 1)
    return x @ w + b


T = fx.transform(model)
X = jnp.ones((2, 3))
KEY = jax.random.key(0)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def variables():
    v = T.init(KEY, X)
    _, updates = T.apply(v, X, training=True, mutable=True)
    return {**v, **updates}


def test_round_trip_into_abstract_variables(tmp_path, variables):
    written = fx.checkpoint.save(tmp_path / "ckpt", variables)
    assert os.fspath(written) == str(tmp_path / "ckpt")
    restored = fx.checkpoint.restore(tmp_path / "ckpt", like=jax.eval_shape(T.init, KEY, X))
    assert_same(restored, variables)
    assert restored["stats"]["count"] == 1
    assert restored["params"]["dense"]["bias"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(T.apply(restored, X, training=False), T.apply(variables, X, training=False))


def test_round_trip_into_concrete_variables_and_empty_collections(tmp_path):
    v = {"params": {}, "state": {"a": {"b": jnp.arange(3)}}}
    fx.checkpoint.save(str(tmp_path / "c"), v)
    assert_same(fx.checkpoint.restore(str(tmp_path / "c"), like=v), v)
    fx.checkpoint.save(tmp_path / "s", {"step": jnp.array(3)})
    assert fx.checkpoint.restore(tmp_path / "s", like={"step": 0})["step"] == 3  # Python scalars work as `like`


def test_restore_places_arrays_on_the_like_sharding(tmp_path, variables):
    fx.checkpoint.save(tmp_path / "c", variables)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), jax.eval_shape(T.init, KEY, X)
    )
    restored = fx.checkpoint.restore(tmp_path / "c", like=like)
    assert all(a.sharding == device for a in jax.tree.leaves(restored))


def test_steps_and_latest(tmp_path, variables):
    one = jax.tree.map(jnp.ones_like, variables)
    fx.checkpoint.save(tmp_path, variables, step=1)
    fx.checkpoint.save(tmp_path, one, step=12)
    fx.checkpoint.save(tmp_path, variables, step=3)
    assert fx.checkpoint.steps(tmp_path) == [1, 3, 12]
    assert fx.checkpoint.steps(tmp_path / "nothing") == []
    assert_same(fx.checkpoint.restore(tmp_path, like=variables), one)
    assert_same(fx.checkpoint.restore(tmp_path, like=variables, step=3), variables)


def test_every_mismatch_is_reported_at_once(tmp_path, variables):
    fx.checkpoint.save(tmp_path / "c", variables)
    like = jax.eval_shape(T.init, KEY, X)
    like["params"]["dense"]["kernal"] = like["params"]["dense"].pop("kernel")  # a typo: missing + unexpected
    like["params"]["dense"]["bias"] = jax.ShapeDtypeStruct((4,), jnp.float32)  # mis-typed
    like["stats"]["count"] = jax.ShapeDtypeStruct((2,), jnp.int32)  # mis-shaped
    with pytest.raises(CheckpointMismatchError) as info:
        fx.checkpoint.restore(tmp_path / "c", like=like)
    e = info.value
    assert isinstance(e, fx.EffaxError) and isinstance(e, ValueError)
    assert e.missing == ["params:dense/kernal (float32[3, 4]); nearest in the checkpoint: 'params:dense/kernel'"]
    assert e.unexpected == ["params:dense/kernel (float32[3, 4])"]
    assert e.mis_shaped == ["stats:count: like int32[2], checkpoint int32[]"]
    assert e.mis_typed == ["params:dense/bias: like float32[4], checkpoint bfloat16[4]"]
    message = str(e)
    assert "does not match `like` (4 problems)" in message
    for line in ("  missing: params:dense/kernal", "  unexpected: params:dense/kernel",
                 "  mis-shaped: stats:count", "  mis-typed: params:dense/bias"):
        assert line in message
    assert "strict=False" in message and "jax.eval_shape(t.init" in message
    assert type(e).__module__ == "effax"


def test_strict_false_skips_entries_like_does_not_name(tmp_path, variables):
    train_state = {"step": jnp.array(7), "params": variables["params"], "opt_state": {"mu": jnp.ones(3)}}
    fx.checkpoint.save(tmp_path / "c", train_state)
    like = {"params": jax.eval_shape(T.init, KEY, X)["params"]}
    with pytest.raises(CheckpointMismatchError, match="unexpected: opt_state:mu"):
        fx.checkpoint.restore(tmp_path / "c", like=like)
    restored = fx.checkpoint.restore(tmp_path / "c", like=like, strict=False)
    assert_same(restored, {"params": variables["params"]})
    with pytest.raises(CheckpointMismatchError, match="missing: stats:count"):
        fx.checkpoint.restore(tmp_path / "c", like=jax.eval_shape(T.init, KEY, X), strict=False)


def test_not_found(tmp_path, variables):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at `.*nowhere`"):
        fx.checkpoint.restore(tmp_path / "nowhere", like=variables)
    fx.checkpoint.save(tmp_path / "run", variables, step=5)
    with pytest.raises(CheckpointNotFoundError, match=r"steps saved under `.*run`: \[5\]"):
        fx.checkpoint.restore(tmp_path / "run", like=variables, step=4)
    assert isinstance(CheckpointNotFoundError("x"), FileNotFoundError)


def test_save_needs_a_dict(tmp_path):
    with pytest.raises(fx.EffaxError, match="must be a dict"):
        fx.checkpoint.save(tmp_path / "c", [jnp.ones(2)])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, variables, monkeypatch):
    path = tmp_path / "c"
    fx.checkpoint.save(path, variables)
    real_save = ocp.Checkpointer.save

    def write_then_fail(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # the new checkpoint is fully written...
        raise OSError("disk full")  # ...and then the save fails

    def fail_at_once(self, directory, *args, **kwargs):
        raise KeyboardInterrupt

    newer = jax.tree.map(jnp.zeros_like, variables)
    for broken in (write_then_fail, fail_at_once):
        monkeypatch.setattr(ocp.Checkpointer, "save", broken)
        with pytest.raises((OSError, KeyboardInterrupt)):
            fx.checkpoint.save(path, newer)
        assert sorted(os.listdir(tmp_path)) == ["c"]  # no temp directories left behind
        assert_same(fx.checkpoint.restore(path, like=variables), variables)
    monkeypatch.setattr(ocp.Checkpointer, "save", real_save)
    fx.checkpoint.save(path, newer)
    assert_same(fx.checkpoint.restore(path, like=variables), newer)


@pytest.mark.parametrize("point, kept", [("start", "old"), ("written", "old"), ("synced", "old"),
                                          ("moved_old", "old"), ("committed", "new"), ("done", "new")])
def test_a_save_interrupted_in_process_rolls_back_or_keeps_the_new(tmp_path, variables, monkeypatch, point, kept):
    """An exception (Ctrl-C) at any step of a save: the previous checkpoint comes back, or the committed new one
    stays; nothing is left beside it. (A killed process is tests/checkpoint/test_faults.py.)"""
    newer = jax.tree.map(jnp.zeros_like, variables)
    for step, path in ((None, tmp_path / "c"), (4, tmp_path / "run")):
        fx.checkpoint.save(path, variables, step=step)

        def interrupt(at):
            if at == point:
                raise KeyboardInterrupt

        monkeypatch.setattr(fx.checkpoint, "_fault", interrupt)
        with pytest.raises(KeyboardInterrupt):
            fx.checkpoint.save(path, newer, step=step)
        monkeypatch.undo()
        assert not [n for n in os.listdir(path.parent) + os.listdir(path) if ".effax-" in n]
        if step is not None:
            assert fx.checkpoint.steps(path) == [4]
        assert_same(fx.checkpoint.restore(path, like=variables, step=step), newer if kept == "new" else variables)


def test_a_crash_between_the_renames_leaves_the_step_listed(tmp_path, variables):
    """What a process killed between moving the old checkpoint aside and moving the new one in leaves
    (made by hand here): the step stays listed and restores; the next restore moves it back."""
    fx.checkpoint.save(tmp_path / "run", variables, step=4)
    dead = 2**22 + 12345  # above any pid this machine hands out
    host = fx.checkpoint._host()
    os.rename(tmp_path / "run" / "4", tmp_path / "run" / f"4.effax-old-{dead}-{host}")
    os.mkdir(tmp_path / "run" / f"4.effax-tmp-{dead}-{host}")  # the new one, never renamed in
    assert fx.checkpoint.steps(tmp_path / "run") == [4]
    assert_same(fx.checkpoint.restore(tmp_path / "run", like=variables), variables)
    assert sorted(os.listdir(tmp_path / "run")) == ["4"]


def test_leftovers_of_a_save_still_running_are_left_alone(tmp_path, variables):
    """A restore (an eval job) beside a save in progress (this process, or another host) touches nothing of it."""
    fx.checkpoint.save(tmp_path / "run", variables, step=1)
    running = [f"2.effax-tmp-{os.getpid()}-{fx.checkpoint._host()}", "3.effax-tmp-4242-0badf00d"]
    for name in running:
        (tmp_path / "run" / name).mkdir()
        (tmp_path / "run" / name / "data").write_text("being written")
    assert_same(fx.checkpoint.restore(tmp_path / "run", like=variables), variables)
    assert fx.checkpoint.steps(tmp_path / "run") == [1]
    assert sorted(os.listdir(tmp_path / "run")) == ["1", *sorted(running)]


def test_leftovers_of_another_host_untouched_for_an_hour_are_cleaned(tmp_path, variables, monkeypatch):
    """A restarted job often runs on another host: what its crashed save left is cleaned once nothing in it
    has changed for `_STALE_SECONDS` (a running save writes its files all along); a fresh one is kept."""
    fx.checkpoint.save(tmp_path / "run", variables, step=1)
    other = "0badf00d" if fx.checkpoint._host() != "0badf00d" else "0badf00e"
    crashed = tmp_path / "run" / f"2.effax-tmp-4242-{other}"
    crashed.mkdir()
    (crashed / "data").write_text("half written")
    moved_aside = tmp_path / "run" / f"1.effax-old-4242-{other}"  # the commit of a new step 1 never finished
    os.rename(tmp_path / "run" / "1", moved_aside)
    assert sorted(os.listdir(tmp_path / "run")) == sorted([crashed.name, moved_aside.name])  # fresh: kept
    assert fx.checkpoint.steps(tmp_path / "run") == [1]
    monkeypatch.setattr(fx.checkpoint, "_STALE_SECONDS", -1.0)  # as an hour later
    assert_same(fx.checkpoint.restore(tmp_path / "run", like=variables), variables)
    assert sorted(os.listdir(tmp_path / "run")) == ["1"]  # step 1 moved back, the temp copy gone


def test_foreign_targets_are_refused_and_kept(tmp_path, variables):
    """A directory that is not an effax checkpoint is never replaced; its files survive every attempt."""
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    (work / "logs" / "a.log").write_text("log")
    with pytest.raises(fx.EffaxError, match=r"refusing to save to `.*work`: it holds files \(logs/, notes.txt\)"):
        fx.checkpoint.save(work, variables)
    # with `step=` only `work/3` is written, beside the user's files
    fx.checkpoint.save(work, variables, step=3)
    assert sorted(os.listdir(work)) == ["3", "logs", "notes.txt"]
    assert (work / "notes.txt").read_text() == "keep me" and (work / "logs" / "a.log").read_text() == "log"
    (work / "5").mkdir()
    (work / "5" / "mine.txt").write_text("x")
    with pytest.raises(fx.EffaxError, match="refusing to save to `.*5`: it holds files"):
        fx.checkpoint.save(work, variables, step=5)
    assert (work / "5" / "mine.txt").read_text() == "x"
    # a file: neither replaced nor used as a directory
    f = tmp_path / "file.bin"
    f.write_bytes(b"data")
    for step in (None, 1):
        with pytest.raises(fx.CheckpointIOError, match="is a file, not a checkpoint directory"):
            fx.checkpoint.save(f, variables, step=step)
    with pytest.raises(fx.CheckpointIOError, match="cannot create the checkpoint directory"):
        fx.checkpoint.save(f / "sub", variables)
    assert f.read_bytes() == b"data"
    # an Orbax checkpoint effax did not write
    ocp.PyTreeCheckpointer().save(tmp_path / "flax", {"w": np.ones(2)})
    with pytest.raises(fx.EffaxError, match="an Orbax checkpoint that effax did not write"):
        fx.checkpoint.save(tmp_path / "flax", variables)
    # a single checkpoint cannot hold steps
    fx.checkpoint.save(tmp_path / "single", variables)
    with pytest.raises(fx.EffaxError, match="itself a single checkpoint"):
        fx.checkpoint.save(tmp_path / "single", variables, step=1)
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    fx.checkpoint.save(tmp_path / "empty", variables)
    assert_same(fx.checkpoint.restore(tmp_path / "empty", like=variables), variables)


def test_resaving_a_checkpoint_keeps_the_users_files_in_it(tmp_path, variables):
    """Files a user put inside an effax checkpoint (metrics beside a step) are never deleted by a re-save."""
    fx.checkpoint.save(tmp_path / "run", variables, step=100)
    (tmp_path / "run" / "100" / "eval_metrics.json").write_text('{"acc": 0.93}')
    fx.checkpoint.save(tmp_path / "single", variables)
    (tmp_path / "single" / "notes").mkdir()
    for path, step, shown in ((tmp_path / "run", 100, "eval_metrics.json"), (tmp_path / "single", None, "notes/")):
        with pytest.raises(fx.EffaxError, match=rf"refusing to save to .*: it is an effax checkpoint that also "
                           rf"holds files effax did not write \({shown}\)"):
            fx.checkpoint.save(path, {**variables, "params": jax.tree.map(jnp.zeros_like, variables["params"])},
                               step=step)
        assert_same(fx.checkpoint.restore(path, like=variables), variables)  # the old checkpoint, unchanged
        parent = path if step else tmp_path
        assert not [n for n in os.listdir(parent) if ".effax-" in n]  # the new one's temp directory is gone
    assert (tmp_path / "run" / "100" / "eval_metrics.json").read_text() == '{"acc": 0.93}'
    assert (tmp_path / "single" / "notes").is_dir()
    (tmp_path / "run" / "100" / "eval_metrics.json").unlink()
    fx.checkpoint.save(tmp_path / "run", variables, step=100)  # only what Orbax wrote: replaced as before


def test_empty_containers_need_not_match(tmp_path, variables):
    """An empty collection or an optax `EmptyState` holds no array: whether `like` or the checkpoint has it
    is not a mismatch (Orbax alone would call the checkpoint damaged)."""
    empty_opt = ((), ())  # as `optax.sgd(...).init(params)`: two `EmptyState()`s
    cases = [  # saved extra, like extra, strict
        ({"opt_state": empty_opt}, {}, False),
        ({"batch_stats": {}}, {}, True),
        ({}, {"batch_stats": {}}, True),
        ({"opt_state": empty_opt}, {"opt_state": empty_opt}, True),
    ]
    like = jax.eval_shape(T.init, KEY, X)
    for i, (saved, wanted, strict) in enumerate(cases):
        fx.checkpoint.save(tmp_path / str(i), {**variables, **saved})
        restored = fx.checkpoint.restore(tmp_path / str(i), like={**like, **wanted}, strict=strict)
        assert_same(restored, {**variables, **wanted})
    assert fx.checkpoint.restore(tmp_path / "0", like={"params": {}}, strict=False) == {"params": {}}
    with pytest.raises(fx.EffaxError, match=r"`variables` holds no arrays \(\['params'\]\)"):
        fx.checkpoint.save(tmp_path / "nothing", {"params": {}})


def test_saving_without_a_step_over_steps_is_an_error(tmp_path, variables):
    for n in (100, 200):
        fx.checkpoint.save(tmp_path / "run", variables, step=n)
    with pytest.raises(fx.EffaxError, match=r"holds the steps \[100, 200\].*step=201"):
        fx.checkpoint.save(tmp_path / "run", variables)
    assert fx.checkpoint.steps(tmp_path / "run") == [100, 200]


@pytest.mark.parametrize("step", [-1, "latest", "3", 1.5, True])
def test_steps_are_non_negative_ints(tmp_path, variables, step):
    with pytest.raises(fx.EffaxError, match=r"a step is a non-negative int"):
        fx.checkpoint.save(tmp_path, variables, step=step)
    with pytest.raises(fx.EffaxError, match=r"a step is a non-negative int"):
        fx.checkpoint.restore(tmp_path, like=variables, step=step)
    assert os.listdir(tmp_path) == []


def test_numpy_int_steps(tmp_path, variables):
    fx.checkpoint.save(tmp_path, variables, step=np.int64(3))
    assert fx.checkpoint.steps(tmp_path) == [3]
    assert_same(fx.checkpoint.restore(tmp_path, like=variables, step=np.int32(3)), variables)


def test_typed_keys_round_trip(tmp_path):
    v = {"params": {"w": jnp.ones(2)},
         "rng": {"fry": jax.random.key(3), "rbg": jax.random.split(jax.random.key(4, impl="rbg"), 5)},
         "raw": {"k": jax.random.PRNGKey(5)}}
    fx.checkpoint.save(tmp_path / "c", v)
    for like in (v, jax.eval_shape(lambda: v)):
        r = fx.checkpoint.restore(tmp_path / "c", like=like)
        assert r["rng"]["fry"].dtype == v["rng"]["fry"].dtype and r["rng"]["rbg"].dtype == v["rng"]["rbg"].dtype
        for name in ("fry", "rbg"):
            np.testing.assert_array_equal(jax.random.key_data(r["rng"][name]), jax.random.key_data(v["rng"][name]))
        np.testing.assert_array_equal(r["raw"]["k"], v["raw"]["k"])
        assert jax.random.normal(r["rng"]["fry"]) == jax.random.normal(v["rng"]["fry"])
    wrong = {**v, "rng": {"fry": jax.random.key_data(v["rng"]["fry"]), "rbg": v["rng"]["rbg"]}}
    with pytest.raises(CheckpointMismatchError, match=r"mis-typed: rng:fry: like uint32\[2\], checkpoint key<fry>\[\]"):
        fx.checkpoint.restore(tmp_path / "c", like=wrong)


def test_restore_does_not_pick_up_arbitrary_subdirectories(tmp_path, variables):
    fx.checkpoint.save(tmp_path / "models" / "backup", variables)
    with pytest.raises(CheckpointNotFoundError, match=r"holds the checkpoints \['backup'\]. Pass the one"):
        fx.checkpoint.restore(tmp_path / "models", like=variables)
    assert_same(fx.checkpoint.restore(tmp_path / "models" / "backup", like=variables), variables)
    assert fx.checkpoint.steps(tmp_path / "models") == []
    (tmp_path / "models" / "7").mkdir()  # a directory named like a step, but empty: not a step
    assert fx.checkpoint.steps(tmp_path / "models") == []


def test_restore_argument_errors(tmp_path, variables):
    fx.checkpoint.save(tmp_path / "c", variables)
    with pytest.raises(fx.EffaxError, match=r"`like` must be the variables to restore into.*jax.eval_shape"):
        fx.checkpoint.restore(tmp_path / "c", like=None)
    f = tmp_path / "c" / "_METADATA"
    with pytest.raises(fx.CheckpointIOError, match="is a file, not a checkpoint directory"):
        fx.checkpoint.restore(f, like=variables)
    with pytest.raises(fx.CheckpointIOError, match="is a file"):
        fx.checkpoint.steps(f)
    with pytest.raises(fx.EffaxError, match=r"`like` entry `params:w` is None"):
        fx.checkpoint.restore(tmp_path / "c", like={"params": {"w": None}})


@pytest.mark.parametrize("leaf", ["text", None, object()], ids=["str", "None", "object"])
def test_save_refuses_leaves_that_are_not_arrays(tmp_path, variables, leaf):
    with pytest.raises(fx.EffaxError, match=r"`params:bad` in `variables` is .*not an array"):
        fx.checkpoint.save(tmp_path / "c", {**variables, "params": {**variables["params"], "bad": leaf}})
    assert os.listdir(tmp_path) == []


def _data_file(path):
    found = [os.path.join(w, f) for w, _, fs in os.walk(path) for f in fs]
    found = [f for f in found if os.sep + "d" + os.sep in f]
    return max(found, key=os.path.getsize)


def _value_start(b):
    """Where the largest compressed frame of a data file starts: the value of `params:big`. OCDBT may put a
    B-tree node before it in the same file, and a node is read from the cache the save filled, not the file."""
    starts = [i for i in range(len(b) - 3) if b[i:i + 4] == b"\x28\xb5\x2f\xfd"] or [0]  # zstd's magic
    return max(starts, key=lambda i: min([j for j in starts if j > i] + [len(b)]) - i)


def _flip(offset):
    def damage(path):
        f = _data_file(path)
        b = bytearray(open(f, "rb").read())
        b[(_value_start(b) + offset) % len(b)] ^= 0x01
        open(f, "wb").write(bytes(b))
    return damage


def _overwrite_4k(path):
    f = _data_file(path)
    b = bytearray(open(f, "rb").read())
    b[: min(4096, len(b))] = bytes(range(256)) * 16 if len(b) >= 4096 else bytes(len(b))
    open(f, "wb").write(bytes(b))


def _truncate(path):
    f = _data_file(path)
    b = open(f, "rb").read()
    open(f, "wb").write(b[: len(b) // 2])


def _remove(name):
    def damage(path):
        target = os.path.join(path, name)
        if name == "d":
            for w, _, fs in os.walk(target):
                for x in fs:
                    os.remove(os.path.join(w, x))
        else:
            os.remove(target)
    return damage


def _garbage_metadata(path):
    open(os.path.join(path, "_METADATA"), "w").write("{garbage")


def _drop_checksum(path):
    import json

    f = os.path.join(path, "_METADATA")
    meta = json.loads(open(f).read())
    meta["custom_metadata"]["effax"]["checksums"].pop("params:big")
    open(f, "w").write(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, entry",
    [
        (_flip(100), "params:big"),  # one byte of the value: a checksum mismatch
        (_flip(0), "params:big"),  # one byte of the value's frame header: unreadable
        (_overwrite_4k, "params:big"),
        (_truncate, "params:big"),
        (_remove("d"), None),
        (_remove("manifest.ocdbt"), None),
        (_remove("_METADATA"), None),
        (_garbage_metadata, None),
        (_drop_checksum, "params:big"),
    ],
    ids=["flip-byte", "flip-header", "overwrite-4k", "truncate", "delete-data", "delete-manifest",
         "delete-metadata", "garbage-metadata", "drop-checksum"],
)
def test_damaged_files_raise_checkpoint_corrupt_error(tmp_path, damage, entry):
    v = {"params": {"big": jnp.arange(1000.0), "small": jnp.ones((3, 4), jnp.bfloat16)}, "state": {"n": jnp.array(3)}}
    path = tmp_path / "c"
    fx.checkpoint.save(path, v)
    damage(str(path))
    with pytest.raises(fx.CheckpointCorruptError) as info:
        fx.checkpoint.restore(path, like=v)
    e = info.value
    assert isinstance(e, fx.EffaxError) and type(e).__module__ == "effax"
    assert str(path) in str(e) and "restore an earlier step, or save again" in str(e).lower()
    if entry is not None:
        assert e.entry == entry and f"`{entry}`" in str(e)
    assert "tensorstore_spec" not in str(e) and "pybind11" not in str(e)


def test_checksums_catch_silent_changes_of_any_word():
    """The checksum sees one changed word anywhere, of every dtype, and the order of the words."""
    from effax.checkpoint import _checksums

    for x in (jnp.arange(12.0).reshape(3, 4), jnp.arange(7, dtype=jnp.bfloat16), jnp.arange(5, dtype=jnp.int8),
              jnp.array([True, False]), jnp.arange(3, dtype=jnp.uint16), jnp.array([1 + 2j], jnp.complex64)):
        base = _checksums({"x": x})["x"]
        flat = np.asarray(x).reshape(-1)
        for i in range(flat.size):
            changed = flat.copy()
            changed.view(np.uint8)[i * changed.itemsize] ^= 1
            assert _checksums({"x": jnp.asarray(changed.reshape(x.shape))})["x"] != base, (x.dtype, i)
        if flat.size > 1 and flat[0] != flat[1]:
            swapped = flat.copy()
            swapped[[0, 1]] = swapped[[1, 0]]
            assert _checksums({"x": jnp.asarray(swapped.reshape(x.shape))})["x"] != base


def test_storage_failures_name_the_path(tmp_path, variables, monkeypatch):
    def full(self, directory, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.Checkpointer, "save", full)
    with pytest.raises(fx.CheckpointIOError, match=r"cannot write the checkpoint `.*c`: .*No space left") as info:
        fx.checkpoint.save(tmp_path / "c", variables)
    assert isinstance(info.value, OSError)
    assert os.listdir(tmp_path) == []


def flax_mlp():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(5)(x))
            return nn.Dense(2)(h)

    return MLP()


def effax_mlp(x):
    """The same MLP as `flax_mlp`, with the paths Flax gives it."""
    for i, width in enumerate((5, 2)):
        with fx.scope(f"Dense_{i}"):
            w = fx.param("kernel", init.lecun_normal(), (x.shape[-1], width))
            x = x @ w + fx.param("bias", init.zeros, (width,))
        x = jax.nn.relu(x) if i == 0 else x
    return x


def test_flax_checkpoints_load_into_effax_variables(tmp_path):
    module = flax_mlp()
    flax_variables = module.init(jax.random.key(1), X)
    checkpointer = ocp.StandardCheckpointer()  # what the Flax docs use
    checkpointer.save(tmp_path / "flax", flax_variables)
    checkpointer.wait_until_finished()
    t = fx.transform(effax_mlp)
    restored = fx.checkpoint.restore(tmp_path / "flax", like=jax.eval_shape(t.init, KEY, X))
    np.testing.assert_allclose(t.apply(restored, X), module.apply(flax_variables, X), rtol=1e-6)


def test_flax_checkpoints_load_into_from_flax_models(tmp_path):
    module = flax_mlp()
    flax_variables = module.init(jax.random.key(1), X)
    ocp.PyTreeCheckpointer().save(tmp_path / "flax", flax_variables)  # the older Flax recipe
    t = fx.transform(fx.from_flax(module))
    restored = fx.checkpoint.restore(tmp_path / "flax", like=jax.eval_shape(t.init, KEY, X))
    np.testing.assert_array_equal(t.apply(restored, X), module.apply(flax_variables, X))


def test_flax_checkpoint_manager_layout_loads(tmp_path):
    module = flax_mlp()
    flax_variables = module.init(jax.random.key(1), X)
    with ocp.CheckpointManager(tmp_path / "run") as manager:
        for step in (1, 2):
            manager.save(step, args=ocp.args.StandardSave(flax_variables))
        manager.wait_until_finished()
    t = fx.transform(effax_mlp)
    restored = fx.checkpoint.restore(tmp_path / "run", like=jax.eval_shape(t.init, KEY, X))
    np.testing.assert_allclose(t.apply(restored, X), module.apply(flax_variables, X), rtol=1e-6)


@pytest.mark.slow  # a fresh interpreter importing JAX: CI runs it
def test_import_effax_does_not_import_orbax():
    code = "import sys, effax; assert not [m for m in sys.modules if m.startswith('orbax')]; print('OK')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "OK", done.stderr[-2000:]


EIGHT_DEVICES = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    import effax as fx
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    variables = {"params": {"w": put(jnp.arange(64.0).reshape(8, 8), "data", "model"),
                            "b": put(jnp.arange(8.0), "model")}}
    fx.checkpoint.save(sys.argv[1], variables)
    # restore onto other shardings than it was saved with
    like = {"params": {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, P("model", None))),
                       "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, P()))}}
    restored = fx.checkpoint.restore(sys.argv[1], like=like)
    for name in ("w", "b"):
        a = restored["params"][name]
        assert a.sharding == like["params"][name].sharding, a.sharding
        assert np.array_equal(np.asarray(a), np.asarray(variables["params"][name]))
    assert {s.data.shape for s in restored["params"]["w"].addressable_shards} == {(4, 8)}
    print("OK")
    """
)


@pytest.mark.slow  # a subprocess on 8 host devices: CI runs it
def test_sharded_save_and_restore_on_eight_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, str(tmp_path / "sharded")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


BAD_SHARDING = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    import effax as fx
    from jax.sharding import NamedSharding, PartitionSpec as P

    v = {"params": {"d": {"kernel": jnp.arange(96.0).reshape(8, 12)}}}
    fx.checkpoint.save(sys.argv[1], v)
    mesh = jax.make_mesh((8,), ("model",))
    for spec, words in [
        (P(None, "model"), "dimension 1 has size 12, which mesh axis 'model' (size 8) cannot split"),
        (P("model", None), None),  # divides: no error
    ]:
        kernel = jax.ShapeDtypeStruct((8, 12), jnp.float32, sharding=NamedSharding(mesh, spec))
        like = {"params": {"d": {"kernel": kernel}}}
        try:
            fx.checkpoint.restore(sys.argv[1], like=like)
        except fx.CheckpointCorruptError as e:
            raise AssertionError(f"an intact checkpoint reported corrupt: {e}")
        except fx.sharding.ShardingError as e:
            assert words and "`like` entry `params:d/kernel` (float32[8, 12])" in str(e) and words in str(e), e
            assert "The checkpoint is fine" in str(e), e
        else:
            assert words is None, "no error"
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    like = {"params": {"d": {"kernel": jax.ShapeDtypeStruct((8, 12), jnp.float32,
                                                            sharding=NamedSharding(mesh, P(None, ("data", "model"))))}}}
    try:
        fx.checkpoint.restore(sys.argv[1], like=like)
    except fx.sharding.ShardingError as e:
        assert "mesh axes ('data', 'model') (sizes 4 x 2 = 8)" in str(e), e
    else:
        raise AssertionError("no error")
    for spec in (P("data", "model"), P(None, "model")):  # an Explicit mesh axis on the minor dimension too
        good = fx.checkpoint.restore(sys.argv[1], like={"params": {"d": {"kernel": jax.ShapeDtypeStruct(
            (8, 12), jnp.float32, sharding=NamedSharding(mesh, spec))}}})
        assert good["params"]["d"]["kernel"].sharding.spec == spec
        assert np.array_equal(np.asarray(good["params"]["d"]["kernel"]), np.asarray(v["params"]["d"]["kernel"]))
    print("OK")
    """
)


def test_a_like_sharding_that_cannot_split_an_entry_is_refused_before_reading(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", BAD_SHARDING, str(tmp_path / "c")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


ABSTRACT_MESH = """
import sys
import jax, jax.numpy as jnp
import effax as fx
mesh = jax.make_mesh((8,), ("data",))
state = {
    "params": {"w": jax.device_put(jnp.ones((8, 4)), jax.NamedSharding(mesh, jax.P("data")))},
    "step": jnp.array(3), "key": jax.random.key(1),
}
fx.checkpoint.save(sys.argv[1], state)
like = jax.eval_shape(lambda: state)  # shardings on an abstract mesh
try:
    fx.checkpoint.restore(sys.argv[1], like=like)
    raise SystemExit("an abstract mesh was not refused")
except fx.CheckpointCorruptError as e:
    raise SystemExit(f"reported as corrupt: {e}")
except fx.sharding.ShardingError as e:
    assert "abstract mesh (data: 8)" in str(e) and "jax.set_mesh" in str(e), e
with jax.set_mesh(mesh):
    restored = fx.checkpoint.restore(sys.argv[1], like=like)
assert restored["params"]["w"].sharding.is_equivalent_to(state["params"]["w"].sharding, 2)
# entries `like` gives no sharding are replicated on the others' mesh: the restored state enters a jitted step
plain = {**like, "step": jax.ShapeDtypeStruct((), jnp.int32), "key": jax.eval_shape(lambda: jax.random.key(0))}
plain["params"] = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=jax.NamedSharding(mesh, jax.P("data")))}
restored = fx.checkpoint.restore(sys.argv[1], like=plain)
assert restored["step"].sharding == jax.NamedSharding(mesh, jax.P()), restored["step"].sharding
step = jax.jit(lambda s: {**s, "step": s["step"] + 1, "key": jax.random.split(s["key"])[0]})
step(restored)
# a `like` with no sharding at all, restored inside `set_mesh` (the checksums ran under the context mesh on
# one-device arrays: a raw "incompatible devices" ValueError)
bare = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), like)
with jax.set_mesh(mesh):
    restored = fx.checkpoint.restore(sys.argv[1], like=bare)
assert (restored["params"]["w"] == 1).all() and int(restored["step"]) == 3
print("OK")
"""


def test_like_from_eval_shape_of_sharded_arrays_and_unsharded_entries_beside_them(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", ABSTRACT_MESH, str(tmp_path / "c")], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


def test_running_out_of_memory_while_reading_is_not_corruption(tmp_path, variables, monkeypatch):
    fx.checkpoint.save(tmp_path / "c", variables)

    def exhausted(self, directory, *args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB.")

    monkeypatch.setattr(ocp.Checkpointer, "restore", exhausted)
    with pytest.raises(fx.EffaxError, match=r"not enough memory to restore the checkpoint at `.*c`") as info:
        fx.checkpoint.restore(tmp_path / "c", like=variables)
    assert not isinstance(info.value, fx.CheckpointCorruptError)


def boxed_flax_variables():
    nn = pytest.importorskip("flax.linen")

    class Logical(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(4, kernel_init=init)(x)

    module = Logical()
    return module, module.init(jax.random.key(1), X)


def test_boxed_flax_variables_are_saved_unboxed(tmp_path):
    nn = pytest.importorskip("flax.linen")
    module, boxed = boxed_flax_variables()
    t = fx.transform(fx.from_flax(module))
    fx.checkpoint.save(tmp_path / "c", boxed)
    meta = ocp.PyTreeCheckpointHandler().metadata(tmp_path / "c")
    stored = [key for key, _ in jax.tree.leaves_with_path(getattr(meta, "tree", meta))]
    assert not any("value" in jax.tree_util.keystr(k) for k in stored), stored
    restored = fx.checkpoint.restore(tmp_path / "c", like=jax.eval_shape(t.init, KEY, X))
    assert_same(restored, nn.meta.unbox(boxed))
    # boxed `like` (what `jax.eval_shape(module.init, ...)` gives) gets its boxes back around the arrays
    again = fx.checkpoint.restore(tmp_path / "c", like=jax.eval_shape(module.init, KEY, X))
    assert isinstance(again["params"]["Dense_0"]["kernel"], nn.LogicallyPartitioned)
    assert again["params"]["Dense_0"]["kernel"].names == ("embed", "mlp")
    assert_same(nn.meta.unbox(again), nn.meta.unbox(boxed))


@pytest.mark.parametrize("like_boxed", [False, True], ids=["unboxed-like", "boxed-like"])
def test_checkpoints_of_boxed_flax_variables_written_by_orbax_load(tmp_path, like_boxed):
    nn = pytest.importorskip("flax.linen")
    module, boxed = boxed_flax_variables()
    checkpointer = ocp.StandardCheckpointer()  # stores each box as `<path>/value`
    checkpointer.save(tmp_path / "flax", boxed)
    checkpointer.wait_until_finished()
    t = fx.transform(fx.from_flax(module))
    like = jax.eval_shape(module.init if like_boxed else t.init, KEY, X)
    restored = fx.checkpoint.restore(tmp_path / "flax", like=like)
    assert_same(nn.meta.unbox(restored), nn.meta.unbox(boxed))
    np.testing.assert_array_equal(t.apply(restored, X), module.apply(boxed, X))


@pytest.mark.parametrize("dtype", [jnp.int4, jnp.uint4, jnp.int2, jnp.uint2, jnp.float4_e2m1fn],
                         ids=["int4", "uint4", "int2", "uint2", "float4"])
def test_sub_byte_dtypes_round_trip(tmp_path, dtype):
    w = (jnp.arange(32).reshape(8, 4) % 4).astype(dtype)
    v = {"params": {"w": w}}
    fx.checkpoint.save(tmp_path / "c", v)
    restored = fx.checkpoint.restore(tmp_path / "c", like=jax.eval_shape(lambda: v))
    assert restored["params"]["w"].dtype == dtype
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(w))


def test_sub_byte_checksums_see_each_element():
    from effax.checkpoint import _checksums

    for dtype in (jnp.int4, jnp.uint4):
        x = jnp.arange(6).astype(dtype)
        base = _checksums({"x": x})["x"]
        for i in range(6):
            assert _checksums({"x": x.at[i].set((i + 1) % 6)})["x"] != base, (dtype, i)
        assert _checksums({"x": x[::-1]})["x"] != base


def test_a_like_of_shardings_or_logical_axes_is_refused_with_the_fix(tmp_path):
    def f(x):
        with fx.scope("d"):
            return x @ fx.param("kernel", init.ones, (3, 4), axes=("embed", "mlp"))

    t = fx.transform(f)
    fx.checkpoint.save(tmp_path / "c", t.init(KEY, X))
    s = fx.summary(t, X)
    shardings = fx.sharding.logical_to_mesh(s, jax.make_mesh((1,), ("model",)), [("embed", None), ("mlp", "model")])
    fix = "jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)"
    for like, what in [(shardings, "a NamedSharding"), (fx.sharding.logical_axes(s), "the PartitionSpec"),
                       ({"params": {"d": {"kernel": ("embed", "mlp")}}}, "the str 'embed'")]:
        with pytest.raises(fx.EffaxError, match=f"`like` entry `params:d/kernel.*` is {what}") as info:
            fx.checkpoint.restore(tmp_path / "c", like=like)
        assert fix in str(info.value) and type(info.value) is fx.EffaxError
    with pytest.raises(fx.EffaxError, match=r"`like` entry `params:d/kernel` is a object, not an array"):
        fx.checkpoint.restore(tmp_path / "c", like={"params": {"d": {"kernel": object()}}})
    # the fix works
    like = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        jax.eval_shape(t.init, KEY, X), shardings)
    assert fx.checkpoint.restore(tmp_path / "c", like=like)["params"]["d"]["kernel"].sharding == shardings[
        "params"]["d"]["kernel"]


def test_zero_size_entries_are_refused_before_writing(tmp_path):
    v = {"params": {"w": jnp.ones((4, 4)), "lora": {"a": jnp.zeros((4, 0))}}}
    with pytest.raises(fx.EffaxError, match=r"`params:lora/a` in `variables` is a zero-size array \(float32\[4, 0\]\): "
                       r"Orbax cannot store") as info:
        fx.checkpoint.save(tmp_path / "c", v)
    assert not isinstance(info.value, fx.CheckpointIOError)
    assert "Leave it out" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_boxed_checkpoints_of_an_earlier_effax_are_verified_by_their_checksums(tmp_path, monkeypatch):
    """An effax that did not unbox wrote `kernel/value`, with the checksum under that name: still verified."""
    import effax.checkpoint as checkpoint

    module, boxed = boxed_flax_variables()
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_is_box", lambda x: False)  # the save of an effax without unboxing
        fx.checkpoint.save(tmp_path / "c", boxed)
    like = jax.eval_shape(fx.transform(fx.from_flax(module)).init, KEY, X)
    restored = fx.checkpoint.restore(tmp_path / "c", like=like)
    np.testing.assert_array_equal(restored["params"]["Dense_0"]["kernel"], boxed["params"]["Dense_0"]["kernel"].value)
    real = checkpoint._checksums
    monkeypatch.setattr(checkpoint, "_checksums",
                        lambda leaves: {n: "0" * 16 if "kernel" in n else d for n, d in real(leaves).items()})
    with pytest.raises(fx.CheckpointCorruptError, match=r"entry `params:Dense_0/kernel/value`.*checksum"):
        fx.checkpoint.restore(tmp_path / "c", like=like)
