"""Tests for the NumPy baseline of SPEAR in ``scripts/numpy_baseline.py``."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts")
)
import numpy_baseline


def _problem(m, n, b, seed):
  """Random ReLU layer and batch in float64 (samples are rows of ``x``)."""
  rng = np.random.default_rng(seed)
  x_bxn = rng.standard_normal((b, n))
  weight = rng.standard_normal((m, n)) / np.sqrt(n)
  bias = 0.1 * rng.standard_normal(m)
  z_mxb = weight @ x_bxn.T + bias[:, None]
  d_mxb = (z_mxb > 0) * rng.standard_normal((m, b))
  return d_mxb @ x_bxn, d_mxb.sum(axis=1), weight, bias, x_bxn, d_mxb


def _match(inputs_bxn, x_bxn):
  """Ground-truth row for every recovered row, by maximum ``|cosine|``."""
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  return np.argmax(np.abs(unit(inputs_bxn) @ unit(x_bxn).T), axis=1)


class InvertNumpyTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("b4", 60, 40, 4, 0),
    ("b8", 120, 80, 8, 1),
  )
  def test_exact_recovery_certified(self, m, n, b, seed):
    weight_grad, bias_grad, weight, bias, x_bxn, d_mxb = _problem(m, n, b, seed)
    out = numpy_baseline.invert_numpy(
      weight_grad, bias_grad, seed=seed, weight=weight, bias=bias
    )
    self.assertTrue(out["success"])
    self.assertEqual(out["stop_reason"], "certified")
    self.assertEqual(out["inputs"].shape, (b, n))
    self.assertEqual(out["grad_z"].shape, (m, b))
    self.assertEqual(out["verified"].shape, (b,))
    self.assertTrue(np.all(out["verified"]))
    match = _match(out["inputs"], x_bxn)
    self.assertCountEqual(match.tolist(), range(b))
    self.assertLess(np.max(np.abs(out["inputs"] - x_bxn[match])), 1e-9)
    self.assertLess(np.max(np.abs(out["grad_z"] - d_mxb[:, match])), 1e-9)
    self.assertGreater(out["proposals"], 0)
    self.assertEqual(out["proposals"], out["blocks"] * 8192)
    self.assertGreaterEqual(out["candidates"], b)

  def test_recovery_without_certificate(self):
    weight_grad, bias_grad, _, _, x_bxn, _ = _problem(60, 40, 4, 2)
    out = numpy_baseline.invert_numpy(weight_grad, bias_grad, seed=0)
    self.assertTrue(out["success"])
    self.assertEqual(out["stop_reason"], "recovered")
    self.assertFalse(np.any(out["verified"]))
    match = _match(out["inputs"], x_bxn)
    self.assertLess(np.max(np.abs(out["inputs"] - x_bxn[match])), 1e-9)

  def test_batch_of_two(self):
    # b = 2 exercises the single-row kernel. (With only two columns, the
    # adaptive threshold 0.6 * mean of the two zero counts can exclude a much
    # denser column; this seed has columns of similar sparsity.)
    weight_grad, bias_grad, weight, bias, x_bxn, _ = _problem(60, 40, 2, 3)
    out = numpy_baseline.invert_numpy(
      weight_grad,
      bias_grad,
      seed=0,
      weight=weight,
      bias=bias,
      block_size=1024,
    )
    self.assertTrue(out["success"])
    match = _match(out["inputs"], x_bxn)
    self.assertLess(np.max(np.abs(out["inputs"] - x_bxn[match])), 1e-9)

  def test_wrong_weight_is_not_certified(self):
    weight_grad, bias_grad, weight, bias, _, _ = _problem(60, 40, 4, 4)
    rng = np.random.default_rng(99)
    wrong = rng.standard_normal(weight.shape) / np.sqrt(weight.shape[1])
    out = numpy_baseline.invert_numpy(
      weight_grad,
      bias_grad,
      seed=0,
      weight=wrong,
      bias=bias,
      max_proposals=2 * 8192,
    )
    self.assertFalse(out["success"])
    self.assertFalse(np.all(out["verified"]))
    self.assertEqual(out["stop_reason"], "max_proposals")
    self.assertEqual(out["proposals"], 2 * 8192)

  def test_budget_exhausted_returns_honest_partial_result(self):
    weight_grad, bias_grad, weight, bias, _, _ = _problem(120, 80, 8, 5)
    out = numpy_baseline.invert_numpy(
      weight_grad,
      bias_grad,
      seed=0,
      weight=weight,
      bias=bias,
      block_size=4,
      max_proposals=4,
    )
    self.assertFalse(out["success"])
    self.assertEqual(out["stop_reason"], "max_proposals")
    self.assertEqual(out["inputs"].shape, (8, 80))
    self.assertEqual(out["grad_z"].shape, (120, 8))
    self.assertFalse(np.all(out["verified"]))

  def test_batch_size_contradicting_rank_raises(self):
    weight_grad, bias_grad, _, _, _, _ = _problem(60, 40, 4, 6)
    with self.assertRaisesRegex(ValueError, "batch_size"):
      numpy_baseline.invert_numpy(weight_grad, bias_grad, seed=0, batch_size=5)

  def test_full_rank_gradient_raises(self):
    rng = np.random.default_rng(7)
    with self.assertRaisesRegex(ValueError, "rank"):
      numpy_baseline.invert_numpy(
        rng.standard_normal((30, 20)), rng.standard_normal(30), seed=0
      )


class GradientsFileTest(absltest.TestCase):
  def test_gradients_file_prints_a_summary(self):
    wg, bg, w, bi, _, _ = _problem(60, 40, 5, 23)
    path = os.path.join(tempfile.mkdtemp(), "g.npz")
    np.savez(path, weight_grad=wg, bias_grad=bg, weight=w, bias=bi)
    script = numpy_baseline.__file__
    proc = subprocess.run(
      [sys.executable, script, f"--gradients={path}"],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    self.assertEqual(proc.returncode, 0, proc.stderr)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertTrue(summary["success"])
    self.assertEqual(summary["stop_reason"], "certified")


if __name__ == "__main__":
  absltest.main()
