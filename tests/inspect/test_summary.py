"""fx.summary: rows by path and kind, real counts, totals, tied params marked, nothing allocated."""

import jax
import jax.numpy as jnp
import pytest

import effax as fx

init = jax.nn.initializers


def model(x):
    with fx.scope("enc"):
        w = fx.param("w", init.lecun_normal(), (3, 4), axes=("embed", "mlp"))
        b = fx.param("b", init.zeros, (4,), jnp.bfloat16)
    stats = fx.local_state("stats", lambda: (jnp.zeros(4), jnp.zeros((), jnp.int32)), collection="batch_stats")
    y = x @ w + b
    if fx.is_training():
        stats.set((y.mean(0), stats.get()[1] + 1))
        with fx.scope("drop"):
            y = y * jax.random.bernoulli(fx.next_key("dropout"), 0.5, y.shape)
            fx.next_key("dropout")
    fx.sow("h", y)
    return y * fx.side_input("scale", default=jnp.ones(4))


X = jnp.ones((2, 3))


def by_path(summary):
    return {(e.kind, "/".join(e.path)): e for e in summary.entries}


def test_rows_cover_every_kind_with_shapes_dtypes_and_sizes():
    s = fx.summary(fx.transform(model), X, training=True)
    rows = by_path(s)
    assert set(rows) == {
        ("param", "enc/w"), ("param", "enc/b"), ("state", "stats/0"), ("state", "stats/1"),
        ("random", "drop"), ("sow", "h"), ("side_input", "scale"),
    }
    w, b = rows["param", "enc/w"], rows["param", "enc/b"]
    assert (w.shape, w.dtype, w.size, w.nbytes, w.axes) == ((3, 4), jnp.float32, 12, 48, ("embed", "mlp"))
    assert (b.dtype, b.nbytes) == (jnp.bfloat16, 8)
    assert rows["state", "stats/1"].collection == "batch_stats"
    assert (rows["random", "drop"].collection, rows["random", "drop"].uses) == ("dropout", 2)
    assert (rows["sow", "h"].collection, rows["sow", "h"].shape) == ("intermediates", (2, 4))
    assert rows["side_input", "scale"].shape == (4,)
    assert (s.param_count, s.param_bytes, s.state_count, s.state_bytes) == (16, 56, 5, 20)
    assert s.totals() == {"params": (16, 56), "batch_stats": (5, 20)}


def test_eval_mode_draws_no_keys():
    kinds = {e.kind for e in fx.summary(fx.transform(model), X).entries}
    assert "random" not in kinds


def test_text_table():
    text = str(fx.summary(fx.transform(model), X, training=True))
    lines = text.splitlines()
    assert lines[0].split() == ["path", "kind", "collection", "shape", "dtype", "size", "bytes", "note"]
    row = next(line for line in lines if line.startswith("enc/w"))
    assert row.split()[:8] == ["enc/w", "param", "params", "(3,", "4)", "float32", "12", "48"]
    assert "axes (embed, mlp)" in row
    assert "2 draws" in next(line for line in lines if line.startswith("drop"))
    assert "total params: 16 (56 B)" in lines
    assert "total batch_stats: 5 (20 B)" in lines


def test_counts_and_variables_equal_real_init():
    t = fx.transform(lambda x: fx.nn.MLP([32, 16, 4])(x))
    s = fx.summary(t, X)
    variables = jax.jit(t.init)(jax.random.key(0), X)
    assert s.param_count == sum(a.size for a in jax.tree.leaves(variables["params"]))
    assert s.param_bytes == sum(a.nbytes for a in jax.tree.leaves(variables["params"]))
    assert s.variables == jax.eval_shape(t.init, jax.random.key(0), X)


def test_state_variables_equal_real_init():
    t = fx.transform(model)
    assert fx.summary(t, X).variables == jax.eval_shape(t.init, jax.random.key(0), X)


def test_allocates_nothing():
    """A 4 TiB param: any concrete allocation would fail; the summary only reads shapes."""

    def huge(x):
        return x @ fx.param("w", init.normal(), (1 << 20, 1 << 20))[:3, :3]

    s = fx.summary(fx.transform(huge), jax.ShapeDtypeStruct((2, 3), jnp.float32))
    assert s.param_count == 1 << 40
    assert "4.0 TiB" in str(s)


def test_abstract_inputs_and_static_arguments():
    def f(x, width):
        return x @ fx.param("w", init.ones, (x.shape[-1], width))

    s = fx.summary(fx.transform(f), jax.ShapeDtypeStruct((5, 7), jnp.float32), width=3)
    assert by_path(s)["param", "w"].shape == (7, 3)


def test_tied_params_are_marked_and_counted_once():
    def tied(x):
        with fx.scope("encoder"):
            e = fx.param("w", init.ones, (3, 3))
        with fx.scope("decoder"):
            d = fx.param("w", init.ones, (3, 3))
        return x @ e @ d

    s = fx.summary(fx.transform(fx.share(tied, {"decoder": "encoder"})), X)
    (entry,) = s.entries
    assert entry.path == ("encoder", "w") and entry.aliases == ("decoder/w",) and entry.shared
    assert s.param_count == 9
    assert "shared with decoder/w" in str(s)


def test_a_layer_called_twice_is_shared():
    def twice(x):
        dense = fx.nn.Dense(3)
        return dense(dense(x))

    s = fx.summary(fx.transform(twice), X)
    assert all(e.shared and e.uses == 2 for e in s.entries)
    assert s.param_count == 12
    assert not by_path(fx.summary(fx.transform(model), X))["param", "enc/w"].shared


def test_side_inputs_given_through_handlers():
    def f():
        return fx.side_input("mask") * fx.param("w", init.ones, (2,))

    with pytest.raises(fx.UnhandledEffectError, match="mask"):
        fx.summary(fx.transform(f))
    s = fx.summary(fx.transform(f), handlers=[fx.handlers.SideInputs({"mask": jnp.ones(2, jnp.int32)})])
    assert by_path(s)["side_input", "mask"].dtype == jnp.int32


def test_treescope_rendering():
    treescope = pytest.importorskip("treescope")
    text = treescope.render_to_text(fx.summary(fx.transform(model), X))
    assert text.startswith("Summary(")
    assert "'param enc/w': Entry(" in text and "totals=" in text


@pytest.mark.parametrize("call", ["fx.summary", "fx.effects_of"])
def test_a_module_class_is_refused_with_the_instance_to_pass(call):
    """`fx.summary(fx.nn.Dense, x)` built a Dense from x and blamed its `features`."""
    fn = fx.summary if call == "fx.summary" else fx.effects_of
    with pytest.raises(fx.EffaxError, match=rf"{call} got the class Dense; pass an instance: {call}\(Dense\("):
        fn(fx.nn.Dense, X)
    assert len(fn(fx.nn.Dense(4), X).entries if call == "fx.summary" else fn(fx.nn.Dense(4), X)) == 2


def test_a_key_given_first_as_to_init_says_summary_takes_the_models_own_arguments():
    """`fx.summary(t, key, x)` (the init habit) was a raw TypeError `model() takes 1 positional argument`."""
    t = fx.transform(model)
    key = jax.random.key(0)
    with pytest.raises(fx.EffaxError, match=r"fx.summary: the model `model` cannot take these arguments \(too many "
                                            r"positional arguments\)\. fx.summary takes the model's own arguments, "
                                            r"`fx.summary\(t, x\)`.*Its first argument is a key.*drop it"):
        fx.summary(t, key, X)
    with pytest.raises(fx.EffaxError, match=r"fx.effects_of: the model `model` cannot take these arguments \(missing"):
        fx.effects_of(t)
    assert fx.summary(t, X, rngs=key).param_count == fx.summary(t, X).param_count == 16  # the fix


def test_a_missing_side_input_in_summary_says_to_pass_handlers_to_the_call_that_runs_it():
    """The hint named only `t.apply(..., handlers=...)`, though `fx.summary` runs the model and takes them too."""
    with pytest.raises(fx.EffaxError, match=r"in the call that runs the model \(`t.apply`, `t.init`, `fx.summary`"):
        fx.summary(lambda: fx.side_input("ctx"))
    assert fx.summary(lambda: fx.side_input("ctx"), handlers=[fx.handlers.SideInputs({"ctx": 1.0})]) is not None
