"""The sweep log (append, read back, resume), its summary, CSV and plots."""

import csv
import json
import math
import os
import tempfile

from absl.testing import absltest
import numpy as np

from spear_jax import _report


def _record(rng, trial, b=4, method="spear", exact=True, seconds=None):
  return {
    "method": method, "objective": "none", "dataset": "digits",
    "width": 50, "batch_size": b, "depth": 2, "dtype": "float64",
    "seed": 0, "trial": trial, "kind": "trial",
    "exact_batch": exact, "exact_samples": b if exact else b - 1,
    "seconds": float(rng.uniform(0.5, 5.0)) if seconds is None else seconds,
    "mean_psnr": float(rng.uniform(20, 100)),
    "mean_ssim": float(rng.uniform(0, 1)),
    "max_relative_error": float(rng.uniform(0, 1e-9)),
  }


class LogTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.path = os.path.join(tempfile.mkdtemp(), "sub", "log.jsonl")
    self.rng = np.random.default_rng()

  def test_round_trip_and_missing_file(self):
    self.assertEqual(_report.read_records(self.path), [])
    records = [_record(self.rng, t) for t in range(3)]
    for r in records:
      _report.append_record(self.path, r)
    self.assertEqual(_report.read_records(self.path), records)

  def test_truncated_line_is_skipped_and_next_append_stays_readable(self):
    first, second, third = (_record(self.rng, t) for t in range(3))
    _report.append_record(self.path, first)
    with open(self.path, "a") as f:  # an append cut short by a kill
      f.write(json.dumps(second)[:40])
    with self.assertLogs(level="WARNING"):
      self.assertEqual(_report.read_records(self.path), [first])
    _report.append_record(self.path, third)
    with self.assertLogs(level="WARNING"):
      self.assertEqual(_report.read_records(self.path), [first, third])

  def test_other_kinds_are_ignored(self):
    _report.append_record(self.path, _record(self.rng, 0))
    with open(self.path, "a") as f:
      f.write(json.dumps({"kind": "proposal_block", "b": 3}) + "\n")
    self.assertLen(_report.read_records(self.path), 1)

  def test_record_without_trial_fields_is_rejected(self):
    record = _record(self.rng, 0)
    del record["width"]
    with self.assertRaisesRegex(KeyError, "width"):
      _report.append_record(self.path, record)


class SummaryTest(absltest.TestCase):

  def test_rates_and_times_by_hand(self):
    rng = np.random.default_rng()
    seconds = rng.uniform(0.1, 9.0, size=5)
    records = [
      _record(rng, 0, exact=True, seconds=seconds[0]),
      _record(rng, 1, exact=False, seconds=seconds[1]),
      _record(rng, 2, exact=True, seconds=seconds[2]),
      # The same trial logged again counts once, with its last record.
      _record(rng, 2, exact=False, seconds=seconds[3]),
      _record(rng, 0, b=8, method="spearpp", seconds=seconds[4]),
    ]
    rows = _report.summarize(records)
    self.assertLen(rows, 2)
    spear = next(r for r in rows if r["method"] == "spear")
    self.assertEqual(spear["trials"], 3)
    self.assertEqual(spear["exact_batches"], 1)
    self.assertAlmostEqual(spear["exact_batch_rate"], 1 / 3, places=15)
    # 4 + 3 + 3 exact samples of 12.
    self.assertAlmostEqual(spear["exact_sample_rate"], 10 / 12, places=15)
    kept = [seconds[0], seconds[1], seconds[3]]
    self.assertAlmostEqual(spear["median_seconds"], sorted(kept)[1],
                           places=12)
    self.assertAlmostEqual(spear["min_seconds"], min(kept), places=12)
    psnr = [records[i]["mean_psnr"] for i in (0, 1, 3)]
    self.assertAlmostEqual(spear["mean_psnr"], sum(psnr) / 3, places=10)
    other = next(r for r in rows if r["method"] == "spearpp")
    self.assertEqual((other["batch_size"], other["exact_batch_rate"]),
                     (8, 1.0))

  def test_csv_and_plots(self):
    rng = np.random.default_rng()
    records = [_record(rng, t, b=b, exact=bool(rng.integers(2)))
               for b in (2, 4, 6) for t in range(2)]
    rows = _report.summarize(records)
    out = tempfile.mkdtemp()
    _report.write_csv(os.path.join(out, "s.csv"), rows)
    with open(os.path.join(out, "s.csv")) as f:
      read = list(csv.DictReader(f))
    self.assertEqual([int(r["batch_size"]) for r in read], [2, 4, 6])
    for row, back in zip(rows, read):
      self.assertTrue(math.isclose(float(back["exact_batch_rate"]),
                                   row["exact_batch_rate"]))
    paths = _report.plot_summary(rows, os.path.join(out, "plot"))
    self.assertLen(paths, 2)
    for path in paths:
      with open(path, "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


if __name__ == "__main__":
  absltest.main()
