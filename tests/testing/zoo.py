"""Handlers users plausibly write: subtly broken ones, each with the law that must catch it, and correct
ones that must pass. `test_broken_handlers.py` runs them all through `assert_handler_laws` at its defaults."""

import dataclasses
import itertools
import zlib

import jax
import jax.numpy as jnp

import effax as fx


def _h(path):
    return zlib.crc32("/".join(path).encode())


# --- broken: answers do not match requests (law 10) ----------------------------------------------


class TransposedParams(fx.Handler):
    """Stores kernels transposed for a faster matmul and forgets to transpose them back: (3, 2) for (2, 3)."""

    def handle(self, request, forward):
        out = forward(request)
        return out.T if isinstance(request, fx.ParamRequest) else out


class Bfloat16Params(fx.Handler):
    """Halves memory by answering params in bfloat16, whatever dtype the model asked for."""

    def handle(self, request, forward):
        out = forward(request)
        return out.astype(jnp.bfloat16) if isinstance(request, fx.ParamRequest) else out


class StateByPath(fx.Handler):
    """Keeps state itself, keyed by path only: `s0` in 'state' and `s0` in 'stats' become one variable."""

    def begin(self):
        return _StateByPathRun()


class _StateByPathRun:
    def __init__(self):
        self.values = {}

    def handle(self, request, forward):
        if isinstance(request, fx.LocalStateRequest):
            if request.path not in self.values:
                self.values[request.path] = request.init()
            return None
        if isinstance(request, fx.GetStateRequest):
            return self.values[request.path]
        if isinstance(request, fx.SetStateRequest):
            self.values[request.path] = request.value
            return None
        return forward(request)


class StateAsFloat32(fx.Handler):
    """Keeps state itself and answers every read as float32: an int32 counter or a bfloat16 statistic
    comes back float32."""

    def begin(self):
        return _StateAsFloat32Run()


class _StateAsFloat32Run:
    def __init__(self):
        self.values = {}

    def handle(self, request, forward):
        slot = (getattr(request, "collection", None), request.path)
        if isinstance(request, fx.LocalStateRequest):
            self.values.setdefault(slot, request.init())
            return None
        if isinstance(request, fx.GetStateRequest):
            return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), self.values[slot])
        if isinstance(request, fx.SetStateRequest):
            self.values[slot] = request.value
            return None
        return forward(request)


# --- broken: keys (law 11, law 2) ----------------------------------------------------------------


class RawStreamKeys(fx.Handler):
    """Answers `fx.stream_key` with the raw uint32 data of a key (`jax.random.PRNGKey` style), not a typed key."""

    def handle(self, request, forward):
        if isinstance(request, fx.StreamKeyRequest):
            return jax.random.key_data(jax.random.fold_in(jax.random.key(0), _h(request.path)))
        return forward(request)



class KeysPerPath(fx.Handler):
    """One key per path and stream, ignoring the draw counter: two draws at one path repeat."""

    def __init__(self, key):
        self.key = key

    def handle(self, request, forward):
        if isinstance(request, fx.RandomRequest):
            return jax.random.fold_in(jax.random.fold_in(self.key, _h(request.path)), _h((request.stream,)))
        return forward(request)


class KeysIgnoringPath(fx.Handler):
    """Folds in the stream and a per-path draw counter, but not the path: the first draw of one stream at
    two paths repeats a key."""

    def __init__(self, key):
        self.key = key

    def begin(self):
        return _KeysIgnoringPathRun(self.key)


class _KeysIgnoringPathRun:
    def __init__(self, key):
        self.key, self.counts = key, {}

    def handle(self, request, forward):
        if isinstance(request, fx.RandomRequest):
            slot = (request.path, request.stream)
            n = self.counts.get(slot, 0)
            self.counts[slot] = n + 1
            return jax.random.fold_in(jax.random.fold_in(self.key, _h((request.stream,))), n)
        return forward(request)


class CallOrderKeys(fx.Handler):
    """Splits keys in call order (one counter per run): fresh and deterministic, but a draw added
    earlier shifts every later key."""

    def __init__(self, key):
        self.key = key

    def begin(self):
        return _CallOrderKeysRun(self.key)


class _CallOrderKeysRun:
    def __init__(self, key):
        self.key, self.n = key, 0

    def handle(self, request, forward):
        if isinstance(request, fx.RandomRequest):
            self.n += 1
            return jax.random.fold_in(self.key, self.n)
        return forward(request)


class CallOrderInitParams(fx.Handler):
    """Initializes params from a per-run counter (keys split in call order): a param added earlier
    shifts every later one. Deterministic, so only locality notices."""

    def begin(self):
        return _CallOrderRun()


class _CallOrderRun:
    def __init__(self):
        self.n = 0

    def handle(self, request, forward):
        if isinstance(request, fx.ParamRequest):
            self.n += 1
            return request.initialize(jax.random.fold_in(jax.random.key(0), self.n))
        return forward(request)


_COUNTER = itertools.count()


class GlobalCounterKeys(fx.Handler):
    """Draws keys from a process-wide counter, so two identical runs differ."""

    def handle(self, request, forward):
        if isinstance(request, fx.RandomRequest):
            return jax.random.key(next(_COUNTER))
        return forward(request)


# --- broken: state on the handler, shared, or in the request (law 12) -----------------------------


def mutable_default_side_inputs():
    """A fresh class per call: each stands for a new process, where the shared default starts empty."""

    class RememberedDefaults(fx.Handler):
        """Answers `values`, and remembers the default of every other tag "so later runs agree" -- in a
        mutable default argument, shared by every instance."""

        def __init__(self, values=None, remembered={}):  # noqa: B006 -- the bug under test
            self.values = dict(values or {})
            self.remembered = remembered

        def handle(self, request, forward):
            if isinstance(request, fx.SideInputRequest):
                if request.tag in self.values:
                    return self.values[request.tag]
                if request.tag not in self.remembered:
                    self.remembered[request.tag] = forward(request)
                return self.remembered[request.tag]
            return forward(request)

    return RememberedDefaults


class SowOncePerTag(fx.Handler):
    """Forwards only the first sow of each tag, with the `seen` set on the handler: after one run,
    nothing is sown any more."""

    def __init__(self):
        self.seen = set()

    def handle(self, request, forward):
        if isinstance(request, fx.SideOutputRequest):
            key = (request.collection, request.path, request.tag)
            if key in self.seen:
                return None
            self.seen.add(key)
        return forward(request)


class ClipsSetsInPlace(fx.Handler):
    """Clips every state write to [-1, 1] by changing the request it was handed."""

    def handle(self, request, forward):
        if isinstance(request, fx.SetStateRequest):
            object.__setattr__(request, "value", jax.tree.map(lambda v: jnp.clip(v, -1.0, 1.0), request.value))
        return forward(request)


class DrawCounterReset(fx.Handler):
    """Counts draws per path itself, resetting the counter on the handler in `begin()`: a nested run
    of the same instance (a model evaluated inside a training step) resets the outer run's counts."""

    def __init__(self, key):
        self.key = key

    def begin(self):
        self.counts = {}
        return self

    def handle(self, request, forward):
        if isinstance(request, fx.RandomRequest):
            slot = (request.stream, request.path)
            n = self.counts.get(slot, 0)
            self.counts[slot] = n + 1
            base = jax.random.fold_in(jax.random.fold_in(self.key, _h(request.path)), _h((request.stream,)))
            return jax.random.fold_in(base, n)
        return forward(request)


# --- broken: the classic laws ---------------------------------------------------------------------


class CalibratesOnFirstRun(fx.Handler):
    """Passes params through on its first run (calibration) and quantizes them afterwards, keeping that
    flag on the handler instead of a run."""

    def __init__(self):
        self.calibrated = False

    def begin(self):
        self.quantize, self.calibrated = self.calibrated, True
        return self

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest) and self.quantize:
            return jnp.round(out * 4) / 4
        return out


class PythonScaleQuantizer(fx.Handler):
    """Computes its scale with `float(...)`, which needs a concrete value (no `jax.eval_shape`)."""

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest):
            scale = float(jnp.max(jnp.abs(out))) or 1.0
            return jnp.round(out / scale * 127) * scale / 127
        return out


class SwallowsSets(fx.Handler):
    """A read cache that ignores writes."""

    def handle(self, request, forward):
        if isinstance(request, fx.SetStateRequest):
            return None
        return forward(request)


class WriteBackCache(fx.Handler):
    """Holds writes in a per-run cache and answers the next read from it -- with `pop`, so the second
    read after a set sees the stale stored value."""

    def begin(self):
        return _WriteBackRun()


class _WriteBackRun:
    def __init__(self):
        self.dirty = {}

    def handle(self, request, forward):
        if isinstance(request, fx.SetStateRequest):
            self.dirty[(request.collection, request.path)] = request.value
            return None
        if isinstance(request, fx.GetStateRequest) and (request.collection, request.path) in self.dirty:
            return self.dirty.pop((request.collection, request.path))
        return forward(request)


class DropsForwardedAnswers(fx.Handler):
    """Answers side inputs, and forgets to `return` what it forwards."""

    def handle(self, request, forward):
        if isinstance(request, fx.SideInputRequest):
            return 1.0
        forward(request)


class ParamsScalerThatAlsoMasks(fx.Handler):
    """A param handler that also answers side inputs it does not own."""

    def handle(self, request, forward):
        if isinstance(request, fx.ParamRequest):
            return forward(request) * 2
        if isinstance(request, fx.SideInputRequest):
            return 0.0
        return forward(request)


class ScaleReadAtBegin(fx.Handler):
    """Reads its configuration from the ambient stack in `begin()`, so it depends on which handlers were
    installed before it rather than on where it sits."""

    def begin(self):
        return _ScaleRun(fx.side_input("mask", default=1.0))


class _ScaleRun:
    def __init__(self, scale):
        self.scale = scale

    def handle(self, request, forward):
        out = forward(request)
        return out * self.scale if isinstance(request, fx.ParamRequest) else out


class RemembersAnswers(fx.Handler):
    """Keeps every answer on the handler, which leaks tracers out of `jax.jit`."""

    def __init__(self):
        self.seen = []

    def handle(self, request, forward):
        out = forward(request)
        self.seen.append(out)
        return out


class UndoesSharing(fx.Handler):
    """Stores every param where the model asked for it (`original_path`), which unties shared weights."""

    def handle(self, request, forward):
        if isinstance(request, fx.ParamRequest):
            return forward(dataclasses.replace(request, path=request.original_path, origin=None, via=()))
        return forward(request)


class MySideInputs(fx.Handler):
    """A drop-in for `fx.handlers.SideInputs` that answers 0.0 for tags it lacks instead of forwarding
    (so the model's defaults are lost)."""

    def __init__(self, values):
        self.values = dict(values)

    def handle(self, request, forward):
        if isinstance(request, fx.SideInputRequest):
            return self.values.get(request.tag, 0.0)
        return forward(request)


class ParamsCachedByName(fx.Handler):
    """Caches params by their name, not their path: `encoder/w0` is answered with `decoder/w0`'s value."""

    def begin(self):
        return _ByNameRun()


class _ByNameRun:
    def __init__(self):
        self.cache = {}

    def handle(self, request, forward):
        if not isinstance(request, fx.ParamRequest):
            return forward(request)
        name = request.path[-1]
        if name not in self.cache:
            self.cache[name] = forward(request)
        return self.cache[name]


class AdapterOnlyWhileInitializing(fx.Handler):
    """Shifts the output of every module call, but only under init: init and apply disagree."""

    answers = (fx.ModuleCallRequest,)

    def handle(self, request, forward):
        out = forward(request)
        return out + 1.0 if fx.is_initializing() else out


# name -> (factory, effects, extra kwargs for assert_handler_laws, the law that must catch it)
BROKEN = {
    "param answer of the wrong shape": (TransposedParams, ("param",), {}, "answers match requests"),
    "param answer of the wrong dtype": (Bfloat16Params, ("param",), {}, "answers match requests"),
    "state keyed by path, not collection": (StateByPath, ("state",), {}, "answers match requests"),
    "state read back as float32": (StateAsFloat32, ("state",), {}, "answers match requests"),
    "stream keys as raw key data": (RawStreamKeys, ("random",), {}, "answers match requests"),
    "keys ignoring the draw counter": (lambda: KeysPerPath(jax.random.key(1)), ("random",), {}, "fresh keys"),
    "keys ignoring the path": (lambda: KeysIgnoringPath(jax.random.key(1)), ("random",), {}, "fresh keys"),
    "keys split in call order": (lambda: CallOrderKeys(jax.random.key(1)), ("random",), {}, "locality"),
    "params initialized in call order": (CallOrderInitParams, ("param",), {}, "locality"),
    "keys from a global counter": (GlobalCounterKeys, ("random",), {}, "determinism"),
    "side inputs with a shared mutable default": (None, ("side_input",), {}, "reuse"),
    "sow dedup with `seen` on the handler": (SowOncePerTag, ("sow",), {}, "reuse"),
    "a handler changing the request": (ClipsSetsInPlace, ("state",), {}, "reuse"),
    "draw counter reset in `begin()`": (lambda: DrawCounterReset(jax.random.key(1)), ("random",), {}, "reuse"),
    "calibration flag on the handler": (CalibratesOnFirstRun, ("param",), {}, "determinism"),
    "a scale computed with float()": (PythonScaleQuantizer, ("param",), {}, "abstract init"),
    "sets swallowed": (SwallowsSets, ("state",), {}, "state"),
    "write-back cache read once": (WriteBackCache, ("state",), {}, "state"),
    "forwarded answers dropped": (DropsForwardedAnswers, ("side_input",), {}, "answers match requests"),
    "a param handler answering side inputs": (ParamsScalerThatAlsoMasks, ("param",), {}, "forwarding identity"),
    "configuration read from the stack in `begin()`": (ScaleReadAtBegin, ("param",), {}, "associativity"),
    "answers kept on the handler": (RemembersAnswers, ("param",), {}, "purity under jit"),
    "a param handler undoing `fx.share`": (UndoesSharing, ("param",), {}, "sharing"),
    "params cached by name, not path": (ParamsCachedByName, ("param",), {}, "answers match requests"),
    "a module-call adapter only in init": (AdapterOnlyWhileInitializing, ("module_call",), {}, "init/apply agreement"),
    "a drop-in losing side-input defaults": (
        lambda: MySideInputs({"mask": 2.0}), ("side_input",),
        {"reference": lambda: fx.handlers.SideInputs({"mask": 2.0})}, "reference",
    ),
}


def broken(name):
    """The factory of a broken handler (a fresh class where the bug lives in the class)."""
    factory = BROKEN[name][0]
    return mutable_default_side_inputs() if factory is None else factory


# --- correct, non-trivial handlers -----------------------------------------------------------------


class PathScaledParams(fx.Handler):
    """Scales each param by a factor that depends on its path (per-layer learning-rate tricks)."""

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest):
            return out * jnp.asarray(1.0 + (_h(request.path) % 7) / 10, out.dtype)
        return out


class PrefixedParams(fx.Handler):
    """Keeps every param under a prefix (`variables['params']['backbone'][...]`)."""

    def handle(self, request, forward):
        if isinstance(request, fx.ParamRequest):
            return forward(dataclasses.replace(request, path=("backbone",) + request.path))
        return forward(request)


class FrozenRandomParams(fx.Handler):
    """Answers params itself, never forwarding: fixed random features keyed by path."""

    def __init__(self, key):
        self.key = key

    def handle(self, request, forward):
        if isinstance(request, fx.ParamRequest):
            return request.initialize(jax.random.fold_in(self.key, _h(request.path)))
        return forward(request)


class LoRA(fx.Handler):
    """Adds a rank-1 adapter `a @ b` to every matrix, the adapter's params named by the matrix's path."""

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest) and len(request.shape) == 2:
            m, n = request.shape
            name = "_".join(request.path)
            with fx.scope("lora"):
                a = fx.param(name + "_a", jax.nn.initializers.normal(0.1), (m, 1), request.dtype)
                b = fx.param(name + "_b", jax.nn.initializers.normal(0.1), (1, n), request.dtype)
            return out + (a @ b).astype(out.dtype)
        return out


class LoRAOnModuleCalls(fx.Handler):
    """Adds a zero-initialized adapter, a param of its own in the module's scope, to every module call's output."""

    answers = (fx.ModuleCallRequest,)

    def handle(self, request, forward):
        out = forward(request)
        with fx.scope("lora"):
            return out + fx.param("b", jax.nn.initializers.zeros, ())


class Bfloat16NoiseWhenTraining(fx.Handler):
    """Adds small noise to params when training, drawn at the param's own path, in the param's dtype."""

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest) and fx.is_training():
            with fx.scope(request.path[-1]):
                key = fx.next_key("noise")
            return out + (0.01 * jax.random.normal(key, out.shape)).astype(out.dtype)
        return out


class RequestLog(fx.Handler):
    """Records every request on the run, not the handler."""

    def begin(self):
        return _LogRun()


class _LogRun:
    def __init__(self):
        self.lines = []

    def handle(self, request, forward):
        self.lines.append(request.describe())
        return forward(request)


CORRECT = {
    "path-dependent params": (PathScaledParams, ("param",), {}),
    "prefixed params": (PrefixedParams, ("param",), {}),
    "non-forwarding params": (lambda: FrozenRandomParams(jax.random.key(4)), ("param",), {}),
    "LoRA adapters keyed by path": (LoRA, ("param",), {}),
    "LoRA on module calls": (LoRAOnModuleCalls, ("module_call",), {}),
    "bf16 noise under training": (Bfloat16NoiseWhenTraining, ("param",), {}),
    "a request log on the run": (RequestLog, (), {}),
    "built-in side inputs as a reference of itself": (
        lambda: fx.handlers.SideInputs({"mask": 2.0}), ("side_input",),
        {"reference": lambda: fx.handlers.SideInputs({"mask": 2.0})},
    ),
}
