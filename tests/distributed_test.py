"""Several devices and several processes give the same answers.

Each case runs ``distributed_worker.py`` in fresh processes (the device
count and ``jax.distributed`` are fixed when JAX starts) and compares what
they recovered, bit for bit: SPEAR++ splits its restarts and roundings
over the devices (one computation over a mesh, rows padded to a multiple of
the device count), so 1, 2 and 4 devices compute the same rows; two
processes with one device each form the same 2-device mesh as one process
with two, so they draw the same proposals and restarts.
"""

import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

_WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
_TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(out, devices, *distributed):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(
    [sys.executable, _WORKER, out, str(devices), *map(str, distributed)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _wait(testcase, procs):
  for proc in procs:
    output, _ = proc.communicate(timeout=_TIMEOUT_S)
    testcase.assertEqual(proc.returncode, 0, msg=output[-3000:])


class DistributedTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = self.enter_context(tempfile.TemporaryDirectory())

  def _path(self, name):
    return os.path.join(self.dir, f"{name}.npz")

  def _assert_same(self, a, b, name):
    for method in ("spearpp", "spear"):
      self.assertTrue(a[f"{method}_success"], msg=(name, method))
      # Exact recovery (float64; an independent truth, not the code).
      self.assertLess(float(a[f"{method}_error"]), 1e-9, msg=(name, method))
      np.testing.assert_array_equal(
        a[f"{method}_inputs"], b[f"{method}_inputs"], err_msg=name
      )
      for stat in ("rounds", "proposals"):
        self.assertEqual(
          int(a[f"{method}_{stat}"]), int(b[f"{method}_{stat}"]), msg=name
        )

  def test_one_two_four_devices_and_two_processes(self):
    procs = [_start(self._path(f"d{d}"), d) for d in (1, 2, 4)]
    port = _free_port()
    procs += [
      _start(self._path(f"p{i}"), 1, f"127.0.0.1:{port}", 2, i) for i in (0, 1)
    ]
    _wait(self, procs)
    runs = {
      name: np.load(self._path(name)) for name in ("d1", "d2", "d4", "p0", "p1")
    }
    for name, devices in (("d1", 1), ("d2", 2), ("d4", 4), ("p0", 2)):
      self.assertEqual(int(runs[name]["spearpp_devices"]), devices)
    # SPEAR++'s rows are the same on any number of devices.
    for name in ("d2", "d4"):
      self.assertEqual(
        np.abs(
          runs[name]["spearpp_inputs"] - runs["d1"]["spearpp_inputs"]
        ).max(),
        0.0,
        msg=name,
      )
    # Two processes of one device each: the same answers as one process
    # of two devices (same mesh, same keys), on both processes.
    self._assert_same(runs["p0"], runs["d2"], "p0")
    self._assert_same(runs["p1"], runs["p0"], "p1")


if __name__ == "__main__":
  absltest.main()
