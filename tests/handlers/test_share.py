"""fx.share: weight tying as a handler pass (docs/design.md, "Sharing")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effax as fx
from effax.core import send

INIT = jax.nn.initializers.normal(1.0)
KEY = jax.random.key(0)
X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)


def dense(name, x, out=3, dtype=jnp.float32):
    with fx.scope(name):
        w = fx.param("weight", INIT, (x.shape[-1], out), dtype)
        b = fx.param("bias", INIT, (out,), dtype)
    return x @ w + b


def mlp(x):
    """Inox's WeightSharingMLP shape: four same-size layers."""
    for name in ("l1", "l2", "l3", "l4"):
        x = jnp.tanh(dense(name, x))
    return x.sum()


INOX = {"l2": "l1", "l4/weight": "l3/weight"}


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def untie(params, bindings):
    """The untied model's params with every alias entry a copy of its canonical one."""
    out = jax.tree.map(lambda a: a, params)
    full = fx.transform(mlp).init(KEY, X)["params"]
    for path, _ in jax.tree_util.tree_flatten_with_path(full)[0]:
        names = tuple(k.key for k in path)
        src = names
        for alias, canonical in bindings.items():
            a = tuple(alias.split("/"))
            if names[: len(a)] == a:
                src = tuple(canonical.split("/")) + names[len(a) :]
        node = params
        for n in src:
            node = node[n]
        target = out
        for n in names[:-1]:
            target = target.setdefault(n, {})
        target[names[-1]] = node
    return out


# --- tied layers and tied params


def test_tied_layer_and_tied_param_appear_once():
    t = fx.transform(fx.share(mlp, INOX))
    params = t.init(KEY, X)["params"]
    assert shapes(params) == {
        "l1": {"weight": (3, 3), "bias": (3,)},
        "l3": {"weight": (3, 3), "bias": (3,)},
        "l4": {"bias": (3,)},
    }


def test_tied_model_equals_untied_model_with_copied_weights(maybe_jit):
    tied = fx.transform(fx.share(mlp, INOX))
    params = tied.init(KEY, X)["params"]
    expected = fx.transform(mlp).apply({"params": untie(params, INOX)}, X)
    got = maybe_jit(tied.apply)({"params": params}, X)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_init_output_agrees_with_apply():
    t = fx.transform(fx.share(mlp, INOX))
    out, variables = t.init_with_output(KEY, X)
    np.testing.assert_allclose(t.apply(variables, X), out, rtol=1e-6)


def test_canonical_value_is_the_canonical_paths_init():
    """The tied weight is initialized from the canonical path's key, as if untied."""
    tied = fx.transform(fx.share(mlp, INOX)).init(KEY, X)["params"]
    untied = fx.transform(mlp).init(KEY, X)["params"]
    np.testing.assert_array_equal(tied["l1"]["weight"], untied["l1"]["weight"])
    np.testing.assert_array_equal(tied["l3"]["weight"], untied["l3"]["weight"])


def test_gradient_of_tied_weight_is_sum_over_uses():
    tied = fx.transform(fx.share(mlp, INOX))
    params = tied.init(KEY, X)["params"]
    g_tied = jax.grad(lambda p: tied.apply({"params": p}, X))(params)
    g_untied = jax.grad(lambda p: fx.transform(mlp).apply({"params": p}, X))(untie(params, INOX))
    np.testing.assert_allclose(g_tied["l1"]["weight"], g_untied["l1"]["weight"] + g_untied["l2"]["weight"], rtol=1e-5)
    np.testing.assert_allclose(g_tied["l1"]["bias"], g_untied["l1"]["bias"] + g_untied["l2"]["bias"], rtol=1e-5)
    np.testing.assert_allclose(g_tied["l3"]["weight"], g_untied["l3"]["weight"] + g_untied["l4"]["weight"], rtol=1e-5)
    np.testing.assert_allclose(g_tied["l4"]["bias"], g_untied["l4"]["bias"], rtol=1e-5)


def test_tuple_and_string_paths_are_the_same_binding():
    a = fx.transform(fx.share(mlp, {("l2",): ("l1",), ("l4", "weight"): "l3/weight"})).init(KEY, X)
    b = fx.transform(fx.share(mlp, INOX)).init(KEY, X)
    assert shapes(a) == shapes(b)


def test_prefix_matches_whole_names_only():
    def model(x):
        return dense("l1", x).sum() + dense("l10", x).sum() + dense("l2", x).sum()

    params = fx.transform(fx.share(model, {"l2": "l1"})).init(KEY, X)["params"]
    assert sorted(params) == ["l1", "l10"]


def test_chains_resolve_to_the_last_canonical():
    params = fx.transform(fx.share(mlp, {"l3": "l2", "l2": "l1"})).init(KEY, X)["params"]
    assert sorted(params) == ["l1", "l4"]


def test_chain_through_a_nested_canonical():
    """`l4 -> l3` then `l3/weight -> l1/weight`: l4's weight ends at l1, its bias at l3."""
    t = fx.transform(fx.share(mlp, {"l4": "l3", "l3/weight": "l1/weight"}))
    params = t.init(KEY, X)["params"]
    assert shapes(params) == {
        "l1": {"weight": (3, 3), "bias": (3,)},
        "l2": {"weight": (3, 3), "bias": (3,)},
        "l3": {"bias": (3,)},
    }


def test_nested_bindings_that_agree_are_accepted():
    params = fx.transform(fx.share(mlp, {"l2": "l1", "l2/bias": "l1/bias"})).init(KEY, X)["params"]
    assert sorted(params) == ["l1", "l3", "l4"]


def test_apply_reads_canonical_entry_and_ignores_nothing_else():
    t = fx.transform(fx.share(mlp, INOX))
    variables = t.init(KEY, X)
    report = fx.check_variables(t, variables, X)
    assert report.ok, str(report)


def test_apply_with_missing_canonical_names_the_canonical_path():
    t = fx.transform(fx.share(mlp, INOX))
    params = t.init(KEY, X)["params"]
    del params["l3"]["weight"]
    with pytest.raises(fx.MissingVariableError, match="l3/weight"):
        t.apply({"params": params}, X)


def test_share_is_innermost_so_user_handlers_see_the_rewritten_request():
    seen = []

    class Spy(fx.Handler):
        def handle(self, request, forward):
            if isinstance(request, fx.ParamRequest):
                seen.append((request.path, request.origin, tuple(str(b) for b in request.via)))
            return forward(request)

    fx.transform(fx.share(mlp, INOX)).init(KEY, X, handlers=[Spy()])
    assert (("l1", "weight"), ("l2", "weight"), ("l2 -> l1",)) in seen
    assert (("l3", "weight"), ("l4", "weight"), ("l4/weight -> l3/weight",)) in seen
    assert (("l1", "weight"), None, ()) in seen


def test_share_composes_with_an_outer_handler_stack():
    t = fx.transform(mlp)
    params = fx.transform(fx.share(mlp, INOX)).init(KEY, X)["params"]
    with fx.handle(fx.handlers.LoadParams(params)):
        got = fx.share(mlp, INOX)(X)
    np.testing.assert_allclose(got, t.apply({"params": untie(params, INOX)}, X), rtol=1e-6)


def test_random_keys_and_sows_are_not_tied():
    def model():
        out = {}
        for name in ("a", "b"):
            with fx.scope(name):
                fx.param("w", INIT, (2,))
                out[name] = jax.random.key_data(fx.next_key("dropout"))
                fx.sow("h", 1.0)
        return out

    t = fx.transform(fx.share(model, {"b": "a"}))
    variables = t.init(KEY)
    out, sown = t.apply(variables, rngs=KEY, mutable="intermediates")
    assert not np.array_equal(out["a"], out["b"])
    assert sown == {"intermediates": {"a": {"h": (1.0,)}, "b": {"h": (1.0,)}}}


def test_sharing_twice_equals_sharing_once():
    once = fx.transform(fx.share(mlp, INOX))
    twice = fx.transform(fx.share(fx.share(mlp, INOX), INOX))
    v1, v2 = once.init(KEY, X), twice.init(KEY, X)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), v1, v2))
    np.testing.assert_array_equal(once.apply(v1, X), twice.apply(v2, X))


def test_nested_passes_compose():
    """An inner pass ties l2 to l1; an outer one ties l4 to l3."""
    t = fx.transform(fx.share(fx.share(mlp, {"l2": "l1"}), {"l4": "l3"}))
    assert sorted(t.init(KEY, X)["params"]) == ["l1", "l3"]


def test_share_keeps_the_function_name():
    assert fx.share(mlp, INOX).__name__ == "mlp"


def test_empty_bindings_are_the_identity():
    a = fx.transform(fx.share(mlp, {})).init(KEY, X)
    b = fx.transform(mlp).init(KEY, X)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def test_share_under_jit_and_grad_of_init(maybe_jit):
    t = fx.transform(fx.share(mlp, INOX))
    v = maybe_jit(t.init)(KEY, X)
    assert shapes(v) == shapes(t.init(KEY, X))


# --- errors


def test_unmatched_binding_raises_at_end_of_run_naming_it():
    with pytest.raises(fx.ShareError, match=r"`l9 -> l1` matched nothing") as e:
        fx.transform(fx.share(mlp, {"l9": "l1"})).init(KEY, X)
    assert "strict=False" in str(e.value)


def test_unmatched_binding_suggests_the_nearest_scope():
    with pytest.raises(fx.ShareError, match=r"did you mean 'l2'"):
        fx.transform(fx.share(mlp, {"l2x": "l1"})).init(KEY, X)


def test_unmatched_binding_is_checked_after_the_model_ran():
    ran = []

    def model(x):
        ran.append(True)
        return mlp(x)

    with pytest.raises(fx.ShareError):
        fx.share(model, {"nowhere": "l1"})
        fx.transform(fx.share(model, {"nowhere": "l1"})).init(KEY, X)
    assert ran == [True]


def test_strict_false_allows_unmatched_bindings():
    params = fx.transform(fx.share(mlp, {"l9": "l1"}, strict=False)).init(KEY, X)["params"]
    assert sorted(params) == ["l1", "l2", "l3", "l4"]


def test_two_way_cycle_raises_when_made():
    with pytest.raises(fx.ShareError, match=r"cycle: `l2` -> `l1` -> `l2`"):
        fx.share(mlp, {"l2": "l1", "l1": "l2"})


def test_self_binding_is_a_cycle():
    with pytest.raises(fx.ShareError, match="cycle"):
        fx.share(mlp, {"l1": "l1"})


def test_canonical_under_its_own_alias_is_a_cycle():
    with pytest.raises(fx.ShareError, match=r"cycle: `l1` -> `l1/x` -> `l1/x/x`"):
        fx.share(mlp, {"l1": "l1/x"})


def test_cycle_through_a_nested_alias_is_found_when_made():
    """`a -> b` and `b/c -> a/c` cycle for every path under `a/c`."""
    with pytest.raises(fx.ShareError, match=r"cycle: `b/c` -> `a/c` -> `b/c`"):
        fx.share(mlp, {"a": "b", "b/c": "a/c"})


def test_conflicting_nested_bindings_raise_naming_both():
    with pytest.raises(fx.ShareError, match=r"`l2 -> l1` and `l2/bias -> l3/bias` conflict") as e:
        fx.share(mlp, {"l2": "l1", "l2/bias": "l3/bias"})
    assert "sends it to `l1/bias`" in str(e.value) and "`l3/bias`" in str(e.value)


def test_alias_bound_twice_raises():
    with pytest.raises(fx.ShareError, match=r"`l2` is bound twice, to `l1` and to `l3`"):
        fx.share(mlp, {"l2": "l1", ("l2",): "l3"})


def test_shape_disagreement_names_both_paths():
    def model(x):
        return dense("l1", x, 3).sum() + dense("l2", x, 4).sum()

    with pytest.raises(fx.ShareError) as e:
        fx.transform(fx.share(model, {"l2": "l1"})).init(KEY, X)
    msg = str(e.value)
    assert "`l2/weight` (shape (3, 4), float32)" in msg and "`l1/weight` (shape (3, 3), float32)" in msg
    assert "`l2 -> l1`" in msg


def test_shape_disagreement_is_found_when_the_alias_comes_first():
    def model(x):
        return dense("l2", x, 4).sum() + dense("l1", x, 3).sum()

    # the alias is named as the one tied, whichever the model asks for first (it was swapped when the alias came first)
    tied = r"ties param `l2/weight` \(shape \(3, 4\).* to `l1/weight` \(shape \(3, 3\)"
    with pytest.raises(fx.ShareError, match=tied):
        fx.transform(fx.share(model, {"l2": "l1"})).init(KEY, X)


def test_dtype_disagreement_names_both_paths():
    def model(x):
        return dense("l1", x).sum() + dense("l2", x, dtype=jnp.bfloat16).sum()

    with pytest.raises(fx.ShareError, match=r"`l2/weight` \(shape \(3, 3\), bfloat16\).*float32"):
        fx.transform(fx.share(model, {"l2": "l1"})).init(KEY, X)


def test_same_path_disagreement_without_sharing_stays_a_param_conflict():
    def model():
        fx.param("w", INIT, (2,))
        fx.param("w", INIT, (3,))

    with pytest.raises(fx.ParamConflictError):
        fx.transform(fx.share(model, {})).init(KEY)


@pytest.mark.parametrize(
    ("bindings", "error", "match"),
    [
        ({"a//b": "c"}, fx.InvalidNameError, "empty"),
        ({"": "c"}, fx.InvalidNameError, "empty"),
        ({(): "c"}, fx.ShareError, "root path"),
        ({"a": 3}, fx.ShareError, "share path is a string"),
    ],
)
def test_bad_paths(bindings, error, match):
    with pytest.raises(error, match=match):
        fx.share(mlp, bindings)


def test_bindings_must_be_a_mapping():
    with pytest.raises(fx.ShareError, match="must be a dict"):
        fx.share(mlp, [("l2", "l1")])


def test_share_takes_the_model_not_the_transform():
    with pytest.raises(fx.EffaxError, match=r"fx.transform\(fx.share\(fn, bindings\)\)"):
        fx.share(fx.transform(mlp), INOX)


def test_share_errors_report_module_effax():
    assert fx.ShareError.__module__ == "effax"


# --- declared sharing: fx.param(..., shared=tag)


def encdec(x):
    """Penzai-style: both uses of the embedding are declared shareable by tag."""
    with fx.scope("encoder"):
        table = fx.param("table", INIT, (5, 3), shared="embed")
        h = table[x]
    with fx.scope("decoder"):
        table2 = fx.param("table", INIT, (5, 3), shared="embed")
    return h @ table2.T


TOKENS = jnp.array([0, 3, 4])


def test_unbound_tags_that_collide_raise_param_conflict():
    with pytest.raises(fx.ParamConflictError) as e:
        fx.transform(encdec).init(KEY, TOKENS)
    msg = str(e.value)
    assert "`encoder/table`" in msg and "`decoder/table`" in msg and "shared='embed'" in msg
    assert "fx.share(fn, tags=['embed'])" in msg


def test_unbound_tag_collision_is_found_under_apply_too():
    params = {"encoder": {"table": jnp.zeros((5, 3))}, "decoder": {"table": jnp.zeros((5, 3))}}
    with pytest.raises(fx.ParamConflictError, match="shared='embed'"):
        fx.transform(encdec).apply({"params": params}, TOKENS)


def test_a_tag_used_once_is_an_ordinary_param():
    def model():
        with fx.scope("encoder"):
            return fx.param("table", INIT, (5, 3), shared="embed")

    assert shapes(fx.transform(model).init(KEY)) == {"params": {"encoder": {"table": (5, 3)}}}


@pytest.mark.parametrize("tags", [True, ["embed"], "embed"])
def test_bound_tags_live_at_the_pass_path(tags):
    t = fx.transform(fx.share(encdec, tags=tags))
    assert shapes(t.init(KEY, TOKENS)) == {"params": {"embed": (5, 3)}}


def test_tag_bound_inside_a_scope_lives_in_that_scope():
    def outer(x):
        with fx.scope("model"):
            return fx.share(encdec, tags=True)(x)

    assert shapes(fx.transform(outer).init(KEY, TOKENS)) == {"params": {"model": {"embed": (5, 3)}}}


def test_tags_mapping_puts_the_tied_param_where_you_say():
    t = fx.transform(fx.share(encdec, tags={"embed": "encoder/table"}))
    params = t.init(KEY, TOKENS)["params"]
    assert shapes(params) == {"encoder": {"table": (5, 3)}}
    untied = jax.random.normal(KEY, (5, 3))
    g = jax.grad(lambda p: t.apply({"params": p}, TOKENS).sum())({"encoder": {"table": untied}})
    assert g["encoder"]["table"].shape == (5, 3)


def test_tagged_gradient_is_the_sum_over_uses():
    t = fx.transform(fx.share(encdec, tags=True))
    table = jax.random.normal(KEY, (5, 3))

    def untied(enc, dec):
        return (enc[TOKENS] @ dec.T).sum()

    g = jax.grad(lambda p: t.apply({"params": p}, TOKENS).sum())({"embed": table})["embed"]
    ge, gd = jax.grad(untied, argnums=(0, 1))(table, table)
    np.testing.assert_allclose(g, ge + gd, rtol=1e-5)


def test_listed_tag_that_matched_nothing_raises():
    with pytest.raises(fx.ShareError, match=r"`shared='embedding'` matched nothing"):
        fx.transform(fx.share(encdec, tags=["embed", "embedding"])).init(KEY, TOKENS)


def test_inner_pass_owns_its_tags():
    """Like nested Penzai `attach_shared_parameters`: the innermost binding of a tag wins."""

    def outer(x):
        with fx.scope("inner"):
            y = fx.share(encdec, tags=True)(x)
        return y

    t = fx.transform(fx.share(outer, tags=["embed"]))
    assert shapes(t.init(KEY, TOKENS)) == {"params": {"inner": {"embed": (5, 3)}}}


def test_two_passes_binding_one_tag_in_separate_scopes_are_separate_params():
    def model(x):
        with fx.scope("a"):
            y = fx.share(encdec, tags=True)(x)
        with fx.scope("b"):
            z = fx.share(encdec, tags=True)(x)
        return y + z

    params = fx.transform(model).init(KEY, TOKENS)["params"]
    assert shapes(params) == {"a": {"embed": (5, 3)}, "b": {"embed": (5, 3)}}


def test_tag_and_path_bindings_combine():
    """A tag bound to `shared/embed`, and the path binding `shared -> encoder` moves it on."""

    def model(x):
        h = encdec(x)
        with fx.scope("encoder"):
            fx.param("w", INIT, (2,))
        return h

    t = fx.transform(fx.share(model, {"shared": "encoder"}, tags={"embed": "shared/embed"}))
    assert shapes(t.init(KEY, TOKENS)) == {"params": {"encoder": {"embed": (5, 3), "w": (2,)}}}


def test_shared_tag_must_be_a_name():
    with pytest.raises(fx.InvalidNameError, match="shared tag"):
        fx.transform(lambda: fx.param("w", INIT, (2,), shared="a/b")).init(KEY)
    with pytest.raises(fx.InvalidNameError, match="shared tag"):
        fx.share(encdec, tags=[""])


# --- local state sharing policy


def counter_layer(name, size=2):
    with fx.scope(name):
        w = fx.param("w", INIT, (size,))
        n = fx.local_state("count", lambda: jnp.zeros((size,)))
        n.set(n.get() + 1.0)
        return w * n.get()


def stateful(x):
    return counter_layer("a") + counter_layer("b")


def test_state_under_an_alias_is_forbidden_by_default():
    with pytest.raises(fx.ShareError) as e:
        fx.transform(fx.share(stateful, {"b": "a"})).init(KEY, 1.0)
    msg = str(e.value)
    assert "state `b/count`" in msg and "`a/count`" in msg and "'forbidden'" in msg
    assert "state='allowed'" in msg and "state='unsafe'" in msg


def test_forbidden_still_ties_params_bound_one_by_one():
    t = fx.transform(fx.share(stateful, {"b/w": "a/w"}))
    v = t.init(KEY, 1.0)
    assert shapes(v) == {"params": {"a": {"w": (2,)}}, "state": {"a": {"count": (2,)}, "b": {"count": (2,)}}}


def test_allowed_shares_state_that_agrees():
    t = fx.transform(fx.share(stateful, {"b": "a"}, state="allowed"))
    v = t.init(KEY, 1.0)
    assert shapes(v) == {"params": {"a": {"w": (2,)}}, "state": {"a": {"count": (2,)}}}
    out, updates = t.apply(v, 1.0, mutable=True)
    # one cell: the first use sets it to 1, the second (tied) use to 2
    np.testing.assert_allclose(updates["state"]["a"]["count"], [2.0, 2.0])
    np.testing.assert_allclose(out, v["params"]["a"]["w"] * 1.0 + v["params"]["a"]["w"] * 2.0, rtol=1e-6)


def test_allowed_refuses_state_that_disagrees():
    def model(x):
        return counter_layer("a", 2).sum() + counter_layer("b", 3).sum()

    with pytest.raises(fx.ShareError) as e:
        fx.transform(fx.share(model, {"b/count": "a/count"}, state="allowed")).init(KEY, 1.0)
    msg = str(e.value)
    assert "state `b/count` is tied to `a/count`" in msg and "(3,)" in msg and "(2,)" in msg
    assert "state='unsafe'" in msg


def test_unsafe_shares_state_unchecked_first_init_wins():
    def model(x):
        with fx.scope("a"):
            fx.local_state("s", lambda: jnp.zeros(2))
        with fx.scope("b"):
            s = fx.local_state("s", lambda: jnp.ones(3))
        return s.get()

    t = fx.transform(fx.share(model, {"b": "a"}, state="unsafe"))
    v = t.init(KEY, 1.0)
    assert shapes(v["state"]) == {"a": {"s": (2,)}}
    np.testing.assert_array_equal(t.apply(v, 1.0), jnp.zeros(2))


def test_bad_state_policy():
    with pytest.raises(fx.ShareError, match="'forbidden'.*'allowed'.*'unsafe'"):
        fx.share(stateful, {"b": "a"}, state="shared")


def test_state_only_binding_shared_twice_equals_once():
    def model(x):
        with fx.scope("a"):
            s = fx.local_state("s", lambda: jnp.zeros(2))
        with fx.scope("b"):
            t = fx.local_state("s", lambda: jnp.zeros(2))
            t.set(t.get() + 1)
        return s.get()

    once = fx.transform(fx.share(model, {"b": "a"}, state="allowed"))
    twice = fx.transform(fx.share(fx.share(model, {"b": "a"}, state="allowed"), {"b": "a"}, state="allowed"))
    v = once.init(KEY, 1.0)
    assert shapes(twice.init(KEY, 1.0)) == shapes(v) == {"params": {}, "state": {"a": {"s": (2,)}}}
    np.testing.assert_array_equal(once.apply(v, 1.0, mutable=True)[1]["state"]["a"]["s"], [1.0, 1.0])
    np.testing.assert_array_equal(twice.apply(v, 1.0, mutable=True)[1]["state"]["a"]["s"], [1.0, 1.0])


def test_share_binding_str_and_handler_export():
    assert str(fx.ShareBinding(None, ("embed",), "embed")) == "shared='embed' -> embed"
    assert fx.handlers.share is fx.share
    assert isinstance(fx.handlers.Share({"b": "a"}), fx.Handler)


def test_a_path_binding_matches_a_tagged_param_on_the_path_it_was_asked_at():
    t = fx.transform(fx.share(encdec, {"decoder/table": "encoder/table"}, tags=True))
    assert shapes(t.init(KEY, TOKENS)) == {"params": {"embed": (5, 3)}}


def test_a_share_pass_around_another_resolves_the_chain_through_it():
    def model():
        out = 0.0
        for name in ("a", "b", "c"):
            with fx.scope(name):
                out = out + fx.param("w", jax.nn.initializers.normal(), (2,)).sum()
        return out

    once = fx.transform(fx.share(model, {"b": "a", "c": "b"}))
    twice = fx.transform(fx.share(fx.share(model, {"b": "a"}), {"c": "b"}))
    for t in (once, twice):
        v = t.init(jax.random.key(0))
        assert list(v["params"]) == ["a"]  # c -> b -> a: all three tied
    assert twice.apply(v) == once.apply(v)


def test_state_reads_and_writes_follow_a_chain_through_nested_passes():
    def model(x):
        for name in ("a", "b", "c"):
            with fx.scope(name):
                n = fx.local_state("n", lambda: jnp.zeros(()))
                n.set(n.get() + 1)
                x = x * fx.param("w", jax.nn.initializers.ones, (2,))
        return x.sum()

    once = fx.transform(fx.share(model, {"c": "b", "b": "a"}, state="allowed"))
    twice = fx.transform(fx.share(fx.share(model, {"b": "a"}, state="allowed"), {"c": "b"}, state="allowed"))
    x = jnp.ones(2)
    for t in (once, twice):
        v = t.init(jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, v) == {"params": {"a": {"w": (2,)}}, "state": {"a": {"n": ()}}}
        _, updates = t.apply(v, x, mutable=True)
        assert float(updates["state"]["a"]["n"]) == 3.0  # every layer's counter is the one at `a`


def test_a_read_of_undeclared_state_in_init_says_so_not_that_mutable_left_it_out():
    def model():
        return send(fx.GetStateRequest(("ghost",), "state"))  # a read no declaration made (a handler's own)

    with pytest.raises(fx.MissingVariableError, match="no `fx.local_state` declared it at that path"):
        fx.transform(model).init(None)


def test_share_arguments_and_bindings_written_relative_to_the_call_path_are_explained():
    with pytest.raises(fx.ShareError, match="tags=3 is not a set of tags"):
        fx.share(lambda: None, tags=3)

    def model(x):
        with fx.scope("block"):
            def inner(x):
                for name in ("enc", "dec"):
                    with fx.scope(name):
                        x = x * fx.param("w", jax.nn.initializers.ones, (2,))
                return x

            return fx.share(inner, {"dec": "enc"})(x)

    with pytest.raises(fx.ShareError, match="this pass runs at `block`: write `block/dec` -> `block/enc`"):
        fx.transform(model).init(jax.random.key(0), jnp.ones(2))


# --- a canonical path the model never asks for: a rename, not a tie


def embed_model(tokens):
    """The README's tied embedding: the decoder's projection reads the encoder's table."""
    out = tokens.astype(jnp.float32)
    for name in ("encoder", "decoder"):
        with fx.scope(name), fx.scope("embed"):
            out = out + fx.param("table", INIT, (3,)).sum()
    return out


def test_a_canonical_typo_raises_with_the_nearest_path_and_the_suggestion_works():
    with pytest.raises(fx.ShareError) as e:
        fx.transform(fx.share(embed_model, {"decoder/embed": "encoder/embd"})).init(KEY, TOKENS)
    msg = str(e.value)
    assert "`decoder/embed -> encoder/embd`" in msg and "nothing asks for `encoder/embd`" in msg
    assert "did you mean 'encoder/embed'?" in msg and "strict=False" in msg
    fixed = fx.transform(fx.share(embed_model, {"decoder/embed": "encoder/embed"})).init(KEY, TOKENS)
    assert shapes(fixed) == {"params": {"encoder": {"embed": {"table": (3,)}}}}
    loose = fx.transform(fx.share(embed_model, {"decoder/embed": "encoder/embd"}, strict=False))
    assert sorted(loose.init(KEY, TOKENS)["params"]["encoder"]) == ["embd", "embed"]  # strict=False: as asked


def test_a_canonical_asked_for_only_after_its_alias_is_a_tie():
    def model(x):
        return dense("l2", x).sum() + dense("l1", x).sum()

    assert sorted(fx.transform(fx.share(model, {"l2": "l1"})).init(KEY, X)["params"]) == ["l1"]


def test_a_canonical_reached_through_a_chain_or_another_pass_is_a_tie():
    """`c -> x -> a`: `x` is only a step of the chain, in one pass or across two (either nesting)."""
    for t in (
        fx.share(mlp, {"l2": "x", "x": "l1"}),
        fx.share(fx.share(mlp, {"l2": "x"}), {"x": "l1"}),
        fx.share(fx.share(mlp, {"x": "l1"}), {"l2": "x"}),
    ):
        assert sorted(fx.transform(t).init(KEY, X)["params"]) == ["l1", "l3", "l4"]


def test_a_canonical_asked_for_in_a_lifted_body_or_a_flax_module_is_a_tie():
    nn = pytest.importorskip("flax.linen")

    def lifted(x):
        with fx.scope("enc"):
            x = fx.remat(lambda h: jnp.tanh(dense("l", h)))(x)
        with fx.scope("dec"):
            return dense("l", x)

    assert list(fx.transform(fx.share(lifted, {"dec/l": "enc/l"})).init(KEY, X)["params"]) == ["enc"]

    def flax_model(x):
        with fx.scope("enc"):
            x = fx.from_flax(nn.Dense(3))(x)
        with fx.scope("dec"):
            return x @ fx.param("kernel", INIT, (3, 3)) + fx.param("bias", INIT, (3,))

    params = fx.transform(fx.share(flax_model, {"dec": "enc"})).init(KEY, X)["params"]
    assert shapes(params) == {"enc": {"kernel": (3, 3), "bias": (3,)}}


def test_an_apply_that_runs_only_the_alias_part_reads_the_canonical_entry():
    """A decode-only apply never asks for the encoder: the tie still holds, no error."""

    def seq2seq(x, decode_only=False):
        if not decode_only:
            with fx.scope("encoder"):
                x = x @ fx.param("w", INIT, (3, 3))
        with fx.scope("decoder"):
            return x @ fx.param("w", INIT, (3, 3)).T

    t = fx.transform(fx.share(seq2seq, {"decoder": "encoder"}))
    v = t.init(KEY, X)
    np.testing.assert_allclose(t.apply(v, X, decode_only=True), X @ v["params"]["encoder"]["w"].T, rtol=1e-6)


def test_a_shared_module_runs_at_the_root_scope_as_the_module_does():
    """`fx.transform(fx.share(module, ...))` ran the module as a child, `Seq2Seq_0/enc/...`, so linen
    variables (and the module's own `fx.transform` variables) did not load; called inside a model it is
    still a child, auto-named as any module call."""

    class Seq2Seq(fx.nn.Module):
        def __call__(self, x):
            return self.decode(self.encode(x))

        def encode(self, x):
            return fx.nn.Dense(3, name="enc")(x)

        def decode(self, x):
            return fx.nn.Dense(3, name="dec")(x)

    x, k = jnp.ones((1, 3)), jax.random.key(0)
    tied = fx.share(Seq2Seq(), {"dec": "enc"})
    v = fx.transform(tied).init(k, x)
    assert jax.tree.map(jnp.shape, v) == {"params": {"enc": {"bias": (3,), "kernel": (3, 3)}}}
    plain = fx.transform(Seq2Seq())
    np.testing.assert_allclose(fx.transform(tied).apply(v, x), plain.apply({"params": {**v["params"], "dec": v[
        "params"]["enc"]}}, x), rtol=1e-6)
    assert [e.path for e in fx.summary(tied, x).entries] == [("enc", "kernel"), ("enc", "bias")]
    assert fx.check_variables(tied, v, x).ok
    encode = fx.transform(fx.share(Seq2Seq(), {"dec": "enc"}, strict=False), method="encode")
    assert list(encode.init(k, x)["params"]) == ["enc"]
    inside = fx.transform(lambda x: fx.share(Seq2Seq(), {"Seq2Seq_0/dec": "Seq2Seq_0/enc"})(x)).init(k, x)
    assert list(inside["params"]) == ["Seq2Seq_0"] and list(inside["params"]["Seq2Seq_0"]) == ["enc"]


@pytest.mark.parametrize("lift", ["scan", "vmap", "remat"])
def test_a_pass_around_a_lift_ties_two_params_of_its_body(lift):
    """`fx.share(lambda x: fx.scan(body)(x), {"b": "a"})` with both uses in the body: init was refused (the
    body had made `b/w` on its own value, which the pass then answered with `a/w`'s), blaming a stateful
    handler the user never wrote. Init now makes one param, and init and apply agree."""
    init = jax.nn.initializers.lecun_normal()

    def body(c):
        with fx.scope("a"):
            c = jnp.tanh(c @ fx.param("w", init, (4, 4)))
        with fx.scope("b"):
            return jnp.tanh(c @ fx.param("w", init, (4, 4)))

    lifted = {
        "scan": lambda x: fx.scan(lambda c, _: (body(c), None), length=3)(x)[0],
        "vmap": lambda x: fx.vmap(body, in_axes=0)(x),
        "remat": lambda x: fx.remat(body)(x),
    }[lift]
    t = fx.transform(fx.share(lifted, {"b": "a"}))
    x = jax.random.normal(jax.random.key(1), (2, 4))
    out, v = t.init_with_output(jax.random.key(0), x)
    assert list(v["params"]) == ["a"]
    np.testing.assert_allclose(out, t.apply(v, x), rtol=1e-6)
