"""A wrong column moves the samples it mixes: their flags are withdrawn."""

from absl.testing import absltest
import helpers
import jax
import numpy as np

from spear_jax import attack
from spear_jax._selection import _pinned_partners
from spear_jax._selection import coupled_flags
from spear_jax._selection import reconstruct
from spear_jax._selection import zero_mask

jax.config.update("jax_enable_x64", True)


def _mixed_selection(seed, eps):
  """A layer's true columns with column 0 replaced by ``q_0 + eps q_1``.

  ``Q = Q* C`` with ``C = I + eps e_1 e_0^T``, so ``Q^{-1} = C^{-1} Q*^{-1}``
  and only sample 1's row moves (by ``-eps x_0``); sample 0 keeps its input
  but gets a column that is nonzero off its zero set.
  """
  p = helpers.relu_layer_problem(seed, 200, 30, 8)
  problem = attack.prepare_problem(
    p["weight_grad"], p["bias_grad"], weight=p["weight"], bias=p["bias"]
  )
  l_mxb = np.asarray(problem.l_mxb)
  q_bxb = np.linalg.lstsq(l_mxb, p["grad_z"], None)[0]
  directions = q_bxb.copy()
  directions[:, 0] = q_bxb[:, 0] + eps * q_bxb[:, 1]
  directions /= np.linalg.norm(directions, axis=0)
  return p, problem, reconstruct(problem, directions)


def _pinned_selection(seed):
  """Near-twins 0 and 1 (one and two own zeros), column 0 replaced by the
  mixture of ``q_0, q_1`` that vanishes on their shared zeros plus one
  more row: of the rows where both are nonzero, the one whose mixture is
  closest to ``q_0``. Its zero set has a one-dimensional kernel (itself)."""
  p = helpers.crossed_twin_problem(seed, m=200, n=40, b=8)
  problem = attack.prepare_problem(
    p["weight_grad"], p["bias_grad"], weight=p["weight"], bias=p["bias"]
  )
  l_mxb = np.asarray(problem.l_mxb)
  q_bxb = np.linalg.lstsq(l_mxb, p["grad_z"], None)[0]
  both = np.all(p["grad_z"][:, :2] != 0, axis=1)
  a_m, b_m = l_mxb @ q_bxb[:, 0], l_mxb @ q_bxb[:, 1]
  rho = np.flatnonzero(both)[np.argmin(np.abs(a_m[both] / b_m[both]))]
  directions = q_bxb.copy()
  directions[:, 0] = b_m[rho] * q_bxb[:, 0] - a_m[rho] * q_bxb[:, 1]
  directions /= np.linalg.norm(directions, axis=0)
  return p, problem, reconstruct(problem, directions)


def _relative_errors(result, truth_bxn):
  err = np.linalg.norm(np.asarray(result.inputs) - truth_bxn, axis=1)
  return err / np.linalg.norm(truth_bxn, axis=1)


class CoupledFlagsTest(absltest.TestCase):
  def test_a_small_mixture_fools_the_certificate_not_the_coupling(self):
    fooled = 0
    for seed in range(4):
      p, problem, result = _mixed_selection(seed, 1e-4)
      err = _relative_errors(result, p["inputs"])
      # The construction, checked against the true inputs: sample 1 is
      # off (by about 1e-4 relative), every other sample is exact.
      self.assertGreater(err[1], 1e-7)
      np.testing.assert_array_less(np.delete(err, 1), 1e-9)
      raw = np.asarray(result.verified)
      self.assertFalse(raw[0])  # its column has nonzeros where x_0 is off
      fooled += int(raw[1])
      flags = coupled_flags(problem, result, raw, np.ones(8, bool))
      np.testing.assert_array_equal(flags[:2], [False, False])
      # The other six are exact, pass and keep their flags: the coupling
      # is read from the failing column's zero set, not all or nothing.
      np.testing.assert_array_equal(flags[2:], raw[2:])
      self.assertTrue(flags[2:].all())
    # The per-sample ReLU certificate alone passes the wrong sample (no
    # neuron flips at 1e-4), which is what the coupling is for.
    self.assertGreaterEqual(fooled, 3)

  def test_a_pinned_mixture_of_twins_withdraws_its_twin(self):
    # Its kernel holds no true column, so the kernel argument sees nothing
    # mixed; the zero-count bound must withdraw sample 1 (stop 28: the
    # SPEAR++ search verified it at relative error 3.5e-4).
    rng, fooled = np.random.default_rng(), 0
    for seed in rng.integers(1 << 30, size=6):
      p, problem, result = _pinned_selection(int(seed))
      err = _relative_errors(result, p["inputs"])
      self.assertGreater(err[1], 1e-9, msg=f"seed {seed}")
      np.testing.assert_array_less(np.delete(err, 1), 1e-9)
      raw = np.asarray(result.verified)
      self.assertFalse(raw[0])
      fooled += int(raw[1])
      flags = coupled_flags(problem, result, raw, np.ones(8, bool))
      self.assertFalse(flags[1], msg=f"seed {seed}")
      # Samples that are not twins of the mixture keep their flags.
      np.testing.assert_array_equal(flags[2:], raw[2:])
    self.assertGreaterEqual(fooled, 1)

  def test_pinned_partners_are_the_largest_consistent_set(self):
    # Brute force over every verified subset V: the mixed set S = V plus
    # the unverified samples is possible when each member of V misses at
    # most |S| - 1 rows of the failing column's zero set. The partners are
    # the union of the possible V's. Fresh random zero sets, near-twins
    # made by flipping a few rows of the failing column's.
    rng = np.random.default_rng()
    for _ in range(200):
      m, b = 40, int(rng.integers(3, 9))
      zero = rng.random((m, b)) < 0.5
      k = int(rng.integers(b))
      for j in rng.choice(b, int(rng.integers(0, b)), replace=False):
        flips = rng.choice(m, int(rng.integers(0, 8)), replace=False)
        zero[:, j] = zero[:, k]
        zero[flips, j] ^= True
      verified = rng.random(b) < 0.8
      verified[k] = False
      miss = np.sum(zero[:, k, None] & ~zero, axis=0)
      unverified = int(np.sum(~verified))
      expected = np.zeros(b, bool)
      members = np.flatnonzero(verified)
      for mask in range(1 << members.size):
        chosen = members[[(mask >> i) & 1 == 1 for i in range(members.size)]]
        if np.all(miss[chosen] <= chosen.size + unverified - 1):
          expected[chosen] = True
      np.testing.assert_array_equal(
        _pinned_partners(zero, k, verified), expected
      )

  def test_a_failing_true_column_keeps_the_others(self):
    _, problem, result = _mixed_selection(5, 0.0)
    raw = np.array(result.verified)
    self.assertTrue(raw.all())
    # Pretend the certificate refused sample 3 (e.g. drift): its column is
    # true, its zero set's kernel is that column alone.
    raw[3] = False
    flags = coupled_flags(problem, result, raw, np.ones(8, bool))
    np.testing.assert_array_equal(flags, raw)

  def test_unidentifiable_samples_are_not_suspects(self):
    _, problem, result = _mixed_selection(6, 1e-4)
    raw = np.asarray(result.verified)
    identifiable = np.ones(8, bool)
    identifiable[0] = False
    flags = coupled_flags(problem, result, raw, identifiable)
    np.testing.assert_array_equal(flags, raw)

  def test_a_zero_set_too_small_to_pin_a_column_withdraws_all(self):
    _, problem, result = _mixed_selection(7, 1e-4)
    raw = np.asarray(result.verified)
    # A column with 3 zeros (< b - 1) can be any mixture: b - 1 = 7 rows
    # pin a direction, fewer leave a kernel the columns cannot account for.
    grad_z = np.asarray(result.grad_z).copy()
    keep = np.flatnonzero(zero_mask(problem, grad_z)[:, 0])[3:]
    grad_z[keep, 0] = 1.0
    flags = coupled_flags(
      problem, result._replace(grad_z=grad_z), raw, np.ones(8, bool)
    )
    self.assertFalse(flags.any())


if __name__ == "__main__":
  absltest.main()
