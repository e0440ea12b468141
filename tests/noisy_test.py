"""Tests of the noise-aware attack on DP-SGD-like gradients (float64).

Problems come from ``helpers.relu_layer_problem`` (exact ReLU zeros, fresh
random inputs) plus iid Gaussian noise of a known level ``s``.
"""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import helpers
import jax
import numpy as np

from spear_jax import _metrics
from spear_jax import _noisy
from spear_jax._config import AttackConfig
from spear_jax._config import LearnerConfig

_CONFIG = AttackConfig(block_size=2048, chunk_size=64, time_budget_s=30.0)


def _noisy_problem(seed, m, n, b, noise_std):
  """A ReLU-layer problem whose gradients carry ``N(0, noise_std^2)``."""
  p = helpers.relu_layer_problem(seed, m, n, b)
  rng = np.random.default_rng(1000 + seed)
  p["weight_grad"] = p["weight_grad"] + noise_std * rng.standard_normal((m, n))
  p["bias_grad"] = p["bias_grad"] + noise_std * rng.standard_normal(m)
  return p


def _psnr(result, truth_bxn):
  """Mean PSNR (data range of the truth) after optimal matching."""
  recovered = np.asarray(result.inputs)
  order = _metrics.match_and_score(recovered, truth_bxn)["order"]
  span = float(truth_bxn.max() - truth_bxn.min())
  db = _metrics.psnr(recovered, truth_bxn[order], data_range=span)
  return float(np.mean(np.asarray(db)))


class EstimateNoiseTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("b4_small", 4, 200, 300, 1e-3, 0),
    ("b6_large", 6, 200, 300, 3e-2, 1),
    ("tall", 5, 300, 200, 1e-2, 2),
  )
  def test_level_within_two_percent_and_rank(self, b, m, n, s, seed):
    p = _noisy_problem(seed, m, n, b, s)
    estimate = _noisy.estimate_noise(p["weight_grad"])
    self.assertEqual(estimate.rank, b)
    np.testing.assert_allclose(estimate.noise_std, s, rtol=0.02)
    edge = 1.05 * estimate.noise_std * (np.sqrt(m) + np.sqrt(n))
    np.testing.assert_allclose(estimate.edge, edge, rtol=1e-12)
    self.assertEqual(estimate.singular_values.shape, (min(m, n),))

  def test_given_values_are_used(self):
    p = _noisy_problem(3, 200, 300, 4, 1e-3)
    estimate = _noisy.estimate_noise(
      p["weight_grad"], noise_std=2e-3, batch_size=4
    )
    self.assertEqual(estimate.noise_std, 2e-3)
    self.assertEqual(estimate.rank, 4)

  def test_huge_noise_raises(self):
    p = _noisy_problem(4, 200, 300, 4, 1e3)
    with self.assertRaisesRegex(ValueError, "no low-rank structure"):
      _noisy.estimate_noise(p["weight_grad"])
    with self.assertRaisesRegex(ValueError, "no low-rank structure"):
      _noisy.invert_noisy(
        p["weight_grad"], p["bias_grad"], key=jax.random.key(0)
      )

  def test_pure_noise_raises_even_with_batch_size(self):
    rng = np.random.default_rng(5)
    with self.assertRaisesRegex(ValueError, "no low-rank structure"):
      _noisy.estimate_noise(rng.standard_normal((100, 150)), batch_size=3)


class InvertNoisyTest(parameterized.TestCase):
  # Bounds: with s = 1e-3 (relative noise ~1e-3 of the gradient's entries)
  # the runs measured 62-70 dB; 50 dB leaves a wide margin.
  @parameterized.named_parameters(
    ("spear_b4", "spear", 4, 10, False),
    ("spear_b4_weights", "spear", 4, 11, True),
    ("spearpp_b4", "spearpp", 4, 12, False),
  )
  def test_recovers_batch_at_small_noise(self, method, b, seed, weights):
    m, n, s = 200, 300, 1e-3
    p = _noisy_problem(seed, m, n, b, s)
    extra = {"weight": p["weight"], "bias": p["bias"]} if weights else {}
    config = _CONFIG
    if method == "spearpp":
      config = AttackConfig(
        learner=LearnerConfig(steps=200), time_budget_s=30.0
      )
    result, report = _noisy.invert_noisy_with_report(
      p["weight_grad"],
      p["bias_grad"],
      key=jax.random.key(seed),
      method=method,
      config=config,
      **extra,
    )
    self.assertEqual(result.inputs.shape, (b, n))
    self.assertGreater(_psnr(result, p["inputs"]), 50.0)
    self.assertFalse(np.asarray(result.verified).any())
    self.assertFalse(result.success)
    self.assertEqual(result.stats.stop_reason, "noisy")
    self.assertTrue(report.consistent.all())
    np.testing.assert_allclose(report.noise_std, s, rtol=0.02)
    # The true zero sets (about half the rows) are found.
    true_zeros = np.sum(p["grad_z"] == 0, axis=0)
    self.assertGreater(report.near_zeros.min(), 0.8 * true_zeros.min())

  def test_known_noise_and_batch_size(self):
    p = _noisy_problem(13, 200, 300, 4, 1e-4)
    result = _noisy.invert_noisy(
      p["weight_grad"],
      p["bias_grad"],
      key=jax.random.key(0),
      noise_std=1e-4,
      batch_size=4,
      config=_CONFIG,
    )
    self.assertGreater(_psnr(result, p["inputs"]), 60.0)
    self.assertFalse(np.asarray(result.verified).any())

  def test_more_noise_is_worse_but_never_verified(self):
    scores = []
    for s in (1e-3, 1e-1):
      p = _noisy_problem(14, 200, 300, 4, s)
      result = _noisy.invert_noisy(
        p["weight_grad"], p["bias_grad"], key=jax.random.key(1), config=_CONFIG
      )
      self.assertFalse(np.asarray(result.verified).any())
      scores.append(_psnr(result, p["inputs"]))
    self.assertGreater(scores[0], scores[1] + 20.0)

  def test_ctrl_c_returns_the_best_partial_result(self):
    p = _noisy_problem(7, 200, 300, 4, 1e-3)
    merge, calls = _noisy._merge, []

    def interrupt_first_block(*args, **kwargs):
      calls.append(1)
      raise KeyboardInterrupt

    with mock.patch.object(_noisy, "_merge", interrupt_first_block):
      result = _noisy.invert_noisy(
        p["weight_grad"],
        p["bias_grad"],
        key=jax.random.key(0),
        batch_size=4,
        config=AttackConfig(block_size=64, chunk_size=64, max_proposals=10**6),
      )
    self.assertLen(calls, 1)
    self.assertIs(_noisy._merge, merge)
    self.assertEqual(result.stats.stop_reason, "interrupted")
    self.assertEqual(result.inputs.shape, (4, 300))
    self.assertFalse(np.any(result.verified))

  def test_bad_method_raises(self):
    p = _noisy_problem(15, 200, 300, 4, 1e-3)
    with self.assertRaisesRegex(ValueError, "Unknown method"):
      _noisy.invert_noisy(
        p["weight_grad"], p["bias_grad"], key=jax.random.key(0), method="x"
      )


if __name__ == "__main__":
  absltest.main()
