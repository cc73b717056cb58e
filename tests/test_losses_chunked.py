"""The one chunked scan every vocabulary-sized computation runs through."""

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.losses.chunked import chunked_scan, chunked_sums, unchunk


def test_chunked_sums_pads_the_last_chunk_and_differentiates():
    x = jnp.arange(10, dtype=jnp.float32)
    w = jnp.ones(10, jnp.float32)
    fn = lambda x_: chunked_sums(lambda c: jnp.sum(c["w"] * c["x"] ** 2), jnp.zeros((), jnp.float32),
                                 {"x": x_, "w": w}, 4)
    np.testing.assert_allclose(fn(x), float(np.sum(np.arange(10.0) ** 2)))
    np.testing.assert_allclose(jax.grad(fn)(x), 2 * np.arange(10.0))


def test_chunked_scan_outputs_per_chunk_and_unchunk_drops_padding():
    x = jnp.arange(10, dtype=jnp.int32)
    carry, ys = chunked_scan(lambda n, c: (n + 1, (c * 2, c.sum())), jnp.int32(0), x, 4)
    assert int(carry) == 3 and ys[0].shape == (3, 4) and ys[1].shape == (3,)
    doubled, _ = unchunk(ys, 10)
    np.testing.assert_array_equal(doubled, 2 * np.arange(10))
    np.testing.assert_array_equal(ys[1], [6, 22, 17])  # the last chunk padded with zeros


def test_chunk_size_larger_than_the_tokens_is_one_chunk():
    _, ys = chunked_scan(lambda c, x: (c, x), (), jnp.ones((3, 2)), 512)
    assert ys.shape == (1, 3, 2)
