"""fx.checkpoint and symbolic links, leftovers that resist cleaning, user files deep in a checkpoint, key types.

A save to a link writes through it (the link stays a link, to the new
checkpoint); a leftover that is a link is unlinked, never followed; a
leftover that cannot be removed blocks nothing but a save of its own
target; a file effax did not write is never deleted, at any depth.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx

pytest.importorskip("orbax.checkpoint")

V1 = {"params": {"w": jnp.ones(3)}}
V2 = {"params": {"w": 2 * jnp.ones(3)}}
DEAD = 2**22 + 12345  # above any pid this machine hands out


def restored_w(path, **kwargs):
    return np.asarray(fx.checkpoint.restore(path, like=V1, **kwargs)["params"]["w"])


def leftovers(*dirs):
    return sorted(n for d in dirs for n in os.listdir(d) if ".effax-" in n)


def test_a_save_to_a_link_writes_through_it_and_keeps_the_link(tmp_path):
    disk = tmp_path / "disk" / "run"
    fx.checkpoint.save(disk, V1)
    os.symlink(disk, tmp_path / "run")
    assert os.fspath(fx.checkpoint.save(tmp_path / "run", V2)) == str(tmp_path / "run")
    assert os.path.islink(tmp_path / "run") and os.readlink(tmp_path / "run") == str(disk)
    np.testing.assert_array_equal(restored_w(disk), 2 * np.ones(3))
    np.testing.assert_array_equal(restored_w(tmp_path / "run"), 2 * np.ones(3))
    assert leftovers(tmp_path, tmp_path / "disk") == []
    # the parent stays usable: other checkpoints beside the link save and restore
    fx.checkpoint.save(tmp_path / "other", V1)
    np.testing.assert_array_equal(restored_w(tmp_path / "other"), np.ones(3))
    # a relative link to a directory of steps, and a step that is itself a link
    os.symlink("disk", tmp_path / "steps_link")
    fx.checkpoint.save(tmp_path / "steps_link", V1, step=3)
    os.symlink(tmp_path / "disk" / "3", tmp_path / "disk" / "4")
    fx.checkpoint.save(tmp_path / "disk", V2, step=4)
    assert os.path.islink(tmp_path / "disk" / "4")
    np.testing.assert_array_equal(restored_w(tmp_path / "disk", step=3), 2 * np.ones(3))
    assert fx.checkpoint.steps(tmp_path / "steps_link") == [3, 4]


def test_a_save_to_a_link_to_an_empty_directory_fills_that_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "run")
    fx.checkpoint.save(tmp_path / "run", V1)
    assert os.path.islink(tmp_path / "run")
    np.testing.assert_array_equal(restored_w(tmp_path / "empty"), np.ones(3))
    assert leftovers(tmp_path) == []


def test_a_link_that_leads_nowhere_safe_is_refused_and_kept(tmp_path):
    os.symlink(tmp_path / "unmounted" / "run", tmp_path / "run")
    with pytest.raises(fx.CheckpointIOError, match=r"`.*run`: it is a symbolic link to `.*unmounted/run`, whose "
                       r"directory `.*unmounted` does not exist"):
        fx.checkpoint.save(tmp_path / "run", V1)
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    with pytest.raises(fx.CheckpointIOError, match=r"`.*loop_a`: it is a symbolic link that leads back to itself"):
        fx.checkpoint.save(tmp_path / "loop_a", V1)
    assert sorted(os.listdir(tmp_path)) == ["loop_a", "loop_b", "run"]
    assert all(os.path.islink(tmp_path / n) for n in os.listdir(tmp_path))


def test_a_crash_between_the_renames_behind_a_link_leaves_it_restorable(tmp_path):
    """The previous version moved aside beside where the link leads (made by hand): listed, restored, moved back."""
    host = fx.checkpoint._host()
    (tmp_path / "disk").mkdir()
    fx.checkpoint.save(tmp_path / "disk" / "run", V1)
    os.symlink(tmp_path / "disk" / "run", tmp_path / "run")
    os.rename(tmp_path / "disk" / "run", tmp_path / "disk" / f"run.effax-old-{DEAD}-{host}")
    np.testing.assert_array_equal(restored_w(tmp_path / "run"), np.ones(3))
    assert sorted(os.listdir(tmp_path / "disk")) == ["run"]
    # a step that is a link, its directory moved aside: still listed, and restored
    fx.checkpoint.save(tmp_path / "disk" / "steps", V1, step=1)
    fx.checkpoint.save(tmp_path / "elsewhere" / "2", V2)
    os.symlink(tmp_path / "elsewhere" / "2", tmp_path / "disk" / "steps" / "2")
    os.rename(tmp_path / "elsewhere" / "2", tmp_path / "elsewhere" / f"2.effax-old-{DEAD}-{host}")
    assert fx.checkpoint.steps(tmp_path / "disk" / "steps") == [1, 2]
    np.testing.assert_array_equal(restored_w(tmp_path / "disk" / "steps", step=2), 2 * np.ones(3))


def test_a_leftover_that_is_a_link_is_unlinked_not_followed(tmp_path):
    """What an older effax left after a save to a link: `run.effax-old-...` is the user's link itself."""
    host = fx.checkpoint._host()
    fx.checkpoint.save(tmp_path / "disk" / "run", V1)
    (tmp_path / "disk" / "run" / "notes.txt").write_text("mine")
    fx.checkpoint.save(tmp_path / "run", V2)
    os.symlink(tmp_path / "disk" / "run", tmp_path / f"run.effax-old-{DEAD}-{host}")
    fx.checkpoint.save(tmp_path / "other", V1)  # cleans the leftover of `run`: the link goes, not what it leads to
    assert leftovers(tmp_path) == []
    assert (tmp_path / "disk" / "run" / "notes.txt").read_text() == "mine"
    np.testing.assert_array_equal(restored_w(tmp_path / "disk" / "run"), np.ones(3))
    # one that leads nowhere goes too
    os.symlink(tmp_path / "nowhere", tmp_path / f"other.effax-tmp-{DEAD}-{host}")
    np.testing.assert_array_equal(restored_w(tmp_path / "other"), np.ones(3))
    assert leftovers(tmp_path) == []


def test_a_leftover_that_cannot_be_removed_blocks_only_its_own_target(tmp_path, monkeypatch):
    host = fx.checkpoint._host()
    fx.checkpoint.save(tmp_path / "run", V1)
    fx.checkpoint.save(tmp_path / "other", V1)
    stuck = tmp_path / f"run.effax-tmp-{DEAD}-{host}"
    stuck.mkdir()
    remove = fx.checkpoint._remove

    def refuse_stuck(p):
        if os.fspath(p) == str(stuck):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        remove(p)

    monkeypatch.setattr(fx.checkpoint, "_remove", refuse_stuck)
    fx.checkpoint.save(tmp_path / "other", V2)
    fx.checkpoint.save(tmp_path / "new", V2, step=1)
    np.testing.assert_array_equal(restored_w(tmp_path / "other"), 2 * np.ones(3))
    np.testing.assert_array_equal(restored_w(tmp_path / "run"), np.ones(3))  # its own restore reads on
    with pytest.raises(fx.CheckpointIOError, match=rf"cannot clean up `.*{stuck.name}`, left by an interrupted "
                       r"save of `.*run`: .*Permission denied.*Remove it yourself"):
        fx.checkpoint.save(tmp_path / "run", V2)
    np.testing.assert_array_equal(restored_w(tmp_path / "run"), np.ones(3))
    monkeypatch.setattr(fx.checkpoint, "_remove", remove)
    fx.checkpoint.save(tmp_path / "run", V2)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where, shown", [
    ("descriptor/notes.txt", "descriptor/"),  # a top-level name Orbax may use, not in this checkpoint
    ("d/README.txt", "d/README.txt"),  # beside Orbax's data files
    ("ocdbt.process_0/d/mine.bin", "ocdbt.process_0/d/mine.bin"),
    ("ocdbt.process_0/notes.txt", "ocdbt.process_0/notes.txt"),
    ("ocdbt.process_7/notes.txt", "ocdbt.process_7/"),  # a name Orbax uses on 8 processes
])
def test_user_files_at_any_depth_are_never_deleted(tmp_path, where, shown):
    fx.checkpoint.save(tmp_path / "ckpt", V1)
    f = tmp_path / "ckpt" / where
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("mine")
    with pytest.raises(fx.EffaxError, match=rf"refusing to save to `.*ckpt`: it is an effax checkpoint that also "
                       rf"holds files effax did not write \({shown}\)"):
        fx.checkpoint.save(tmp_path / "ckpt", V2)
    assert f.read_text() == "mine"
    np.testing.assert_array_equal(restored_w(tmp_path / "ckpt"), np.ones(3))
    assert leftovers(tmp_path) == []
    if shown.endswith("/"):
        shutil.rmtree(f.parent)
    else:
        f.unlink()
    fx.checkpoint.save(tmp_path / "ckpt", V2)  # only what effax wrote: replaced
    np.testing.assert_array_equal(restored_w(tmp_path / "ckpt"), 2 * np.ones(3))


def test_the_files_a_save_wrote_are_recorded_and_a_checkpoint_without_the_list_falls_back(tmp_path):
    fx.checkpoint.save(tmp_path / "ckpt", V1)
    meta_file = tmp_path / "ckpt" / "_METADATA"
    meta = json.loads(meta_file.read_text())
    files = meta["custom_metadata"]["effax"]["files"]
    held = sorted(
        os.path.relpath(os.path.join(w, n), tmp_path / "ckpt") + ("/" if n in ds else "")
        for w, ds, fs in os.walk(tmp_path / "ckpt") for n in ds + fs
    )
    assert files == held and "_METADATA" in files
    # a checkpoint written before the list existed: Orbax's layout is effax's, a README among the hashes is not
    del meta["custom_metadata"]["effax"]["files"]
    meta_file.write_text(json.dumps(meta))
    (tmp_path / "ckpt" / "d" / "README.txt").write_text("mine")
    with pytest.raises(fx.EffaxError, match=r"holds files effax did not write \(d/README.txt\)"):
        fx.checkpoint.save(tmp_path / "ckpt", V2)
    (tmp_path / "ckpt" / "d" / "README.txt").unlink()
    fx.checkpoint.save(tmp_path / "ckpt", V2)
    np.testing.assert_array_equal(restored_w(tmp_path / "ckpt"), 2 * np.ones(3))


def test_keys_of_another_implementation_are_mis_typed_not_mis_shaped(tmp_path):
    fx.checkpoint.save(tmp_path / "ckpt", {"keys": {"k": jax.random.key(0, impl="rbg")}})
    with pytest.raises(fx.CheckpointMismatchError) as info:
        fx.checkpoint.restore(tmp_path / "ckpt", like={"keys": {"k": jax.random.key(0)}})
    e = info.value
    assert e.mis_shaped == [] and e.mis_typed == ["keys:k: like key<fry>[], checkpoint key<rbg>[]"]
    assert "  mis-typed: keys:k: like key<fry>[], checkpoint key<rbg>[]" in str(e)
    # the same words as `fx.check_variables` for the same difference
    rbg = {"keys": {"k": jax.random.key(0, impl="rbg")}}
    report = fx.inspect.diff_variables({"keys": {"k": jax.random.key(0)}}, rbg)
    assert [line.split(": ", 1)[1].replace("model", "like").replace("variables", "checkpoint")
            for line in report.lines()] == e.mis_typed
    # keys of another shape too: mis-shaped, shown as keys
    fx.checkpoint.save(tmp_path / "keys3", {"keys": {"k": jax.random.split(jax.random.key(0, impl="rbg"), 3)}})
    with pytest.raises(fx.CheckpointMismatchError) as info:
        fx.checkpoint.restore(tmp_path / "keys3", like={"keys": {"k": jax.random.key(0)}})
    assert info.value.mis_shaped == ["keys:k: like key<fry>[], checkpoint key<rbg>[3]"]
