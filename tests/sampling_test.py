"""Tests of the uniform row-subset sampler."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax import _sampling


class SampleRowsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("k1", 1), ("k5", 5), ("k9", 9))
  def test_distinct_alive_rows(self, k):
    alive = np.array([0, 2, 3, 5, 6, 7, 8, 10, 11, 1], np.int32)
    alive_rows = jnp.asarray(np.concatenate([alive, np.zeros(2, np.int32)]))
    sample = self.variant(
      lambda key: _sampling.sample_rows(key, alive_rows, jnp.asarray(10), k)
    )
    for i in range(30):
      rows = np.asarray(sample(jax.random.key(i)))
      chex.assert_shape(rows, (k,))
      self.assertLen(set(rows.tolist()), k)
      self.assertTrue(set(rows.tolist()) <= set(alive.tolist()))

  def test_every_subset_equally_likely(self):
    # All C(5, 2) = 10 subsets of 5 rows; chi-square over 20000 draws.
    keys = jax.random.split(jax.random.key(0), 20000)
    rows = jax.vmap(
      lambda key: _sampling.sample_rows(
        key, jnp.arange(5, dtype=jnp.int32), jnp.asarray(5), 2
      )
    )(keys)
    rows = np.sort(np.asarray(rows), axis=1)
    codes = rows[:, 0] * 5 + rows[:, 1]
    counts = np.array([np.sum(codes == c) for c in np.unique(codes)])
    self.assertLen(counts, 10)
    expected = 2000.0
    chi2 = np.sum((counts - expected) ** 2 / expected)
    self.assertLess(chi2, 27.9)  # 99.9% quantile of chi2 with 9 d.o.f.


if __name__ == "__main__":
  absltest.main()
