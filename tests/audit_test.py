"""The audit: its statistics against independent computations, end to end."""

import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax import attack
from spear_jax import audit
from spear_jax import fl


class StatisticsTest(absltest.TestCase):
  def test_wilson_interval_by_hand(self):
    z = 1.959963984540054  # the 97.5% normal quantile
    for k, n in ((0, 3), (3, 3), (2, 5), (17, 40)):
      p = k / n
      centre = (p + z * z / (2 * n)) / (1 + z * z / n)
      half = (
        z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
      )
      low, high = audit.wilson_interval(k, n)
      self.assertAlmostEqual(low, max(0.0, centre - half), delta=1e-9)
      self.assertAlmostEqual(high, min(1.0, centre + half), delta=1e-9)
    self.assertTrue(all(math.isnan(v) for v in audit.wilson_interval(0, 0)))

  def test_spear_estimate_against_simulated_sampling(self):
    # At m = 2000 no two-column mixture passes the filter, so the model is
    # the coupon collector over half-zero columns: simulate it directly.
    rng = np.random.default_rng()
    m, b, proposals, reps = 2000, 4, 20.0, 1500
    wins = 0
    for _ in range(reps):
      zero = rng.random((m, b)) < 0.5  # each column's zero set
      rows = np.stack(
        [rng.choice(m, b - 1, replace=False) for _ in range(int(proposals))]
      )
      hit = zero[rows].all(axis=1)  # (proposals, b): sample inside column i
      wins += bool(hit.any(axis=0).all())
    simulated = wins / reps  # standard error about 0.011
    estimate = audit.spear_success_estimate(m, b, proposals)
    self.assertAlmostEqual(estimate, simulated, delta=0.05)

  def test_spear_estimate_shape(self):
    # More width helps, more batch hurts, more proposals help.
    self.assertLess(
      audit.spear_success_estimate(200, 12, 1e6),
      audit.spear_success_estimate(2000, 12, 1e6),
    )
    self.assertGreater(
      audit.spear_success_estimate(1000, 10, 1e6),
      audit.spear_success_estimate(1000, 30, 1e6),
    )
    self.assertLess(audit.spear_success_estimate(1000, 16, 1e3), 1e-3)
    self.assertGreater(audit.spear_success_estimate(1000, 8, 1e6), 0.99)


class _Net(nn.Module):
  """A user's own flax model: Dense-ReLU, Dense-ReLU, classifier."""

  width: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width, param_dtype=x.dtype, name="first")(x))
    x = nn.relu(nn.Dense(32, param_dtype=x.dtype, name="second")(x))
    return nn.Dense(self.num_classes, param_dtype=x.dtype, name="head")(x)


def my_model(key, n, width, num_classes, dtype):
  net = _Net(width, num_classes)
  params = net.init(key, jnp.zeros((1, n), dtype))

  def tail(p, x):  # from the attacked layer's inputs to the head's inputs
    w1, b1 = fl.dense_layer(p, "params/first")
    w2, b2 = fl.dense_layer(p, "params/second")
    h = jax.nn.relu(x @ w1.T + b1[None, :])
    return jax.nn.relu(h @ w2.T + b2[None, :])

  return fl.ModelSpec(
    net.apply, params, layer="params/first", head="params/head", tail_fn=tail
  )


class RunAuditTest(absltest.TestCase):
  def test_factory_model_report_and_resume(self):
    out = tempfile.mkdtemp()
    config = audit.AuditConfig(
      dataset="digits",  # 8x8 images: a small model compiles quickly
      batch_size=3,
      width=60,
      batch_sizes=(3,),
      widths=(),
      noise_multipliers=(1e-3,),
      local_steps=(2,),
      methods=("spear", "baseline"),
      trials=1,
      time_budget_s=30.0,
      seed=int(np.random.default_rng().integers(1 << 20)),
      baseline=attack.BaselineConfig(steps=20, restarts=1),
    )
    report = audit.run_audit(
      config, out, model_factory=my_model, progress=False
    )
    self.assertTrue(report["complete"])
    self.assertEqual(report["model"], "my_model")
    for name in ("report.md", "report.json", "exact_rate.png", "psnr.png"):
      self.assertTrue(os.path.exists(os.path.join(out, name)), name)
    with open(os.path.join(out, "report.json")) as f:
      stored = json.load(f)  # strict JSON: NaN would not parse back as null
    rows = {(r["axis"], r["method"]): r for r in stored["rows"]}
    spear = rows[("batch_size", "spear")]
    self.assertEqual(spear["trials"], 1)
    self.assertEqual(spear["exact_batches"], 1)  # b = 3 at m = 60: exact
    self.assertEqual(spear["label_accuracy"], 1.0)
    self.assertIsNotNone(spear["analytic_estimate"])
    noisy = rows[("noise_multiplier", "spear")]
    self.assertEqual(noisy["exact_batches"], 0)  # noise: never exact
    self.assertGreater(noisy["dp_epsilon"], 1.0)
    self.assertEqual(rows[("batch_size", "baseline")]["certified_batches"], 0)
    with open(os.path.join(out, "report.md")) as f:
      text = f.read()
    self.assertIn("## Threat model and assumptions", text)
    self.assertIn("honest but curious", text)
    # 3 cells x 2 methods = 6 attacks; a second run reads them all back.
    log = os.path.join(out, "trials.jsonl")
    with open(log) as f:
      self.assertLen(f.readlines(), 6)
    again = audit.run_audit(config, out, model_factory=my_model, progress=False)
    with open(log) as f:
      self.assertLen(f.readlines(), 6)
    self.assertEqual(again["rows"], stored["rows"])

  def test_bad_configs(self):
    with self.assertRaisesRegex(ValueError, "methods"):
      audit.AuditConfig(methods=("dlg",))
    with self.assertRaisesRegex(ValueError, "positive"):
      audit.AuditConfig(noise_multipliers=(0.0,))


class AuditCliTest(absltest.TestCase):
  def test_bad_flags_exit_2_in_one_line(self):
    script = os.path.join(
      os.path.dirname(__file__), os.pardir, "scripts", "audit.py"
    )
    for args in (
      ["--out_dir=/tmp/x", "--methods=dlg"],
      ["--out_dir=/tmp/x", "--batch_sizes=four"],
      [],
    ):
      proc = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
      )
      self.assertEqual(proc.returncode, 2, proc.stderr)
      self.assertNotIn("Traceback", proc.stderr)
      self.assertLen(proc.stderr.strip().splitlines(), 1, proc.stderr)


if __name__ == "__main__":
  absltest.main()
