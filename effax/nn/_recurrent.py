"""Recurrent layers: `LSTMCell`, `GRUCell` and `RNN`, a cell scanned over time with `fx.scan`; names as Flax's."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effax.core import EffaxError, path_now
from effax.lift import scan
from effax.nn._fields import check_bools, check_callables, check_dtypes
from effax.nn._linear import Dense, Initializer, check_sizes, default_kernel_init, promote, zeros
from effax.nn._module import Module, _field_name, where
from effax.nn._naming import current_names
from effax.nn._partitioning import layer_param, output_axes

orthogonal: Initializer = jax.nn.initializers.orthogonal()


class LSTMCell(Module):
    """One step of a long short-term memory: `(carry, x) -> (carry, h)` with `carry = (c, h)`, as Flax's.

    Its params are eight `Dense` layers named as in Flax: `ii`, `if`, `ig`,
    `io` (input kernels, no bias) and `hi`, `hf`, `hg`, `ho` (recurrent
    kernels, with the bias), so Flax checkpoints load unchanged. Scan it over
    time with `fx.nn.RNN`; `initialize_carry` makes the zero state.

    >>> cell = fx.nn.LSTMCell(3)
    >>> x = jnp.ones((2, 5))
    >>> def step(x):
    ...     return cell(cell.initialize_carry(jax.random.key(0), x.shape), x)
    >>> t = fx.transform(step)
    >>> v = t.init(jax.random.key(0), x)
    >>> sorted(v["params"]["LSTMCell_0"])
    ['hf', 'hg', 'hi', 'ho', 'if', 'ig', 'ii', 'io']
    >>> (c, h), y = t.apply(v, x)
    >>> c.shape, h.shape, y.shape
    ((2, 3), (2, 3), (2, 3))
    """

    features: int
    gate_fn: Callable[..., Any] = jax.nn.sigmoid
    activation_fn: Callable[..., Any] = jnp.tanh
    kernel_init: Initializer = default_kernel_init
    recurrent_kernel_init: Initializer = orthogonal
    bias_init: Initializer = zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32
    carry_init: Initializer = zeros

    def __post_init__(self) -> None:
        check_sizes(self, "features")
        check_dtypes(self, "dtype", "param_dtype")
        check_callables(self, "gate_fn", "activation_fn")

    def __call__(self, carry: tuple[jax.Array, jax.Array], inputs: jax.Array) -> tuple[Any, jax.Array]:
        c, h = carry
        n = h.shape[-1]

        def dense_i(name: str) -> Dense:
            return Dense(n, use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)

        def dense_h(name: str) -> Dense:
            return Dense(n, kernel_init=self.recurrent_kernel_init, bias_init=self.bias_init, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)

        i = self.gate_fn(dense_i("ii")(inputs) + dense_h("hi")(h))
        f = self.gate_fn(dense_i("if")(inputs) + dense_h("hf")(h))
        g = self.activation_fn(dense_i("ig")(inputs) + dense_h("hg")(h))
        o = self.gate_fn(dense_i("io")(inputs) + dense_h("ho")(h))
        new_c = f * c + i * g
        new_h = o * self.activation_fn(new_c)
        return (new_c, new_h), new_h

    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """The carry `(c, h)` for inputs of `input_shape` (batch dims, then features), from `carry_init`."""
        shape = tuple(input_shape[:-1]) + (self.features,)
        k1, k2 = jax.random.split(rng)
        return self.carry_init(k1, shape, self.param_dtype), self.carry_init(k2, shape, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class _DenseParams(Module):
    """A `Dense` layer's `(kernel, bias)` without applying them, as Flax's `DenseParams`."""

    features: int
    use_bias: bool = True
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros

    def __call__(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        kernel = layer_param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        if not self.use_bias:
            return kernel, None
        axes = output_axes(self.kernel_init, 1)
        return kernel, layer_param("bias", self.bias_init, (self.features,), self.param_dtype, axes)


class OptimizedLSTMCell(LSTMCell):
    """An `LSTMCell` that runs its four input and four recurrent kernels as two matmuls, as Flax's.

    The params are `LSTMCell`'s, named and shaped the same (`ii` ... `io`
    without bias, `hi` ... `ho` with it), so either cell loads the other's
    variables and Flax's `OptimizedLSTMCell` checkpoints load unchanged; the
    kernels are concatenated per call, one `(in, 4 * features)` product each.

    >>> cell = fx.nn.OptimizedLSTMCell(3)
    >>> x = jnp.ones((2, 5))
    >>> t = fx.transform(lambda x: cell(cell.initialize_carry(jax.random.key(0), x.shape), x))
    >>> v = t.init(jax.random.key(0), x)
    >>> sorted(v["params"]["OptimizedLSTMCell_0"])
    ['hf', 'hg', 'hi', 'ho', 'if', 'ig', 'ii', 'io']
    >>> (c, h), y = t.apply(v, x)
    >>> y.shape
    (2, 3)
    """

    def __call__(self, carry: tuple[jax.Array, jax.Array], inputs: jax.Array) -> tuple[Any, jax.Array]:
        c, h = carry
        n = h.shape[-1]

        def gates(x: jax.Array, kind: str, init: Initializer, use_bias: bool) -> list[jax.Array]:
            params = [
                _DenseParams(n, use_bias=use_bias, param_dtype=self.param_dtype, kernel_init=init,
                             bias_init=self.bias_init, name=f"{kind}{gate}")(x)
                for gate in "ifgo"
            ]
            kernel = jnp.concatenate([k for k, _ in params], axis=-1)
            bias = jnp.concatenate([b for _, b in params], axis=-1) if use_bias else None
            x, kernel, bias = promote(self.dtype, x, kernel, bias)
            y = jnp.dot(x, kernel)
            if bias is not None:
                y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
            return jnp.split(y, 4, axis=-1)

        hi, hf, hg, ho = gates(h, "h", self.recurrent_kernel_init, True)
        ii, if_, ig, io = gates(inputs, "i", self.kernel_init, False)
        i = self.gate_fn(hi + ii)
        f = self.gate_fn(hf + if_)
        g = self.activation_fn(hg + ig)
        o = self.gate_fn(ho + io)
        new_c = f * c + i * g
        new_h = o * self.activation_fn(new_c)
        return (new_c, new_h), new_h


class GRUCell(Module):
    """One step of a gated recurrent unit: `(h, x) -> (h, h)`, as Flax's.

    Params as in Flax: `ir`, `iz`, `in` (input kernels with bias) and `hr`,
    `hz` (recurrent, no bias), `hn` (recurrent, with bias).

    >>> cell = fx.nn.GRUCell(3)
    >>> x = jnp.ones((2, 5))
    >>> t = fx.transform(lambda x: cell(cell.initialize_carry(jax.random.key(0), x.shape), x))
    >>> v = t.init(jax.random.key(0), x)
    >>> sorted(v["params"]["GRUCell_0"])
    ['hn', 'hr', 'hz', 'in', 'ir', 'iz']
    >>> h, y = t.apply(v, x)
    >>> h.shape
    (2, 3)
    """

    features: int
    gate_fn: Callable[..., Any] = jax.nn.sigmoid
    activation_fn: Callable[..., Any] = jnp.tanh
    kernel_init: Initializer = default_kernel_init
    recurrent_kernel_init: Initializer = orthogonal
    bias_init: Initializer = zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32
    carry_init: Initializer = zeros

    def __post_init__(self) -> None:
        check_sizes(self, "features")
        check_dtypes(self, "dtype", "param_dtype")
        check_callables(self, "gate_fn", "activation_fn")

    def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = carry
        n = h.shape[-1]

        def dense_i(name: str) -> Dense:
            return Dense(n, kernel_init=self.kernel_init, bias_init=self.bias_init, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)

        def dense_h(name: str, use_bias: bool = False) -> Dense:
            return Dense(n, use_bias=use_bias, kernel_init=self.recurrent_kernel_init, bias_init=self.bias_init,
                         dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        r = self.gate_fn(dense_i("ir")(inputs) + dense_h("hr")(h))
        z = self.gate_fn(dense_i("iz")(inputs) + dense_h("hz")(h))
        n_ = self.activation_fn(dense_i("in")(inputs) + r * dense_h("hn", use_bias=True)(h))
        new_h = (1.0 - z) * n_ + z * h
        return new_h, new_h

    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
        """The carry `h` for inputs of `input_shape` (batch dims, then features), from `carry_init`."""
        return self.carry_init(rng, tuple(input_shape[:-1]) + (self.features,), self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


def flip_sequences(inputs: jax.Array, seq_lengths: Any, num_batch_dims: int, time_major: bool) -> jax.Array:
    """Reverse each sequence along time, keeping padding at the end when `seq_lengths` is given (Flax's).

    >>> fx.nn.flip_sequences(jnp.array([[1, 2, 0], [3, 4, 5]]), jnp.array([2, 3]), 1, False)
    Array([[2, 1, 0],
           [5, 4, 3]], dtype=int32)
    """
    time_axis = 0 if time_major else num_batch_dims
    steps = inputs.shape[time_axis]
    if seq_lengths is None:
        return jnp.flip(inputs, axis=time_axis)
    lengths = jnp.expand_dims(jnp.asarray(seq_lengths), axis=time_axis)
    idxs = jnp.arange(steps - 1, -1, -1)
    idxs = idxs.reshape([steps] + [1] * num_batch_dims if time_major else [1] * num_batch_dims + [steps])
    idxs = (idxs + lengths) % steps
    idxs = idxs.reshape(idxs.shape + (1,) * (inputs.ndim - idxs.ndim))
    return jnp.take_along_axis(inputs, idxs, axis=time_axis)


def _select_last(carries: Any, seq_lengths: Any) -> Any:
    """From carries stacked over time (axis 0), each sequence's carry at its last real step."""
    last = jnp.asarray(seq_lengths) - 1

    def pick(x: jax.Array) -> jax.Array:
        idx = last.reshape((1,) + last.shape + (1,) * (x.ndim - 1 - last.ndim))
        return jnp.take_along_axis(x, idx, axis=0)[0]

    return jax.tree.map(pick, carries)


def _check_carry(cell: Any, carry: Any, step_shape: tuple[int, ...]) -> None:
    """Refuse an `initial_carry` whose structure or shapes differ from the cell's own, before the scan does
    with a message that names neither the layer nor the carry the cell wants."""
    make = getattr(cell, "initialize_carry", None)
    if make is None:
        return
    try:
        want = jax.eval_shape(lambda: make(jax.random.key(0), step_shape))
    except Exception:  # a cell that cannot make its carry abstractly: the scan still checks the given one
        return
    if jax.tree.structure(carry) == jax.tree.structure(want) and all(
        np.shape(a) == b.shape for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(want), strict=True)
    ):
        return
    show = lambda tree: jax.tree.map(lambda a: f"{jnp.result_type(a).name}{list(np.shape(a))}", tree)
    raise EffaxError(
        f"{where('RNN')}: initial_carry is {show(carry)}, but {type(cell).__name__} carries {show(want)} for "
        f"steps of shape {step_shape}. Make it with the cell: "
        f"`initial_carry=cell.initialize_carry(key, {step_shape})`."
    )


class RNN(Module):
    """Run a recurrent `cell` over the time axis of a sequence, with `fx.scan`: one set of cell params for all steps.

    As Flax's `nn.RNN`: inputs are `(*batch, time, *features)` (or time
    first with `time_major`), the cell's params live where Flax puts them
    (under `RNN_0/cell` for a cell built outside the model, as below; under
    the cell's own name, `LSTMCell_0`, for one built inside a module), and
    `seq_lengths` keeps padded sequences apart (the returned carry is each
    sequence's at its last real step; `reverse` flips only the real steps).
    The loop is `fx.scan(..., params="broadcast")`, so it compiles once
    whatever the length. `split_rngs` is `fx.scan`'s: by default every step
    draws fresh keys (dropout inside a cell).

    >>> rnn = fx.nn.RNN(fx.nn.LSTMCell(4))
    >>> t = fx.transform(lambda x: rnn(x))
    >>> x = jnp.ones((2, 7, 3))                      # batch 2, 7 steps, 3 features
    >>> v = t.init(jax.random.key(0), x)
    >>> v["params"]["RNN_0"]["cell"]["ii"]["kernel"].shape, t.apply(v, x).shape
    ((3, 4), (2, 7, 4))
    """

    cell: Module
    time_major: bool = False
    return_carry: bool = False
    reverse: bool = False
    keep_order: bool = False
    unroll: int = 1
    split_rngs: bool | Iterable[str] = True

    def __post_init__(self) -> None:
        check_bools(self, "time_major", "return_carry", "reverse", "keep_order")
        check_callables(self, "cell")

    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry: Any = None,
        init_key: jax.Array | None = None,
        seq_lengths: Any = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
    ) -> Any:
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        inputs = jnp.asarray(inputs)
        n_features = getattr(self.cell, "num_feature_axes", 1)
        time_axis = 0 if time_major else inputs.ndim - (n_features + 1)
        if time_axis < 0:
            raise EffaxError(
                f"{where('RNN')}: inputs of shape {inputs.shape} have no time axis: give `(*batch, time, features)` "
                "(or `(time, *batch, features)` with time_major=True)."
            )
        n_batch = (inputs.ndim - n_features - 1) if time_major else time_axis
        if reverse:
            inputs = jax.tree.map(lambda x: flip_sequences(x, seq_lengths, n_batch, time_major), inputs)
        cell = self.cell
        names = current_names()
        if names is not None and cell not in names.bound:
            names.bound[cell] = _adopted(names, cell)
        batch_shape = inputs.shape[1 : 1 + n_batch] if time_major else inputs.shape[:n_batch]
        if seq_lengths is not None and jnp.shape(seq_lengths) != batch_shape:
            raise EffaxError(
                f"{where('RNN')}: seq_lengths has shape {jnp.shape(seq_lengths)}, but inputs of shape "
                f"{inputs.shape} hold sequences of batch shape {batch_shape}: give one length per sequence, "
                f"an int array of shape {batch_shape}."
            )
        step_shape = inputs.shape[:time_axis] + inputs.shape[time_axis + 1 :]
        if initial_carry is None:
            key = jax.random.key(0) if init_key is None else init_key
            initial_carry = cell.initialize_carry(key, step_shape)
        else:
            _check_carry(cell, initial_carry, step_shape)
        slice_carry = seq_lengths is not None and return_carry

        def body(carry: Any, x: jax.Array) -> tuple[Any, Any]:
            carry, y = cell(carry, x)
            return carry, ((carry, y) if slice_carry else y)

        xs = jnp.moveaxis(inputs, time_axis, 0)
        carry, ys = scan(body, params="broadcast", split_rngs=self.split_rngs, unroll=self.unroll)(initial_carry, xs)
        if slice_carry:
            carries, ys = ys
            carry = _select_last(carries, seq_lengths)
        outputs = jax.tree.map(lambda y: jnp.moveaxis(y, 0, time_axis), ys)
        if reverse and keep_order:
            outputs = jax.tree.map(lambda y: flip_sequences(y, seq_lengths, n_batch, time_major), outputs)
        return (carry, outputs) if return_carry else outputs


def _adopted(names: Any, cell: Module) -> tuple[str, ...]:
    """Where a cell built outside the model lives, as Flax adopts it: under the first module of this run that
    holds it in a field (`Model(cell=GRUCell(4))` makes `cell`; `nn.RNN(GRUCell(4))` itself makes `RNN_0/cell`),
    so one cell in two RNNs is one set of weights. (One built inside keeps the name it got there, `LSTMCell_0`.)
    A cell given `name=` is named so under the RNN."""
    if cell.name is None:
        for owner, path in list(names.bound.items()):
            field = _field_name(owner, cell) if isinstance(owner, Module) else None
            if field is not None:
                return path + (field,)
    return path_now() + (cell.name or "cell",)


def _concatenate(a: jax.Array, b: jax.Array) -> jax.Array:
    """Join the two directions' outputs along the features, Flax's default `merge_fn`."""
    return jnp.concatenate([a, b], axis=-1)


class Bidirectional(Module):
    """Run `forward_rnn` over a sequence and `backward_rnn` over it reversed, and merge their outputs, as Flax's.

    The backward outputs are put back in time order (`keep_order`), so
    `merge_fn` (default: concatenate the features) joins the two views of
    each step. With `return_carry` the carry is `(forward, backward)`, and
    an `initial_carry` is that pair too. Params live under `forward_rnn` and
    `backward_rnn`, as in Flax.

    >>> bi = fx.nn.Bidirectional(fx.nn.RNN(fx.nn.GRUCell(4)), fx.nn.RNN(fx.nn.GRUCell(4)))
    >>> t = fx.transform(lambda x: bi(x))
    >>> x = jnp.ones((2, 7, 3))
    >>> v = t.init(jax.random.key(0), x)
    >>> sorted(v["params"]["Bidirectional_0"]), t.apply(v, x).shape
    (['backward_rnn', 'forward_rnn'], (2, 7, 8))
    """

    forward_rnn: Module
    backward_rnn: Module
    merge_fn: Callable[[jax.Array, jax.Array], jax.Array] = _concatenate
    time_major: bool = False
    return_carry: bool = False

    def __post_init__(self) -> None:
        check_bools(self, "time_major", "return_carry")
        check_callables(self, "forward_rnn", "backward_rnn", "merge_fn")

    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry: Any = None,
        init_key: jax.Array | None = None,
        seq_lengths: Any = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
    ) -> Any:
        time_major = self.time_major if time_major is None else time_major
        return_carry = self.return_carry if return_carry is None else return_carry
        key_forward = key_backward = None
        if init_key is not None:
            key_forward, key_backward = jax.random.split(init_key)
        carry_forward = carry_backward = None
        if initial_carry is not None:
            if not (isinstance(initial_carry, (tuple, list)) and len(initial_carry) == 2):
                raise EffaxError(
                    f"{where('Bidirectional')}: initial_carry must be a pair (forward carry, backward carry), got "
                    f"{type(initial_carry).__name__}: write `initial_carry=(carry_fwd, carry_bwd)`."
                )
            carry_forward, carry_backward = initial_carry
        carry_forward, outputs_forward = self.forward_rnn(
            inputs, initial_carry=carry_forward, init_key=key_forward, seq_lengths=seq_lengths,
            return_carry=True, time_major=time_major, reverse=False,
        )
        carry_backward, outputs_backward = self.backward_rnn(
            inputs, initial_carry=carry_backward, init_key=key_backward, seq_lengths=seq_lengths,
            return_carry=True, time_major=time_major, reverse=True, keep_order=True,
        )
        outputs = jax.tree.map(self.merge_fn, outputs_forward, outputs_backward)
        return ((carry_forward, carry_backward), outputs) if return_carry else outputs
