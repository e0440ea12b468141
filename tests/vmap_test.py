"""Batched proposal kernels equal a Python loop over the same keys."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

import spear_jax
from spear_jax import _linalg
from spear_jax import _proposals


class VmapTest(chex.TestCase):
  def _problem(self, m=40, b=6, seed=0):
    rng = np.random.default_rng(seed)
    l_mxb = np.linalg.qr(rng.standard_normal((m, b)))[0]
    alive = np.ones(m, bool)
    alive[[3, 17]] = False
    rows = np.concatenate([np.flatnonzero(alive), np.zeros(2, int)])
    return (
      jnp.asarray(l_mxb),
      jnp.asarray(rows.astype(np.int32)),
      jnp.asarray(alive),
      jnp.asarray(int(alive.sum())),
    )

  def test_propose_block_equals_loop(self):
    l_mxb, rows, alive, num_alive = self._problem()
    key = jax.random.key(3)
    tol = jnp.asarray(1e-8)
    directions, zeros = _proposals.propose_block(
      key, l_mxb, rows, alive, num_alive, tol, block_size=12, chunk_size=4
    )
    keys = jax.random.split(key, 12)
    for i in range(12):
      q, z = spear_jax.attack.propose_direction(
        keys[i], l_mxb, rows, alive, num_alive, tol
      )
      np.testing.assert_allclose(directions[i], q, rtol=0, atol=1e-14)
      self.assertEqual(int(zeros[i]), int(z))

  def test_null_vector_vmap_equals_loop(self):
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((7, 4, 5)))
    batched = jax.vmap(_linalg.null_vector)(a)
    for i in range(7):
      np.testing.assert_allclose(
        batched[i], _linalg.null_vector(a[i]), rtol=0, atol=1e-14
      )

  def test_no_retrace_with_new_values(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def block(key, l_mxb, rows, alive, num_alive):
      return jax.vmap(
        spear_jax.attack.propose_direction,
        in_axes=(0, None, None, None, None, None),
      )(
        jax.random.split(key, 8),
        l_mxb,
        rows,
        alive,
        num_alive,
        jnp.asarray(1e-8),
      )

    for seed in range(2):
      l_mxb, rows, alive, num_alive = self._problem(seed=seed)
      jax.block_until_ready(
        block(jax.random.key(seed), l_mxb, rows, alive, num_alive)
      )
    before = _proposals.propose_block._cache_size()
    for seed in (5, 6):
      l_mxb, rows, alive, num_alive = self._problem(seed=seed)
      _proposals.propose_block(
        jax.random.key(seed),
        l_mxb,
        rows,
        alive,
        num_alive,
        jnp.asarray(1e-8),
        block_size=8,
        chunk_size=4,
      )
    self.assertLessEqual(_proposals.propose_block._cache_size(), before + 1)


if __name__ == "__main__":
  absltest.main()
