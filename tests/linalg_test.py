"""Tests of the exact linear algebra: null vectors, factorisation, polish."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

import spear_jax
from spear_jax import _linalg


class NullVectorTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("b2", 2, 0), ("b5", 5, 1), ("b16", 16, 2), ("b25", 25, 3)
  )
  def test_matches_svd_null_space(self, b, seed):
    rng = np.random.default_rng(seed)
    a_kxb = rng.standard_normal((b - 1, b))
    q = np.asarray(self.variant(spear_jax.null_vector)(jnp.asarray(a_kxb)))
    chex.assert_shape(q, (b,))
    # Independent reference: last right singular vector from LAPACK.
    reference = np.linalg.svd(a_kxb)[2][-1]
    np.testing.assert_allclose(np.linalg.norm(q), 1.0, rtol=0, atol=1e-14)
    np.testing.assert_allclose(abs(q @ reference), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a_kxb @ q, 0.0, rtol=0, atol=1e-13)

  def test_b1_is_trivial(self):
    q = spear_jax.null_vector(jnp.zeros((0, 1)))
    np.testing.assert_allclose(np.abs(np.asarray(q)), [1.0])

  def test_rejects_wrong_shape(self):
    with self.assertRaisesRegex(ValueError, "b-1"):
      spear_jax.null_vector(jnp.zeros((3, 3)))


class FactorizeTest(chex.TestCase):

  @parameterized.named_parameters(("b1", 1), ("b4", 4), ("b9", 9))
  def test_rank_and_product(self, b):
    rng = np.random.default_rng(b)
    g = rng.standard_normal((30, b)) @ rng.standard_normal((b, 20))
    tol = spear_jax.resolve_tolerances(
      spear_jax.AttackConfig(), jnp.float64, 30, 20
    )
    l, r, rank, _ = spear_jax.factorize(jnp.asarray(g), None, tol.rank_rtol)
    self.assertEqual(rank, b)
    chex.assert_shape((l, r), ((30, b), (b, 20)))
    np.testing.assert_allclose(np.asarray(l.T @ l), np.eye(b), atol=1e-13)
    np.testing.assert_allclose(np.asarray(l @ r), g, rtol=0, atol=1e-12)

  def test_float32_tolerances_are_looser(self):
    cfg = spear_jax.AttackConfig()
    t64 = spear_jax.resolve_tolerances(cfg, jnp.float64, 10, 10)
    t32 = spear_jax.resolve_tolerances(cfg, jnp.float32, 10, 10)
    self.assertLess(t64.screen, t32.screen)
    self.assertLess(t64.zero, t64.screen)
    np.testing.assert_allclose(t64.screen, np.finfo(np.float64).eps ** 0.5)


class PolishTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_perturbed_true_direction_snaps_back(self):
    rng = np.random.default_rng(7)
    m, b = 80, 6
    d_mxb = (rng.random((m, b)) < 0.5) * rng.standard_normal((m, b))
    l_mxb, s, vt = np.linalg.svd(d_mxb, full_matrices=False)
    q_true = (s[:, None] * vt)[:, 2]  # D[:, 2] = L q_true
    q_true /= np.linalg.norm(q_true)
    noisy = q_true + 1e-10 * rng.standard_normal(b)
    noisy /= np.linalg.norm(noisy)
    polished, zeros = self.variant(spear_jax.polish_direction)(
      jnp.asarray(noisy), jnp.asarray(l_mxb), jnp.ones(m, bool),
      jnp.asarray(1e-8), jnp.asarray(1e-12),
    )
    np.testing.assert_allclose(np.asarray(polished), q_true, atol=1e-13)
    self.assertEqual(int(zeros), int(np.sum(d_mxb[:, 2] == 0)))


if __name__ == "__main__":
  absltest.main()
