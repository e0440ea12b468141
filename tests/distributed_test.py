"""Several devices and several processes give the same answers.

Each case runs ``distributed_worker.py`` in fresh processes (the device
count and ``jax.distributed`` are fixed when JAX starts) and compares what
they recovered, bit for bit: SPEAR++ splits its restarts and roundings
over the devices (one computation over a mesh, rows padded to a multiple of
the device count), so 1, 2 and 4 devices compute the same rows; two
processes with one device each form the same 2-device mesh as one process
with two, so they draw the same proposals and restarts.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import helpers
import numpy as np

_HERE = os.path.dirname(__file__)
_WORKER = os.path.join(_HERE, "distributed_worker.py")
_SCRIPTS = os.path.join(_HERE, os.pardir, "scripts")
_TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(out, devices, methods, *distributed):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(
    [sys.executable, _WORKER, out, str(devices), methods]
    + [str(arg) for arg in distributed],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _start_script(script, *args, devices=1):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.Popen(
    [sys.executable, os.path.join(_SCRIPTS, script), *args],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _wait(testcase, procs, code=0):
  outputs = []
  for proc in procs:
    output, _ = proc.communicate(timeout=_TIMEOUT_S)
    testcase.assertEqual(proc.returncode, code, msg=output[-3000:])
    outputs.append(output)
  return outputs


def _processes(script, *args):
  """The same command as two processes joined on the loopback address."""
  address = f"--coordinator_address=127.0.0.1:{_free_port()}"
  return [
    _start_script(
      script, *args, address, "--num_processes=2", f"--process_id={i}"
    )
    for i in (0, 1)
  ]


class DistributedTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = self.enter_context(tempfile.TemporaryDirectory())

  def _path(self, name):
    return os.path.join(self.dir, f"{name}.npz")

  def test_one_two_four_devices_and_two_processes(self):
    # One process with 4 devices runs SPEAR++ on 1, 2 and 4 of them (and
    # SPEAR on 2); two processes with one device each run both methods.
    procs = [_start(self._path("d4"), 4, "spearpp,spear")]
    port = _free_port()
    procs += [
      _start(self._path(f"p{i}"), 1, "spearpp,spear", f"127.0.0.1:{port}", 2, i)
      for i in (0, 1)
    ]
    _wait(self, procs)
    one = np.load(self._path("d4"))
    for count in (1, 2, 4):
      self.assertEqual(int(one[f"spearpp_{count}_devices"]), count)
      self.assertTrue(one[f"spearpp_{count}_success"])
      # Exact (float64) against the truth, an independent computation.
      self.assertLess(float(one[f"spearpp_{count}_error"]), 1e-9)
      # The same rows, bit for bit, on any number of devices.
      np.testing.assert_array_equal(
        one[f"spearpp_{count}_inputs"], one["spearpp_1_inputs"]
      )
    # Two processes of one device each: the mesh of one process with two
    # devices (same keys), so the same answers, on both processes.
    for i in (0, 1):
      run = np.load(self._path(f"p{i}"))
      for method in ("spearpp", "spear"):
        self.assertEqual(int(run[f"{method}_1_devices"]), 2)
        for stat in ("inputs", "success", "rounds", "proposals"):
          np.testing.assert_array_equal(
            run[f"{method}_1_{stat}"],
            one[f"{method}_2_{stat}"],
            err_msg=f"p{i} {method} {stat}",
          )


class ScriptsOnTwoProcessesTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = self.enter_context(tempfile.TemporaryDirectory())

  def test_invert_and_a_merged_resumable_sweep(self):
    # invert.py: process 0 writes the output, both exit 0.
    p = helpers.relu_layer_problem(23, 80, 40, 6)
    gradients = os.path.join(self.dir, "grads.npz")
    np.savez(
      gradients,
      **{k: p[k] for k in ("weight_grad", "bias_grad", "weight", "bias")},
    )
    recovered = os.path.join(self.dir, "out.npz")
    procs = _processes(
      "invert.py",
      f"--gradients={gradients}",
      f"--output={recovered}",
      "--method=spearpp",
      "--compilation_cache_dir=",
    )
    # The sweep: trial 0 finished earlier by one process, trials 1 to 3
    # split over two processes and merged into the same log.
    log = os.path.join(self.dir, "sweep.jsonl")
    sweep = [
      "--datasets=digits",
      "--ms=40",
      "--bs=3",
      "--methods=spear",
      "--nowarmup",
      f"--seed={int(np.random.default_rng().integers(1000))}",
      f"--output={log}",
      "--compilation_cache_dir=",
    ]
    first = _start_script("benchmark.py", *sweep, "--trials=1")
    _wait(self, procs)
    _wait(self, [first])
    with np.load(recovered) as arrays:
      self.assertTrue(bool(arrays["success"]))
      order = helpers.match_rows(arrays["inputs"], p["inputs"])
      # Exact (float64) against the truth.
      np.testing.assert_allclose(
        arrays["inputs"], p["inputs"][order], rtol=0, atol=1e-9
      )
    outputs = _wait(self, _processes("benchmark.py", *sweep, "--trials=4"))
    self.assertIn("3 trials pending, 1 already", outputs[0])
    with open(log) as f:
      records = [json.loads(line) for line in f]
    self.assertEqual(sorted(r["trial"] for r in records), [0, 1, 2, 3])
    self.assertTrue(all(r["peak_rss_mb"] > 0 for r in records))
    self.assertTrue(os.path.exists(os.path.join(self.dir, "sweep_summary.csv")))


if __name__ == "__main__":
  absltest.main()
