"""Top-k / top-p filters against a sort-based numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from mpo_jax.engine.sampling import _filter_top_k, _filter_top_p


def nucleus_reference(logits, top_p):
    """Sort, keep tokens while the mass before them is below top_p (the usual definition)."""
    keep = np.zeros_like(logits, bool)
    for row, x in enumerate(logits):
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep[row, order[before < top_p]] = True
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_keeps_the_same_tokens_as_the_sorted_definition(top_p):
    logits = np.random.default_rng(int(top_p * 1000)).normal(0, 3, (6, 500)).astype(np.float32)
    kept = np.asarray(_filter_top_p(jnp.asarray(logits), jnp.float32(top_p))) > -1e29
    np.testing.assert_array_equal(kept, nucleus_reference(logits, top_p))


def test_top_k_keeps_exactly_k_tokens():
    logits = np.random.default_rng(0).normal(size=(4, 100)).astype(np.float32)
    kept = np.asarray(_filter_top_k(jnp.asarray(logits), 7)) > -1e29
    assert kept.sum(axis=1).tolist() == [7] * 4
    for row in range(4):
        assert set(np.flatnonzero(kept[row])) == set(np.argsort(-logits[row])[:7])
