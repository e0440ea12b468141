"""Tests of the exact linear algebra: null vectors, factorisation, polish."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np

import spear_jax
from spear_jax import _linalg
from spear_jax import attack


class NullVectorTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("b2", 2, 0), ("b5", 5, 1), ("b16", 16, 2), ("b25", 25, 3)
  )
  def test_matches_svd_null_space(self, b, seed):
    rng = np.random.default_rng(seed)
    a_kxb = rng.standard_normal((b - 1, b))
    q = np.asarray(self.variant(_linalg.null_vector)(jnp.asarray(a_kxb)))
    chex.assert_shape(q, (b,))
    # Independent reference: last right singular vector from LAPACK.
    reference = np.linalg.svd(a_kxb)[2][-1]
    np.testing.assert_allclose(np.linalg.norm(q), 1.0, rtol=0, atol=1e-14)
    np.testing.assert_allclose(abs(q @ reference), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a_kxb @ q, 0.0, rtol=0, atol=1e-13)

  @parameterized.named_parameters(("b60", 60, ()), ("b80_batched", 80, (3,)))
  def test_rolled_elimination_matches_unrolled_and_svd(self, b, batch):
    # Above _UNROLL_MAX_ROWS rows the null vector uses the rolled loop.
    self.assertGreater(b - 1, _linalg._UNROLL_MAX_ROWS)
    rng = np.random.default_rng()
    a = rng.standard_normal((b - 1, b) + batch)
    rolled = np.asarray(_linalg._householder_null_rolled(jnp.asarray(a)))
    unrolled = np.asarray(_linalg._householder_null_unrolled(jnp.asarray(a)))
    # Same reflections, different order of summation: 1e-12.
    np.testing.assert_allclose(rolled, unrolled, atol=1e-12)
    for index in np.ndindex(*batch):
      q = rolled[(slice(None),) + index]
      _, _, vt = np.linalg.svd(a[(slice(None), slice(None)) + index])
      self.assertAlmostEqual(float(np.linalg.norm(q)), 1.0, places=12)
      self.assertAlmostEqual(float(abs(q @ vt[-1])), 1.0, places=10)
    # The public entry point takes the rolled path at this size.
    if not batch:
      np.testing.assert_allclose(
        np.asarray(_linalg.null_vector(jnp.asarray(a))), rolled, atol=1e-15
      )

  def test_b1_is_trivial(self):
    q = _linalg.null_vector(jnp.zeros((0, 1)))
    np.testing.assert_allclose(np.abs(np.asarray(q)), [1.0])

  def test_rejects_wrong_shape(self):
    with self.assertRaisesRegex(ValueError, "b-1"):
      _linalg.null_vector(jnp.zeros((3, 3)))


class FactorizeTest(chex.TestCase):
  @parameterized.named_parameters(("b1", 1), ("b4", 4), ("b9", 9))
  def test_rank_and_product(self, b):
    rng = np.random.default_rng(b)
    g = rng.standard_normal((30, b)) @ rng.standard_normal((b, 20))
    tol = _linalg.resolve_tolerances(
      spear_jax.AttackConfig(), jnp.float64, 30, 20
    )
    l, r, rank, _ = spear_jax.attack.factorize(
      jnp.asarray(g), None, tol.rank_rtol
    )
    self.assertEqual(rank, b)
    chex.assert_shape((l, r), ((30, b), (b, 20)))
    np.testing.assert_allclose(np.asarray(l.T @ l), np.eye(b), atol=1e-13)
    np.testing.assert_allclose(np.asarray(l @ r), g, rtol=0, atol=1e-12)

  @parameterized.named_parameters(("given", True), ("numerical", False))
  def test_sketch_matches_the_svd(self, given):
    # A rank-b matrix with a spread spectrum (condition number 1e4), fresh
    # draws; the sketch must span the same subspace and rebuild the matrix
    # to float64 rounding (compared with numpy's SVD, not our code).
    rng = np.random.default_rng()
    m, n, b = 300, 700, int(rng.integers(5, 40))
    u, _ = np.linalg.qr(rng.standard_normal((m, b)))
    v, _ = np.linalg.qr(rng.standard_normal((n, b)))
    g = (u * np.logspace(0, -4, b)) @ v.T
    rtol = 10 * max(m, n) * np.finfo(np.float64).eps
    l, r, rank, s = _linalg.factorize(
      jnp.asarray(g), b if given else None, rtol, method="sketch"
    )
    self.assertEqual(rank, b)
    self.assertLess(s.shape[0], min(m, n))  # a sketch, not the full SVD
    l = np.asarray(l)
    np.testing.assert_allclose(l.T @ l, np.eye(b), atol=1e-13)
    np.testing.assert_allclose(l @ np.asarray(r), g, rtol=0, atol=1e-14)
    reference = np.linalg.svd(g)[0][:, :b]
    # Same subspace: the projector difference, to 1e-10 at condition 1e4.
    np.testing.assert_allclose(
      l @ l.T, reference @ reference.T, rtol=0, atol=1e-10
    )

  def test_invert_through_the_sketch_is_exact(self):
    seed = int(np.random.default_rng().integers(1 << 30))
    p = helpers.relu_layer_problem(seed, 150, 80, 6)
    result = spear_jax.invert(
      p["weight_grad"],
      p["bias_grad"],
      key=jax.random.key(seed),
      weight=p["weight"],
      bias=p["bias"],
      config=spear_jax.AttackConfig(factorization="sketch"),
    )
    self.assertTrue(result.success)
    order = helpers.match_rows(np.asarray(result.inputs), p["inputs"])
    np.testing.assert_allclose(
      np.asarray(result.inputs), p["inputs"][order], rtol=0, atol=1e-10
    )

  def test_sketch_gives_up_on_full_rank(self):
    g = jnp.asarray(np.random.default_rng().standard_normal((80, 60)))
    self.assertIsNone(_linalg.sketched_svd(g, None, 1e-12))
    # factorize then falls back to the full SVD and sees the full rank.
    _, _, rank, s = _linalg.factorize(g, None, 1e-12, method="sketch")
    self.assertEqual((rank, s.shape[0]), (60, 60))

  def test_float32_tolerances_are_looser(self):
    cfg = spear_jax.AttackConfig()
    t64 = _linalg.resolve_tolerances(cfg, jnp.float64, 10, 10)
    t32 = _linalg.resolve_tolerances(cfg, jnp.float32, 10, 10)
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
    polished, zeros, leverage = self.variant(spear_jax.attack.polish_direction)(
      jnp.asarray(noisy),
      jnp.asarray(l_mxb),
      jnp.ones(m, bool),
      jnp.asarray(1e-8),
      jnp.asarray(1e-12),
    )
    np.testing.assert_allclose(np.asarray(polished), q_true, atol=1e-13)
    self.assertEqual(int(zeros), int(np.sum(d_mxb[:, 2] == 0)))
    self.assertLess(float(leverage), 0.9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tiny_genuine_nonzero_does_not_pull_the_fit(self):
    # A true nonzero of D below the screening tolerance (seen at m = 4000:
    # 1.2e-8 of a unit column) enters Z; the screen-level refits keep it and
    # land ~1e-10 off, losing zeros at the final tolerance.
    rng = np.random.default_rng(9)
    m, b = 400, 8
    d_mxb = (rng.random((m, b)) < 0.5) * rng.standard_normal((m, b))
    column = d_mxb[:, 3] / np.linalg.norm(d_mxb[:, 3])
    tiny_row = np.flatnonzero(column != 0)[0]
    column[tiny_row] = 5e-9  # genuine, below screen_tol = 1e-8
    d_mxb[:, 3] = column
    l_mxb, s, vt = np.linalg.svd(d_mxb, full_matrices=False)
    q_true = (s[:, None] * vt)[:, 3]
    q_true /= np.linalg.norm(q_true)
    noisy = q_true + 1e-11 * rng.standard_normal(b)
    polished, zeros, _ = self.variant(spear_jax.attack.polish_direction)(
      jnp.asarray(noisy / np.linalg.norm(noisy)),
      jnp.asarray(l_mxb),
      jnp.ones(m, bool),
      jnp.asarray(1e-8),
      jnp.asarray(1e-12),
    )
    np.testing.assert_allclose(
      np.abs(np.asarray(polished) @ q_true), 1.0, atol=1e-15
    )
    residual = np.abs(l_mxb @ np.asarray(polished))
    self.assertLess(residual[d_mxb[:, 3] == 0].max(), 1e-14)
    self.assertEqual(int(zeros), int(np.sum(d_mxb[:, 3] == 0)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_mixture_of_two_columns_has_unit_leverage(self):
    # A 2-mixture pinned by one row outside the common zero set: that row
    # is the only one with a component along the rest of the plane.
    rng = np.random.default_rng(8)
    m, b = 120, 6
    d_mxb = (rng.random((m, b)) < 0.5) * rng.standard_normal((m, b))
    # Correlated, not nested, zero patterns of columns 0 and 1.
    active = np.where(
      d_mxb[:, 0] != 0, rng.random(m) < 0.8, rng.random(m) < 0.2
    )
    d_mxb[:, 1] = active * rng.standard_normal(m)
    l_mxb, s, vt = np.linalg.svd(d_mxb, full_matrices=False)
    q_mxb = s[:, None] * vt  # D = L Q
    both_zero = np.flatnonzero((d_mxb[:, 0] == 0) & (d_mxb[:, 1] == 0))
    pin = np.flatnonzero((d_mxb[:, 0] != 0) & (d_mxb[:, 1] != 0))[0]
    # Mixture direction vanishing on the pinning row as well.
    coef = np.array([d_mxb[pin, 1], -d_mxb[pin, 0]])
    mix = q_mxb[:, :2] @ coef
    mix /= np.linalg.norm(mix)
    polish = self.variant(spear_jax.attack.polish_direction)
    _, zeros, leverage = polish(
      jnp.asarray(mix),
      jnp.asarray(l_mxb),
      jnp.ones(m, bool),
      jnp.asarray(1e-8),
      jnp.asarray(1e-12),
    )
    self.assertEqual(int(zeros), both_zero.size + 1)
    self.assertGreater(float(leverage), 1.0 - 1e-6)
    for column in range(b):
      q = q_mxb[:, column] / np.linalg.norm(q_mxb[:, column])
      _, _, leverage = polish(
        jnp.asarray(q),
        jnp.asarray(l_mxb),
        jnp.ones(m, bool),
        jnp.asarray(1e-8),
        jnp.asarray(1e-12),
      )
      self.assertLess(float(leverage), 0.9)


class SplitMixtureTest(chex.TestCase):
  def _twins(self, seed, m=200, b=10):
    # Columns 0 and 1 share most of their zero sets (near-twin samples).
    rng = np.random.default_rng(seed)
    d_mxb = (rng.random((m, b)) < 0.5) * rng.standard_normal((m, b))
    active = np.where(
      d_mxb[:, 0] != 0, rng.random(m) < 0.95, rng.random(m) < 0.1
    )
    d_mxb[:, 1] = active * rng.standard_normal(m)
    l_mxb, s, vt = np.linalg.svd(d_mxb, full_matrices=False)
    q_bxb = s[:, None] * vt  # D = L Q, independent of the code under test
    return d_mxb, l_mxb, q_bxb / np.linalg.norm(q_bxb, axis=0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((20, False), (21, True), (22, True))
  def test_two_column_mixture_splits_into_both_columns(self, seed, pinned):
    d_mxb, l_mxb, q_bxb = self._twins(seed)
    m = d_mxb.shape[0]
    coef = np.random.default_rng(seed + 100).standard_normal(2)
    if pinned:
      # As rounding returns it: also vanishing on one row where both
      # columns are nonzero (the pinning row, leverage one).
      pin = np.flatnonzero((d_mxb[:, 0] != 0) & (d_mxb[:, 1] != 0))[0]
      coef = np.array([d_mxb[pin, 1], -d_mxb[pin, 0]])
    mix = q_bxb[:, :2] @ coef
    mix /= np.linalg.norm(mix)
    directions, counts = self.variant(spear_jax.attack.split_mixture)(
      jnp.asarray(mix), jnp.asarray(l_mxb), jnp.ones(m, bool), jnp.asarray(1e-8)
    )
    chex.assert_shape(directions, (2, 10))
    directions = np.asarray(directions)
    cos = np.abs(directions @ q_bxb[:, :2])
    # One output per column, each exact to 1e-12 in angle.
    self.assertGreater(min(cos[0].max(), cos[1].max()), 1 - 1e-12)
    self.assertNotEqual(int(np.argmax(cos[0])), int(np.argmax(cos[1])))
    # Cluster sizes: the rows where only that column vanishes.
    only = {
      0: np.sum((d_mxb[:, 0] == 0) & (d_mxb[:, 1] != 0)),
      1: np.sum((d_mxb[:, 1] == 0) & (d_mxb[:, 0] != 0)),
    }
    self.assertEqual(sorted(np.asarray(counts).tolist()), sorted(only.values()))

  @chex.variants(with_jit=True, without_jit=True)
  def test_columns_and_three_column_mixtures_are_not_split(self):
    d_mxb, l_mxb, q_bxb = self._twins(23)
    m = d_mxb.shape[0]
    split = self.variant(spear_jax.attack.split_mixture)
    for direction in (q_bxb[:, 0], q_bxb[:, 5], q_bxb[:, :3].sum(axis=1)):
      _, counts = split(
        jnp.asarray(direction / np.linalg.norm(direction)),
        jnp.asarray(l_mxb),
        jnp.ones(m, bool),
        jnp.asarray(1e-8),
      )
      np.testing.assert_array_equal(np.asarray(counts), 0)


class SplitSpanTest(absltest.TestCase):
  def _group(self, seed, m=300, b=12, size=3):
    # Columns 0..size-1 share most of their zero sets; each has a few zeros
    # of its own (near-twin samples), the rest are generic sparse columns.
    rng = np.random.default_rng(seed)
    d_mxb = (rng.random((m, b)) < 0.5) * rng.standard_normal((m, b))
    shared = rng.random(m) < 0.5
    for i in range(size):
      own = (~shared) & (rng.random(m) < 0.04)
      d_mxb[:, i] = np.where(shared | own, 0.0, rng.standard_normal(m))
    l_mxb, s, vt = np.linalg.svd(d_mxb, full_matrices=False)
    q_bxb = s[:, None] * vt  # D = L Q, independent of the code under test
    return d_mxb, l_mxb, q_bxb / np.linalg.norm(q_bxb, axis=0)

  def test_three_twins_split_from_every_anchor_row(self):
    for seed in range(3):
      d_mxb, l_mxb, q_bxb = self._group(seed)
      m = d_mxb.shape[0]
      mix = q_bxb[:, :3] @ np.random.default_rng(seed).standard_normal(3)
      basis, dim = attack.twin_span(
        jnp.asarray(mix / np.linalg.norm(mix)),
        jnp.asarray(l_mxb),
        jnp.ones(m, bool),
        jnp.asarray(1e-9),
      )
      self.assertEqual(int(dim), 3)
      basis_bx3 = np.asarray(basis)[:, :3]
      p_mx3 = l_mxb @ basis_bx3
      usable = np.linalg.norm(p_mx3, axis=1) >= 1e-4
      anchors = p_mx3[usable][:, None, :]
      directions, counts = attack.split_span(
        jnp.asarray(basis_bx3),
        jnp.asarray(l_mxb),
        jnp.ones(m, bool),
        jnp.asarray(anchors),
        3,
      )
      found = np.asarray(directions)[np.asarray(counts) >= 2]
      cos = np.abs(found @ q_bxb)
      # Every clustered direction is a column (to 1e-12), and all three
      # twins are among them.
      self.assertGreater(cos.max(axis=1).min(), 1 - 1e-12)
      hit = set(np.argmax(cos, axis=1)[cos.max(axis=1) > 1 - 1e-12].tolist())
      self.assertEqual(hit, {0, 1, 2})

  def test_padded_span_equals_the_unpadded_one(self):
    d_mxb, l_mxb, q_bxb = self._group(7, size=2)
    m = d_mxb.shape[0]
    mix = q_bxb[:, 0] + 0.5 * q_bxb[:, 1]
    basis, _ = attack.twin_span(
      jnp.asarray(mix / np.linalg.norm(mix)),
      jnp.asarray(l_mxb),
      jnp.ones(m, bool),
      jnp.asarray(1e-9),
    )
    basis_bx2 = np.asarray(basis)[:, :2]
    plain, plain_counts = attack.split_span(
      jnp.asarray(basis_bx2),
      jnp.asarray(l_mxb),
      jnp.ones(m, bool),
      jnp.zeros((1, 0, 2)),
      2,
    )
    # Two zero columns and their unit vectors as anchors.
    padded_basis = np.concatenate([basis_bx2, np.zeros((12, 2))], axis=1)
    anchors = np.zeros((1, 2, 4))
    anchors[0, 0, 2] = anchors[0, 1, 3] = 1.0
    padded, padded_counts = attack.split_span(
      jnp.asarray(padded_basis),
      jnp.asarray(l_mxb),
      jnp.ones(m, bool),
      jnp.asarray(anchors),
      2,
    )
    np.testing.assert_array_equal(plain_counts, padded_counts)
    self.assertGreaterEqual(int(np.min(plain_counts)), 2)
    cos = np.abs(np.sum(np.asarray(plain) * np.asarray(padded), axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-12)
    np.testing.assert_allclose(
      np.abs(np.asarray(plain) @ q_bxb[:, :2]).max(axis=1), 1.0, atol=1e-12
    )


if __name__ == "__main__":
  absltest.main()
