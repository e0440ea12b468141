"""Tests of the noisy attack's pattern swaps (float64, numpy).

Twins here share their backpropagated signal up to the noise level (as
near-identical faces under DP-SGD do), so the difference of their columns
is near zero on almost every row: the near-zero count prefers it to either
twin, the ReLU pattern does not.
"""

from absl.testing import absltest
import numpy as np

from spear_jax import _noisy
from spear_jax import _noisy_swap
from spear_jax._noisy import NEAR_ZERO


def _twin_problem(seed, m=300, n=200, b=6, noise_std=1e-4):
  """A ReLU layer whose inputs 0 and 1 are twins (jitter 0.02)."""
  rng = np.random.default_rng(seed)
  x_nxb = rng.standard_normal((n, b))
  x_nxb[:, 1] = x_nxb[:, 0] + 0.02 * rng.standard_normal(n)
  w_mxn = rng.standard_normal((m, n)) / np.sqrt(n)
  beta_m = 0.1 * rng.standard_normal(m)
  signal_mxb = rng.standard_normal((m, b))
  signal_mxb[:, 1] = signal_mxb[:, 0] + noise_std * rng.standard_normal(m)
  d_mxb = (w_mxn @ x_nxb + beta_m[:, None] > 0) * signal_mxb
  grad = d_mxb @ x_nxb.T + noise_std * rng.standard_normal((m, n))
  bias_grad = d_mxb.sum(1) + noise_std * rng.standard_normal(m)
  u, sv, vt = np.linalg.svd(grad, full_matrices=False)
  m_mxb = u[:, :b] * sv[:b]
  truth_bxb = np.linalg.lstsq(m_mxb, d_mxb, rcond=None)[0]
  truth_bxb /= np.linalg.norm(truth_bxb, axis=0)
  return {
    "m_mxb": m_mxb,
    "vt_bxn": vt[:b],
    "sv_b": sv[:b],
    "bias_grad_m": bias_grad,
    "weight_mxn": w_mxn,
    "bias_m": beta_m,
    "noise_std": noise_std,
    "truth_kxb": truth_bxb.T,
  }


def _explicit_mismatch(p, y_bxb):
  """Per column: near-zero rows vs the inactive rows of the sample that
  the rank-b least-squares fit gives (``lstsq`` on the bias, then on
  ``M V_b^T``), computed without the closed form."""
  s = p["noise_std"]
  cols = p["m_mxb"] @ y_bxb
  alpha = np.linalg.lstsq(cols, p["bias_grad_m"], rcond=None)[0]
  grad_b = p["m_mxb"] @ p["vt_bxn"]
  x_bxn = np.linalg.lstsq(cols * alpha, grad_b, rcond=None)[0]
  inactive = p["weight_mxn"] @ x_bxn.T + p["bias_m"][:, None] <= 0
  return np.sum((np.abs(cols) < NEAR_ZERO * s) != inactive, axis=0)


def _swap(p, chosen, pool_kxb):
  return _noisy_swap.swap_by_pattern(
    np.asarray(chosen),
    pool_kxb,
    p["m_mxb"],
    p["vt_bxn"],
    p["sv_b"],
    p["bias_grad_m"],
    p["weight_mxn"],
    p["bias_m"],
    p["noise_std"],
    NEAR_ZERO,
  )


class SwapByPatternTest(absltest.TestCase):
  def test_closed_form_matches_an_explicit_fit(self):
    # Exact integer counts (both sides agree to rounding; no
    # pre-activation of these sets lies within it of zero).
    for seed in range(3):
      p = _twin_problem(seed)
      rng = np.random.default_rng(seed)
      b = p["truth_kxb"].shape[0]
      pool = np.concatenate([p["truth_kxb"], rng.standard_normal((4, b))])
      pool /= np.linalg.norm(pool, axis=1, keepdims=True)
      for _ in range(4):
        chosen = rng.permutation(pool.shape[0])[:b]
        _, before, _ = _swap(p, chosen, pool)
        explicit = _explicit_mismatch(p, pool[chosen].T)
        self.assertEqual(before, int(explicit.sum()))

  def test_a_twin_difference_is_swapped_for_the_twin(self):
    for seed in range(3):
      p = _twin_problem(seed)
      truth = p["truth_kxb"]
      b = truth.shape[0]
      norms = np.linalg.norm(p["m_mxb"] @ truth[:2].T, axis=0)
      difference = truth[0] / norms[0] - truth[1] / norms[1]
      near = NEAR_ZERO * p["noise_std"]
      counts = [
        int(np.sum(np.abs(p["m_mxb"] @ (y / np.linalg.norm(y))) < near))
        for y in (difference, truth[0], truth[1])
      ]
      # The premise: the difference has the most near zeros.
      self.assertGreater(counts[0], max(counts[1:]), counts)
      pool = np.concatenate([truth, difference[None]])
      pool /= np.linalg.norm(pool, axis=1, keepdims=True)
      start = np.r_[b, np.arange(1, b)]  # the difference instead of twin 0
      chosen, before, after = _swap(p, start, pool)
      self.assertEqual(sorted(chosen.tolist()), list(range(b)))
      self.assertLess(after, before)
      self.assertEqual(after, int(_explicit_mismatch(p, truth.T).sum()))

  def test_the_true_set_is_kept(self):
    p = _twin_problem(7)
    truth = p["truth_kxb"]
    b = truth.shape[0]
    rng = np.random.default_rng(7)
    pool = np.concatenate([truth, rng.standard_normal((5, b))])
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    chosen, before, after = _swap(p, np.arange(b), pool)
    np.testing.assert_array_equal(chosen, np.arange(b))
    self.assertEqual(before, after)


class KeepIndependentTest(absltest.TestCase):
  def test_a_refit_onto_another_column_is_undone(self):
    # A refit that lands column 3 on column 2 would make the coupled solve
    # singular (NaN inputs); column 3 keeps its input direction instead.
    p = _twin_problem(3)
    truth = p["truth_kxb"]
    refined = _noisy.Refined(
      direction=truth.copy(),
      near_zeros=np.full(truth.shape[0], 100),
      chi2=np.ones(truth.shape[0]),
      gap=np.full(truth.shape[0], 1e3),
    )
    collapsed = refined._replace(
      direction=np.r_[truth[:3], truth[2:3], truth[4:]]
    )
    kept = _noisy._keep_independent(
      collapsed, truth, p["m_mxb"], p["noise_std"]
    )
    np.testing.assert_allclose(np.asarray(kept.direction), truth, atol=1e-12)
    self.assertTrue(np.isnan(np.asarray(kept.chi2)[2:4]).any())
    untouched = _noisy._keep_independent(
      refined, truth, p["m_mxb"], p["noise_std"]
    )
    np.testing.assert_array_equal(np.asarray(untouched.chi2), refined.chi2)


if __name__ == "__main__":
  absltest.main()
