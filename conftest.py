"""Root conftest: doctests in effax/ see `fx`, `jax` and `jnp` like the README's examples."""

import jax
import jax.numpy as jnp
import pytest

import effax as fx


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(fx=fx, jax=jax, jnp=jnp)
