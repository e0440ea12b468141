"""Near-twin samples: identifiability, twin spans and pinned completions."""

from absl.testing import absltest
from absl.testing import parameterized
import helpers
import inversions
import jax
import jax.numpy as jnp
import numpy as np

import spear_jax
from spear_jax import _dictionary
from spear_jax import attack


def _factors(d_mxb, x_nxb):
  """``G = L (R)`` with orthonormal ``L`` and ``Q`` with ``D = L Q``."""
  u, _, _ = np.linalg.svd(d_mxb @ x_nxb.T, full_matrices=False)
  l_mxb = u[:, : d_mxb.shape[1]]
  return l_mxb, l_mxb.T @ d_mxb


def _identifiable(d_mxb, x_nxb):
  l_mxb, q_bxb = _factors(d_mxb, x_nxb)
  alive = np.any(d_mxb != 0, axis=1)
  return np.asarray(
    attack.identifiable_inputs(
      jnp.asarray(d_mxb),
      jnp.asarray(q_bxb),
      jnp.asarray(l_mxb),
      jnp.asarray(alive),
      jnp.asarray(1e-9),
      jnp.asarray(1.5e-8),
      jnp.asarray(6e-6),
    )
  )


def _well_pinned_crossed_twins(rng, own=(1, 2)):
  """A ``crossed_twin_problem`` whose own zeros pin each twin with margin.

  A twin is pinned by its own zeros only through the *other* twin's value
  there; when that is tiny, the row nearly annihilates the pair's plane.
  The attack then treats it as absent (leverage within ``eps^(1/3)`` of
  one) and reports the pair not identifiable, and inverting it amplifies
  round-off. Measured over 623 draws (seeds 1000-1313 and 2000-2308): the
  three with a ratio (the other twin's smallest value on the own zeros
  over its norm) under 1.5e-4 were not certified, all others were. These
  tests are about well-posed pairs, so they redraw below 1e-3 (14 of 623).
  """
  while True:
    p = helpers.crossed_twin_problem(
      int(rng.integers(1 << 30)), m=200, n=40, b=8, own=own
    )
    d_mxb = p["grad_z"]
    zero_mxb = d_mxb == 0
    ratios = [
      np.min(
        np.abs(d_mxb[zero_mxb[:, a] & ~zero_mxb[:, o], o])
        / np.linalg.norm(d_mxb[:, o]),
        initial=1.0,
      )
      for a, o in ((0, 1), (1, 0))
    ]
    if min(ratios) >= 1e-3:
      return p


class IdentifiableInputsTest(absltest.TestCase):
  def test_nested_twin_slides_and_nothing_else(self):
    # Independent check of the claim: with u = e_j (j the twin with the
    # larger zero set), D' = D M, X'^T = M^-1 X^T explain both gradients,
    # keep every zero set, and move x_j only.
    for seed in range(3):
      p = helpers.nested_twin_problem(seed, m=120, n=30, b=6)
      d, x = p["grad_z"], p["inputs"].T
      j = p["larger"]
      a = 1 - j
      c = 0.3
      m_bxb = np.eye(6)
      m_bxb[j, a] += c
      m_bxb[j, j] -= c
      d2 = d @ m_bxb
      x2_bxn = np.linalg.solve(m_bxb, x.T)
      np.testing.assert_allclose(d2 @ x2_bxn, d @ x.T, atol=1e-10)
      np.testing.assert_allclose(d2.sum(axis=1), d.sum(axis=1), atol=1e-10)
      np.testing.assert_array_equal(d2 == 0, d == 0)
      moved = np.linalg.norm(x2_bxn - x.T, axis=1) > 1e-8
      np.testing.assert_array_equal(moved, np.arange(6) == j)
      # The test flags the twins (neither column is pinned by its zero set:
      # they compete) and nothing else, on the truth and on the slid
      # solution alike.
      twins = np.arange(6) < 2
      np.testing.assert_array_equal(_identifiable(d, x), ~twins)
      np.testing.assert_array_equal(_identifiable(d2, x2_bxn.T), ~twins)

  def test_generic_batch_is_identifiable(self):
    p = helpers.relu_layer_problem(7, m=150, n=30, b=8)
    self.assertTrue(_identifiable(p["grad_z"], p["inputs"].T).all())


class TwoSidedCertificateTest(absltest.TestCase):
  def test_a_zero_on_an_active_neuron_fails(self):
    p = helpers.relu_layer_problem(3, m=120, n=30, b=5)
    d, x = p["grad_z"].copy(), p["inputs"]

    def flags(d_mxb):
      return np.asarray(
        attack.relu_certificate(
          jnp.asarray(x),
          jnp.asarray(d_mxb),
          jnp.asarray(p["weight"]),
          jnp.asarray(p["bias"]),
          jnp.asarray(1e-11),
          jnp.asarray(1e-8),
        )
      )

    self.assertTrue(flags(d).all())
    z = p["weight"] @ x.T + p["bias"][:, None]
    active = int(np.flatnonzero(z[:, 2] > 1e-3)[0])
    d[active, 2] = 0.0  # an extra zero where sample 2 is clearly active
    np.testing.assert_array_equal(flags(d), [True, True, False, True, True])


class TwinSpanTest(absltest.TestCase):
  def test_mixture_of_nested_twins_spans_both(self):
    p = helpers.nested_twin_problem(1, m=200, n=40, b=8)
    l_mxb, q_bxb = _factors(p["grad_z"], p["inputs"].T)
    q = q_bxb / np.linalg.norm(q_bxb, axis=0)
    alive = np.any(p["grad_z"] != 0, axis=1)
    mix = 0.6 * q[:, 0] + 0.8 * q[:, 1]
    basis, dim = attack.twin_span(
      jnp.asarray(mix / np.linalg.norm(mix)),
      jnp.asarray(l_mxb),
      jnp.asarray(alive),
      jnp.asarray(1e-9),
    )
    self.assertEqual(int(dim), 2)
    span = np.asarray(basis)[:, :2]
    for i in (0, 1):  # both twins lie in the span, no other column does
      self.assertLess(np.linalg.norm(q[:, i] - span @ (span.T @ q[:, i])), 1e-9)
    for i in range(2, 8):
      self.assertGreater(
        np.linalg.norm(q[:, i] - span @ (span.T @ q[:, i])), 1e-3
      )


class InvertNestedTwinsTest(absltest.TestCase):
  def test_every_other_sample_exact_and_the_twin_flagged(self):
    p = helpers.nested_twin_problem(2, m=300, n=60, b=12)
    result = spear_jax.invert(
      p["weight_grad"],
      p["bias_grad"],
      key=jax.random.key(0),
      method="spearpp",
      weight=p["weight"],
      bias=p["bias"],
    )
    truth = p["inputs"]
    recovered = np.asarray(result.inputs)
    order = helpers.match_rows(recovered, truth)
    error = np.linalg.norm(recovered - truth[order], axis=1) / np.linalg.norm(
      truth[order], axis=1
    )
    verified = np.asarray(result.verified)
    # Sound: every verified sample is exact (float64, 1e-8 relative).
    self.assertTrue(np.all(error[verified] < 1e-8), error[verified])
    # Every other sample is recovered and certified; the twins are
    # reported as not identifiable (their inputs can be traded) and never
    # verified.
    twins = order < 2
    identifiable = np.asarray(result.identifiable)
    self.assertFalse(verified[twins].any())
    self.assertFalse(identifiable[twins].any())
    self.assertTrue(verified[~twins].all())
    self.assertTrue(identifiable[~twins].all())
    self.assertEqual(result.stats.stop_reason, "not_identifiable")
    self.assertFalse(result.success)


class IndivisibleTwinsTest(parameterized.TestCase):
  """Near-duplicates with one zero pattern: no method can split them."""

  @parameterized.product(method=("spear", "spearpp"), gap=(1e-6, 1e-3))
  def test_others_exact_and_the_pairs_estimated(self, method, gap):
    rng = np.random.default_rng()
    m, n, b = 200, 100, 8
    for _ in range(50):  # a pair's patterns differ on a few % of draws
      x_nxb = rng.standard_normal((n, b))
      # Two pairs of near-duplicates (relative distance about `gap`): with
      # m = 200 the twins of a pair share their whole ReLU pattern.
      x_nxb[:, 1] = x_nxb[:, 0] + gap * rng.standard_normal(n)
      x_nxb[:, 3] = (1 + gap) * x_nxb[:, 2] + gap * rng.standard_normal(n)
      p = helpers.layer_for_inputs(rng, x_nxb, m)
      same = [
        np.array_equal(p["grad_z"][:, i] == 0, p["grad_z"][:, i + 1] == 0)
        for i in (0, 2)
      ]
      if all(same):
        break
    self.assertTrue(all(same), "no draw with one pattern per pair")
    result = inversions.invert_layer(p, rng, method, batch_size=b)
    truth = p["inputs"]
    recovered = np.asarray(result.inputs)
    err_bxb = np.linalg.norm(
      recovered[:, None, :] - truth[None, :, :], axis=2
    ) / np.linalg.norm(truth, axis=1)
    order = np.argmin(err_bxb, axis=1)
    error = err_bxb.min(axis=1)
    verified = np.asarray(result.verified)
    twins = order < 4
    # The four other samples: each found once, exact (float64, 1e-10
    # relative) and verified.
    np.testing.assert_array_equal(np.sort(order[~twins]), [4, 5, 6, 7])
    self.assertLess(error[~twins].max(), 1e-10)
    self.assertTrue(verified[~twins].all())
    # The twins: never verified, not identifiable, and each estimate within
    # its pair's own distance of a twin of that pair (one per pair).
    self.assertFalse(verified[twins].any())
    self.assertFalse(np.asarray(result.identifiable)[twins].any())
    pair = order[twins] // 2
    np.testing.assert_array_equal(np.sort(pair), [0, 0, 1, 1])
    distance = np.array(
      [
        np.linalg.norm(truth[i + 1] - truth[i]) / np.linalg.norm(truth[i])
        for i in (0, 2)
      ]
    )
    self.assertTrue(np.all(error[twins] < 3 * distance[pair]), error[twins])
    self.assertEqual(result.stats.stop_reason, "not_identifiable")
    self.assertFalse(result.success)


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", True)
  absltest.main()


class CrossedTwinsTest(absltest.TestCase):
  """Twins with one and two zeros of their own (neither zero set contains
  the other): each column is pinned by its zeros but looks like a pinned
  mixture; the ReLU pattern reads both off their plane."""

  def test_the_pattern_gives_both_columns(self):
    seed = int(np.random.default_rng().integers(1 << 30))
    p = helpers.crossed_twin_problem(seed, m=200, n=40, b=8)
    d_mxb = p["grad_z"]
    l_mxb, q_bxb = _factors(d_mxb, p["inputs"].T)
    q_bxb = q_bxb / np.linalg.norm(q_bxb, axis=0)
    span_bx2 = np.linalg.qr(q_bxb[:, :2])[0]
    r_bxn = l_mxb.T @ p["weight_grad"]
    out = _dictionary.nested_twin_columns(
      q_bxb[:, 2:],
      span_bx2,
      l_mxb,
      r_bxn,
      p["bias_grad"],
      p["weight"],
      p["bias"],
      np.any(d_mxb != 0, axis=1),
      1.5e-8,
    )
    # Exactly the two true columns (float64: |cos| within 1e-9 of 1).
    self.assertEqual(out.shape, (2, 8))
    cosine = np.abs(out @ q_bxb[:, :2])
    np.testing.assert_allclose(
      np.sort(cosine.max(axis=0)), [1.0, 1.0], rtol=0, atol=1e-9
    )
    self.assertFalse(np.allclose(cosine[0], cosine[1]))

  def _withheld_twin(self, seed, withheld, with_bias):
    p = helpers.crossed_twin_problem(seed, m=200, n=40, b=8)
    l_mxb, q_bxb = _factors(p["grad_z"], p["inputs"].T)
    q_bxb = q_bxb / np.linalg.norm(q_bxb, axis=0)
    args = [
      np.delete(q_bxb, withheld, axis=1),
      l_mxb,
      l_mxb.T @ p["weight_grad"],
    ]
    args += [p["weight"], p["bias"], np.any(p["grad_z"] != 0, axis=1)]
    args += [p["bias_grad"]] if with_bias else []
    direction, _ = _dictionary.complete_last_column(*map(jnp.asarray, args))
    return abs(float(np.asarray(direction) @ q_bxb[:, withheld]))

  def test_the_bias_gradient_picks_the_last_twin_s_pattern(self):
    # Either twin withheld, fresh layers: the bias gradient's scale gives
    # the exact column (float64: |cos| within 1e-12 of 1). Over seeds
    # 0-199 of this construction the breakpoint scan alone missed 47 of
    # 200 one-zero twins and 16 of 200 two-zero twins: an inactive set of
    # the shared zeros plus one row where a mixture vanishes tied with the
    # true one at round-off.
    rng = np.random.default_rng()
    for seed in rng.integers(1 << 30, size=4):
      for withheld in (0, 1):
        cosine = self._withheld_twin(int(seed), withheld, True)
        self.assertGreater(cosine, 1 - 1e-12, msg=f"seed {seed}")
    # One such tie (seed 720255338): the scan alone returns a mixture.
    self.assertLess(self._withheld_twin(720255338, 0, False), 0.1)
    self.assertGreater(self._withheld_twin(720255338, 0, True), 1 - 1e-12)

  def test_a_nested_twin_s_column_comes_from_its_plane(self):
    # Twin 0 has no zeros of its own: its zero set's kernel is the pair's
    # plane. With twin 1 found, the completion is the plane's vector
    # orthogonal to q_1 (float64: in the plane and orthogonal to 1e-12).
    seed = int(np.random.default_rng().integers(1 << 30))
    p = helpers.crossed_twin_problem(seed, m=200, n=40, b=8, own=(0, 2))
    l_mxb, q_bxb = _factors(p["grad_z"], p["inputs"].T)
    q_bxb = q_bxb / np.linalg.norm(q_bxb, axis=0)
    args = [np.delete(q_bxb, 0, axis=1), l_mxb, l_mxb.T @ p["weight_grad"]]
    args += [p["weight"], p["bias"], np.any(p["grad_z"] != 0, axis=1)]
    args += [p["bias_grad"]]
    direction, _ = _dictionary.complete_last_column(*map(jnp.asarray, args))
    direction = np.asarray(direction)
    plane = np.linalg.qr(q_bxb[:, :2])[0]
    np.testing.assert_allclose(
      np.linalg.norm(plane.T @ direction), 1.0, rtol=0, atol=1e-12
    )
    self.assertLess(abs(direction @ q_bxb[:, 1]), 1e-12, msg=f"seed {seed}")

  def test_spearpp_on_nested_twins_verifies_what_is_determined(self):
    # Twin 0's input is determined, twin 1's slides: 7 exact and verified
    # samples, twin 1 flagged not identifiable and never verified. Stop
    # 27's code stalled on 42 of 100 such problems (588 of 700 flags) and
    # verified 10 wrong samples.
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)  # a failure names its seed
    p = _well_pinned_crossed_twins(rng, own=(0, 2))
    result = inversions.invert_layer(
      p, rng, "spearpp", config=spear_jax.AttackConfig(time_budget_s=60.0)
    )
    truth = p["inputs"]
    recovered = np.asarray(result.inputs)
    error = np.linalg.norm(
      recovered[:, None] - truth[None], axis=2
    ) / np.linalg.norm(truth, axis=1)
    verified = np.asarray(result.verified)
    self.assertEqual(result.stats.stop_reason, "not_identifiable", seed)
    self.assertEqual(int(verified.sum()), 7, seed)
    np.testing.assert_array_less(error[verified].min(axis=1), 1e-9)
    slider = np.flatnonzero(~verified)[0]
    self.assertFalse(np.asarray(result.identifiable)[slider])
    # The verified samples are all but twin 1 (each matched exactly).
    self.assertNotIn(1, set(error[verified].argmin(axis=1).tolist()))

  def test_spearpp_recovers_and_certifies_the_pair(self):
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)  # a failure names its seed
    p = _well_pinned_crossed_twins(rng)
    result = inversions.invert_layer(
      p, rng, "spearpp", config=spear_jax.AttackConfig(time_budget_s=60.0)
    )
    truth = p["inputs"]
    recovered = np.asarray(result.inputs)
    order = helpers.match_rows(recovered, truth)
    error = np.linalg.norm(recovered - truth[order], axis=1) / np.linalg.norm(
      truth[order], axis=1
    )
    self.assertEqual(result.stats.stop_reason, "certified", seed)
    self.assertEqual(sorted(order), list(range(8)), seed)
    self.assertLess(error.max(), 1e-9, seed)  # float64, relative
