"""Fault injection for fx.checkpoint: a process killed at every step of a save, damaged files, foreign targets.

Each case runs a child process that saves and SIGKILLs itself at one point,
chosen by the save's own fault hook (`effax.checkpoint._fault`) or by a
patched `os.rename`/`os.unlink` (the k-th call), never by a timer. The parent
then checks the contract: `steps()` lists exactly the complete steps, each
restores bit-exact (the old values before the commit rename, the new ones
after), and the next restore or save of the directory cleans every leftover.
Everything happens inside the test's own temporary directory.
"""

import concurrent.futures
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import effax as fx

pytestmark = pytest.mark.slow  # subprocesses killed at every point of a save: CI runs it (`--run-slow`)

pytest.importorskip("orbax.checkpoint")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VALUES = textwrap.dedent(
    """
    import jax, jax.numpy as jnp

    def values(x):
        return {
            "params": {"w": jnp.full((32, 16), x), "b": jnp.arange(16, dtype=jnp.bfloat16) * x},
            "state": {"n": jnp.asarray(int(x), jnp.int32)},
            "keys": {"k": jax.random.key(int(x))},
        }
    """
)
_namespace: dict = {}
exec(VALUES, _namespace)  # noqa: S102 - the same `values` in the parent and in every child
values = _namespace["values"]

CHILD = VALUES + textwrap.dedent(
    """
    import os, signal, sys
    from effax import checkpoint as ck

    root, step, point, x = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    step = None if step == "none" else int(step)

    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_on_call(module, name, n):
        real, calls = getattr(module, name), [0]
        def patched(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                die()
            return real(*args, **kwargs)
        setattr(module, name, patched)

    if point.startswith("rename"):  # the n-th rename of the save (Orbax's own, then ours)
        kill_on_call(os, "rename", int(point[len("rename"):]))
    elif point.startswith("unlink"):  # the n-th file removed after the commit (the previous version)
        n = int(point[len("unlink"):])
        ck._fault = lambda p: kill_on_call(os, "unlink", n) if p == "committed" else None
    else:
        ck._fault = lambda p: die() if p == point else None
    ck.save(root, values(x), step=step)
    print("SAVED")
    """
)

# (case, step of the first save and of the killed one, kill point, whether the kill comes after the commit)
CASES = [
    # a new step 2 beside a complete step 1
    ("new-start", (1, 2), "start", False),
    ("new-orbax-finalize", (1, 2), "rename1", False),
    ("new-synced", (1, 2), "synced", False),
    ("new-commit-rename", (1, 2), "rename2", False),
    ("new-committed", (1, 2), "committed", True),
    # an overwrite of step 1
    ("over-orbax-finalize", (1, 1), "rename1", False),
    ("over-move-old-rename", (1, 1), "rename2", False),
    ("over-between-renames", (1, 1), "moved_old", False),
    ("over-commit-rename", (1, 1), "rename3", False),
    ("over-committed", (1, 1), "committed", True),
    ("over-removing-old", (1, 1), "unlink3", True),
    # an overwrite of a checkpoint saved without steps
    ("single-between-renames", (None, None), "moved_old", False),
    ("single-removing-old", (None, None), "unlink3", True),
]
OLD, NEW = 1.0, 2.0


def run_child(root, step, point):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    args = [sys.executable, "-c", CHILD, str(root), "none" if step is None else str(step), point, str(NEW)]
    try:
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed the child
        return None, f"timed out: {e}"
    return done.returncode, done.stdout + done.stderr[-3000:]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Every case's directory after its child was killed; children run two at a time."""
    base = tmp_path_factory.mktemp("faults")
    roots = {}
    for case, (first, _), _, _ in CASES:
        roots[case] = base / case / ("ckpt" if first is None else "run")
        fx.checkpoint.save(roots[case], values(OLD), step=first)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(run_child, roots[case], step, point) for case, (_, step), point, _ in CASES}
        return {case: (roots[case], *futures[case].result()) for case in futures}


def assert_bits(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert a.dtype == b.dtype
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        bits = lambda x: np.asarray(x).reshape(-1).view(np.uint8)  # noqa: E731
        np.testing.assert_array_equal(bits(a), bits(b))


def leftovers(root):
    return sorted(n for n in os.listdir(root.parent) if ".effax-" in n) + (
        sorted(n for n in os.listdir(root) if ".effax-" in n) if root.is_dir() else []
    )


@pytest.mark.parametrize("case, steps, point, after_commit", CASES, ids=[c[0] for c in CASES])
def test_a_save_killed_at_any_point_loses_nothing(killed, case, steps, point, after_commit):
    root, code, output = killed[case]
    assert code == -signal.SIGKILL, f"the child was not killed at {point!r}: {code}\n{output}"
    first, step = steps
    like = jax.eval_shape(lambda: values(OLD))
    # 1. Before anything cleans up: exactly the complete steps are listed, each bit-exact.
    if first is None:
        assert_bits(fx.checkpoint.restore(root, like=like), values(NEW if after_commit else OLD))
    else:
        listed = fx.checkpoint.steps(root)
        want = {1: OLD}
        if step == 2 and after_commit:
            want[2] = NEW
        if step == 1 and after_commit:
            want[1] = NEW
        assert listed == sorted(want)
        for n, x in want.items():
            assert_bits(fx.checkpoint.restore(root, like=like, step=n), values(x))
        assert_bits(fx.checkpoint.restore(root, like=like), values(want[max(want)]))
    # 2. That restore cleaned every leftover of the killed save.
    assert leftovers(root) == []
    # 3. The next save works, and nothing else changed.
    fx.checkpoint.save(root, values(3.0), step=None if first is None else 7)
    assert leftovers(root) == []
    if first is not None:
        assert fx.checkpoint.steps(root) == sorted({*listed, 7})


# a save through a symbolic link (`ckpt -> disk/ckpt`) is written beside where the link leads
LINK_CASES = [
    ("link-between-renames", "moved_old", False),
    ("link-commit-rename", "rename3", False),
    ("link-committed", "committed", True),
    ("link-removing-old", "unlink3", True),
]


@pytest.fixture(scope="module")
def killed_behind_links(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults_links")
    roots = {}
    for case, _, _ in LINK_CASES:
        fx.checkpoint.save(base / case / "disk" / "ckpt", values(OLD))
        os.symlink(base / case / "disk" / "ckpt", base / case / "ckpt")
        roots[case] = base / case / "ckpt"
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(run_child, roots[case], None, point) for case, point, _ in LINK_CASES}
        return {case: (roots[case], *futures[case].result()) for case in futures}


@pytest.mark.parametrize("case, point, after_commit", LINK_CASES, ids=[c[0] for c in LINK_CASES])
def test_a_save_through_a_link_killed_at_any_point_loses_nothing(killed_behind_links, case, point, after_commit):
    root, code, output = killed_behind_links[case]
    assert code == -signal.SIGKILL, f"the child was not killed at {point!r}: {code}\n{output}"
    real = root.parent / "disk" / "ckpt"
    assert os.path.islink(root) and os.readlink(root) == str(real)  # the link itself is never moved
    like = jax.eval_shape(lambda: values(OLD))
    assert_bits(fx.checkpoint.restore(root, like=like), values(NEW if after_commit else OLD))
    assert leftovers(root) == [] and leftovers(real) == []
    fx.checkpoint.save(root, values(3.0))
    assert os.path.islink(root) and leftovers(root) == [] and leftovers(real) == []
    assert_bits(fx.checkpoint.restore(real, like=like), values(3.0))
