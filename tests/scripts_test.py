"""End to end: ``scripts/run_attack.py`` and the ``scripts/benchmark.py`` sweep.

Each script runs as a subprocess on a tiny offline setting (the bundled
8x8 digits; width 128, where SPEAR recovers b = 4 reliably: at width 40
about 1 batch in 3 has a sample with no inactive alive neuron), as a user
would run it.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

_SCRIPTS = os.path.join(os.path.dirname(__file__), os.pardir, "scripts")


def _run(script, *args):
  proc = subprocess.run(
    [sys.executable, os.path.join(_SCRIPTS, script), *args],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  return proc.returncode, proc.stdout, proc.stderr


def _png_size(path):
  """(width, height) from the IHDR chunk, after checking its CRC."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
  length, kind = struct.unpack(">I4s", data[8:16])
  assert kind == b"IHDR" and length == 13
  body = data[16:29]
  (crc,) = struct.unpack(">I", data[29:33])
  assert zlib.crc32(kind + body) == crc, "bad IHDR CRC"
  return struct.unpack(">II", body[:8])


class RunAttackTest(absltest.TestCase):
  def test_imagenette_end_to_end(self):
    # ImageNet-size inputs (224 x 224 x 3 = 150528 features) through the
    # tfds path of a prepared set, mocked (tfds_mock_run.py), end to end.
    out = tempfile.mkdtemp()
    proc = subprocess.run(
      [
        sys.executable,
        os.path.join(os.path.dirname(__file__), "tfds_mock_run.py"),
        "run_attack.py",
        "--dataset=imagenette",
        f"--data_dir={out}",
        "--batch_size=3",
        "--width=48",
        "--num_trials=1",
        f"--out_dir={out}",
      ],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(out, "metrics.json")) as f:
      metrics = json.load(f)
    (trial,) = metrics["trials"]
    self.assertEqual(trial["dataset"], "imagenette")
    self.assertEqual(trial["exact_samples"], 3)
    self.assertLess(trial["max_relative_error"], 1e-9)
    with np.load(os.path.join(out, "trial_000.npz")) as arrays:
      self.assertEqual(arrays["truth"].shape, (3, 224, 224, 3))
      np.testing.assert_allclose(
        arrays["recovered"], arrays["truth"], rtol=0, atol=1e-9
      )

  def test_trials_metrics_picture_and_resume(self):
    out = tempfile.mkdtemp()
    seed = int(np.random.default_rng().integers(1000))
    args = [
      "--dataset=digits",
      "--batch_size=4",
      "--width=128",
      f"--seed={seed}",
      f"--out_dir={out}",
    ]
    code, stdout, stderr = _run("run_attack.py", *args, "--num_trials=1")
    self.assertEqual(code, 0, stderr)
    code, stdout, stderr = _run("run_attack.py", *args, "--num_trials=2")
    self.assertEqual(code, 0, stderr)
    self.assertIn("finished earlier", stderr)  # trial 0 was read back
    summary = json.loads(stdout.strip().splitlines()[-1])
    self.assertEqual((summary["exact_batches"], summary["trials"]), (2, 2))
    with open(os.path.join(out, "metrics.json")) as f:
      metrics = json.load(f)
    self.assertEqual(metrics["config"]["dataset"], "digits")
    self.assertTrue(metrics["complete"])
    self.assertIn("jax", metrics["environment"]["versions"])
    self.assertEqual([t["trial"] for t in metrics["trials"]], [0, 1])
    self.assertEqual(metrics["aggregate"]["exact_batch_rate"], 1.0)
    for trial in metrics["trials"]:
      self.assertTrue(trial["exact_batch"])
      self.assertEqual(trial["verified_samples"], 4)
      self.assertLess(trial["max_relative_error"], 1e-10)
      self.assertEqual(trial["mean_psnr"], 100.0)  # the documented cap
      self.assertLen(trial["per_sample"]["ssim"], 4)
      self.assertEqual(trial["label_accuracy"], 1.0)  # digits' own labels
      self.assertEqual(trial["labels_verified"], 4)
    self.assertEqual(metrics["aggregate"]["label_accuracy"], 1.0)
    rows = [line.split() for line in stdout.splitlines()]
    rows = [r for r in rows if r and r[0] in ("0", "1")]
    self.assertLen(rows, 2)
    for row in rows:  # trial, exact 4/4, ..., labels 4/4 (all verified)
      self.assertEqual(row.count("4/4"), 2, row)
    # The stored arrays are the matched truth and reconstruction.
    with np.load(os.path.join(out, "trial_001.npz")) as arrays:
      self.assertEqual(arrays["truth"].shape, (4, 8, 8, 1))
      np.testing.assert_allclose(
        arrays["recovered"], arrays["truth"], atol=1e-10
      )
    width, height = _png_size(os.path.join(out, "reconstruction.png"))
    # Two rows of four 8x8 digits upscaled to at least 64 px.
    self.assertGreaterEqual(width, 4 * 64)
    self.assertGreaterEqual(height, 2 * 64)


class RunAttackErrorsTest(parameterized.TestCase):
  @parameterized.parameters(
    (["--dataset=nope"], "Unknown dataset"),
    (["--dataset=faces", "--batch_size=201"], "batch_size"),
    (["--width=0"], "--width"),
    (["--dataset=mnist", "--data_dir=/nonexistent/tfds"], "mnist"),
    (["--method=sgd"], "method"),
  )
  def test_bad_input_exits_2_with_one_line(self, args, message):
    out = tempfile.mkdtemp()
    code, _, stderr = _run("run_attack.py", *args, f"--out_dir={out}")
    self.assertEqual(code, 2, stderr)
    lines = [
      line
      for line in stderr.strip().splitlines()
      if line.startswith("run_attack.py: error:")
    ]
    self.assertLen(lines, 1, stderr)
    self.assertIn(message, lines[0])
    self.assertNotIn("Traceback", stderr)


class BenchmarkBigInputsTest(absltest.TestCase):
  def test_factorization_and_big_layer_modes(self):
    log = os.path.join(tempfile.mkdtemp(), "big.jsonl")
    seed = str(int(np.random.default_rng().integers(1000)))
    common = ["--ms=90", "--bs=5", "--n=400", "--repeats=1", f"--seed={seed}"]
    for mode in ("factorization", "big_layer"):
      code, _, stderr = _run(
        "benchmark.py", f"--mode={mode}", *common, f"--output={log}"
      )
      self.assertEqual(code, 0, stderr)
    with open(log) as f:
      factorization, big = (json.loads(line) for line in f)
    self.assertEqual(
      (factorization["svd_rank"], factorization["sketch_rank"]), (5, 5)
    )
    self.assertLess(factorization["sketch_max_error"], 1e-12)
    self.assertEqual(big["exit_code"], 0)  # exact and certified
    self.assertLess(big["max_relative_error"], 1e-10)  # against the truth
    self.assertGreater(big["peak_rss_mb"], 0)


class BenchmarkSweepTest(absltest.TestCase):
  def test_sweep_resumes_and_summarizes(self):
    out = tempfile.mkdtemp()
    log = os.path.join(out, "sweep.jsonl")
    seed = int(np.random.default_rng().integers(1000))
    args = [
      "--datasets=digits",
      "--ms=40",
      "--bs=3",
      "--methods=spear",
      "--nowarmup",
      f"--seed={seed}",
      f"--output={log}",
    ]
    code, _, stderr = _run("benchmark.py", *args, "--trials=1")
    self.assertEqual(code, 0, stderr)
    with open(log) as f:
      first = f.read().splitlines()
    self.assertLen(first, 1)
    # A trial killed while being written leaves half a line behind.
    with open(log, "a") as f:
      f.write(first[0][: len(first[0]) // 2])
    code, _, stderr = _run("benchmark.py", *args, "--trials=2")
    self.assertEqual(code, 0, stderr)
    self.assertIn("1 trials pending", stderr)
    with open(log) as f:
      lines = f.read().splitlines()
    # The finished trial is kept byte for byte, the torn line is skipped
    # and only the missing trial was added.
    self.assertEqual(lines[:1], first)
    self.assertLen(lines, 3)
    record = json.loads(lines[2])
    self.assertEqual((record["batch_size"], record["trial"]), (3, 1))
    with open(os.path.join(out, "sweep_summary.csv")) as f:
      rows = f.read().splitlines()
    self.assertTrue(rows[0].startswith("method,objective,dataset,width"))
    self.assertLen(rows, 2)
    self.assertIn(",2,", rows[1])  # two trials of the one setting
    for name in ("exact_rate", "time"):
      width, height = _png_size(os.path.join(out, f"sweep_{name}.png"))
      self.assertGreater(width * height, 0)


if __name__ == "__main__":
  absltest.main()
