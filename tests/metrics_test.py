"""Matching of reconstructions to the ground truth."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from spear_jax import _metrics


class HungarianTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 4, 6)
  def test_optimal_against_brute_force(self, b):
    rng = np.random.default_rng(b)
    for _ in range(10):
      cost = rng.random((b, b))
      assignment = _metrics.hungarian(cost)
      self.assertEqual(sorted(assignment.tolist()), list(range(b)))
      best = min(sum(cost[i, p[i]] for i in range(b))
                 for p in itertools.permutations(range(b)))
      self.assertAlmostEqual(cost[np.arange(b), assignment].sum(), best,
                             places=12)

  def test_match_shuffled_batch(self):
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((7, 30))
    perm = rng.permutation(7)
    noisy = truth[perm] + 1e-12 * rng.standard_normal((7, 30))
    scores = _metrics.match_and_score(noisy, truth)
    np.testing.assert_array_equal(scores["order"], perm)
    self.assertTrue(scores["exact"].all())
    self.assertLess(scores["max_abs_error"].max(), 1e-11)


if __name__ == "__main__":
  absltest.main()
