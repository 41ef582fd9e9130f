"""The composition matrix: every feature inside every lifted transform, under every operation.

A feature is one "layer" `f(h) -> h` with its handlers and options; a
context runs `L` layers plainly (unrolled, each in scope `l<i>`) or through
lifted transforms. Each cell checks the lifted model against the unrolled
one on the same, restacked weights: `init` makes the restacked structure,
`apply` in eval and train (deterministic features) gives the same outputs
and updates, `jax.jit(init)` equals `init`, `jax.eval_shape(init)` has its
shapes, `summary` counts the same params, `check_variables` accepts the
variables, and `jax.grad` gives the restacked gradients. docs/design.md,
"Composition (pinned)".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import effax as fx

KEY = jax.random.key(0)
D = 3
X = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)
normal = jax.nn.initializers.normal(0.5)


# --- features: (layer, handlers, extra options, deterministic in training)


def raw_layer(h):
    w = fx.param("w", normal, (D, D))
    count = fx.local_state("count", lambda: jnp.zeros((), jnp.int32), collection="counters")
    last = fx.local_state("last", lambda: jnp.zeros((D,)), collection="counters", axes=("embed",))
    if fx.is_training():
        count.set(count.get() + 1)
        last.set(h.mean(0))
    fx.sow("h", h)
    return jnp.tanh(h @ w)


def nn_layer(h):
    return fx.nn.LayerNorm()(jax.nn.relu(fx.nn.Dense(D)(h)))


def shared_layer(h):
    def pair(h):
        with fx.scope("a"):
            h = jnp.tanh(h @ fx.param("w", normal, (D, D)))
        with fx.scope("b"):
            return jnp.tanh(h @ fx.param("w", normal, (D, D)))

    here = "/".join(fx.current_path() + ("{}",))  # bindings name absolute paths: tie b to a where we are
    return fx.share(pair, {here.format("b").lstrip("/"): here.format("a").lstrip("/")})(h)


def double_dense(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    return out * 2 if isinstance(context.module, fx.nn.Dense) else out


class LoRA(fx.Handler):
    """An interceptor that creates params of its own (the README's pattern)."""

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ModuleCallRequest) and isinstance(request.module, fx.nn.Dense):
            (x,) = request.args
            with fx.scope("lora"):
                a = fx.param("a", normal, (x.shape[-1], 2))
                b = fx.param("b", normal, (2, request.module.features))
            out = out + x @ a @ b
        return out


class ParamLoRA(fx.Handler):
    """A stateless interceptor of params (LoRA on every kernel, on the param itself rather than the module
    call): it changes the answer and creates params of its own."""

    answers = (fx.ParamRequest,)

    def handle(self, request, forward):
        w = forward(request)
        if request.path[-1] != "kernel":
            return w
        with fx.scope("lora"):
            a = fx.param("a", normal, (w.shape[0], 2))
            b = fx.param("b", normal, (2, w.shape[1]))
        return w + a @ b


class Scale(fx.Handler):
    """A user's stateful handler: doubles every param and remembers which paths it saw."""

    def begin(self):
        return ScaleRun()


class ScaleRun:
    def __init__(self):
        self.seen = set()

    def handle(self, request, forward):
        out = forward(request)
        if isinstance(request, fx.ParamRequest):
            self.seen.add(request.path)
            return out * 2
        return out


def flax_layer(h):
    return fx.from_flax(linen.Dense(D))(h)


def flax_stateful_layer(h):
    """A Flax module with state: its init asks for a key only where the variables are missing."""
    return fx.from_flax(linen.BatchNorm(use_running_average=not fx.is_training(), momentum=0.5))(h)


def dropout_bn_layer(h):
    h = fx.nn.Dense(D)(h)
    h = fx.nn.BatchNorm(momentum=0.5)(h)
    return fx.nn.Dropout(0.5)(h)


class SetupBlock(fx.nn.Module):
    """Submodules, a param and state assigned in `setup()`, as Flax users write them."""

    def setup(self):
        self.dense = fx.nn.Dense(D)
        self.norms = [fx.nn.LayerNorm()]
        self.gain = fx.param("gain", jax.nn.initializers.ones, (D,))
        self.calls = fx.local_state("calls", lambda: jnp.zeros((), jnp.int32), collection="counters")

    def __call__(self, h):
        if fx.is_training():
            self.calls.set(self.calls.get() + 1)
        return self.norms[0](jax.nn.relu(self.dense(h))) * self.gain


def setup_layer(h):
    return SetupBlock()(h)


@dataclasses.dataclass(frozen=True)
class Feature:
    layer: Callable[[Any], Any]
    handlers: tuple = ()
    options: dict = dataclasses.field(default_factory=dict)
    deterministic: bool = True  # training draws no keys: train outputs compare exactly


FEATURES = {
    "raw effects": Feature(raw_layer),
    "fx.nn": Feature(nn_layer),
    "fx.share": Feature(shared_layer),
    "capture_intermediates": Feature(nn_layer, options={"capture_intermediates": True}),
    "InterceptMethods": Feature(nn_layer, handlers=(fx.handlers.InterceptMethods(double_dense),)),
    "LoRA interceptor": Feature(nn_layer, handlers=(LoRA(),)),
    "LoRA on params": Feature(nn_layer, handlers=(ParamLoRA(),)),
    "stateful handler": Feature(raw_layer, handlers=(Scale(),)),
    "from_flax": Feature(flax_layer),
    "from_flax with state": Feature(flax_stateful_layer),
    "Dropout and BatchNorm": Feature(dropout_bn_layer, deterministic=False),
    "setup() module": Feature(setup_layer),
}


# --- contexts: how L layers run, and how lifted variables restack into the unrolled ones


@dataclasses.dataclass(frozen=True)
class Context:
    build: Callable[[Callable], Callable]
    lead: tuple[int, ...]  # leading axes the lifted variables carry (restacked into l0, l1, ...)
    mapped: bool = False  # vmap: the output is stacked per member


def unrolled(layer, n):
    def model(h):
        for i in range(n):
            with fx.scope(f"l{i}"):
                h = layer(h)
        return h

    return model


def scanned(layer, n):
    return lambda h: fx.scan(lambda c, _: (layer(c), None), length=n)(h)[0]


def nested(layer):
    return lambda h: fx.scan(lambda c, _: (scanned(layer, 2)(c), None), length=2)(h)[0]


def vmapped(layer):
    return fx.vmap(layer, in_axes=None, axis_size=2)


def members(layer, n):
    def model(h):
        outs = []
        for i in range(n):
            with fx.scope(f"l{i}"):
                outs.append(layer(h))
        return jnp.stack(outs)

    return model


CONTEXTS = {
    "plain": Context(lambda f: unrolled(f, 2), ()),
    "scan": Context(lambda f: scanned(f, 2), (2,)),
    "nested scan": Context(nested, (2, 2)),
    "vmap": Context(vmapped, (2,), mapped=True),
    "remat": Context(lambda f: unrolled(fx.remat(f), 2), ()),
    "scan of remat": Context(lambda f: scanned(fx.remat(f), 2), (2,)),
}


def restack_into_layers(tree, lead):
    """Lifted variables -> the unrolled model's: `{"l<i>": slice i}` per collection, `i` over the lead axes."""
    if not lead:
        return tree
    n = int(np.prod(lead))
    out = {}
    for collection, sub in tree.items():
        flat = jax.tree.map(lambda a: a.reshape((n,) + a.shape[len(lead):]), sub)
        out[collection] = {f"l{i}": jax.tree.map(lambda a, i=i: a[i], flat) for i in range(n)}
    return out


def reference(ctx, feature):
    n = int(np.prod(ctx.lead)) if ctx.lead else 2
    return (members if ctx.mapped else unrolled)(feature.layer, n)


def close(a, b):
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-5), a, b)


# Every feature in fx.scan and raw effects in each single lift run in the README's test command; the rest of the
# matrix (the nested contexts too) is marked slow and runs in CI (`.ci/run` passes --run-slow).
FAST = {(f, "scan") for f in FEATURES} | {("raw effects", c) for c in ("plain", "vmap", "remat")}
CELLS = [
    pytest.param(f, c, id=f"{f}-{c}", marks=() if (f, c) in FAST else pytest.mark.slow)
    for f in FEATURES
    for c in CONTEXTS
]


@pytest.mark.parametrize("feature_name,context_name", CELLS)
def test_cell(feature_name, context_name):
    feature, ctx = FEATURES[feature_name], CONTEXTS[context_name]
    t = fx.transform(ctx.build(feature.layer))
    ref = fx.transform(reference(ctx, feature))
    hs, opts = list(feature.handlers), feature.options
    rngs = {"params": KEY, "dropout": jax.random.key(1)}

    # init: the restacked structure of the unrolled model's variables
    v = t.init(KEY, X, handlers=hs, **opts)
    v_ref = jax.eval_shape(lambda k, x: ref.init(k, x, handlers=hs, **opts), KEY, X)
    as_layers = restack_into_layers(v, ctx.lead)
    assert jax.tree.map(jnp.shape, as_layers) == jax.tree.map(jnp.shape, v_ref)

    # jit(init) equals init; eval_shape(init) has its shapes
    close(jax.jit(lambda k, x: t.init(k, x, handlers=hs, **opts))(KEY, X), v)
    abstract = jax.eval_shape(lambda k, x: t.init(k, x, handlers=hs, **opts), KEY, X)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), v)

    # apply in eval equals the unrolled model on the same weights
    eval_out = t.apply(v, X, training=False, handlers=hs, **opts)
    eval_ref = ref.apply(as_layers, X, training=False, handlers=hs, **opts)
    if opts.get("capture_intermediates"):
        (eval_out, sown), (eval_ref, sown_ref) = eval_out, eval_ref
        close(restack_into_layers(sown, ctx.lead), sown_ref)
    close(eval_out, eval_ref)
    # init/apply agreement (law 3) in the lifted model: what init computed is what apply computes on its variables
    close(t.init_with_output(KEY, X, handlers=hs, **opts)[0], eval_out)

    # apply in training: same outputs and updates when no key is drawn; deterministic and jittable otherwise
    train = dict(training=True, rngs=rngs, mutable=True, handlers=hs, **opts)
    out, updates = t.apply(v, X, **train)
    out_ref, updates_ref = ref.apply(as_layers, X, **train)
    assert jax.tree.map(jnp.shape, restack_into_layers(updates, ctx.lead)) == jax.tree.map(jnp.shape, updates_ref)
    if feature.deterministic:
        close(out, out_ref)
        close(restack_into_layers(updates, ctx.lead), updates_ref)
    jitted = jax.jit(lambda v, x: t.apply(v, x, **train))(v, X)
    close(jitted, (out, updates))

    # summary counts what init makes, handlers' params included; check_variables accepts the variables
    s = fx.summary(t, X, handlers=hs)
    assert s.param_count == sum(a.size for a in jax.tree.leaves(v["params"]))
    report = fx.check_variables(t, v, X, handlers=hs, **opts)
    assert report.ok, str(report)
    if feature.layer is raw_layer:  # its `last` names its dimension: stacked, it gains a None per lead axis
        specs = jax.tree.leaves_with_path(s.logical_axes()["counters"], is_leaf=lambda a: isinstance(a, P))
        lasts = [spec for path, spec in specs if path[-1].key == "last"]
        assert lasts and all(spec == P(*(None,) * len(ctx.lead), "embed") for spec in lasts), lasts

    # grad: the restacked gradients of the unrolled model
    def loss(tt, params, variables):
        out = tt.apply({**variables, "params": params}, X, training=False, handlers=hs)
        return jnp.sum(out**2)

    grads = jax.jit(jax.grad(lambda p: loss(t, p, v)))(v["params"])
    grads_ref = jax.jit(jax.grad(lambda p: loss(ref, p, as_layers)))(as_layers["params"])
    close(restack_into_layers({"params": grads}, ctx.lead)["params"], grads_ref)


@pytest.mark.slow
def test_no_tracer_leaks_in_any_context():
    for ctx in CONTEXTS.values():
        for feature_name in ("raw effects", "LoRA interceptor", "capture_intermediates"):
            feature = FEATURES[feature_name]
            t = fx.transform(ctx.build(feature.layer))
            with jax.checking_leaks():
                v = t.init(KEY, X, handlers=list(feature.handlers), **feature.options)
                t.apply(v, X, training=True, mutable=True, handlers=list(feature.handlers), **feature.options)
