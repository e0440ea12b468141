"""The sweep log (append, read back, resume), summary, plots, progress."""

import csv
import io
import json
import math
import os
import re
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np

from spear_jax import _report


def _record(rng, trial, b=4, method="spear", exact=True, seconds=None):
  return {
    "method": method,
    "objective": "none",
    "dataset": "digits",
    "width": 50,
    "batch_size": b,
    "depth": 2,
    "dtype": "float64",
    "seed": 0,
    "trial": trial,
    "kind": "trial",
    "exact_batch": exact,
    "exact_samples": b if exact else b - 1,
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
    self.assertAlmostEqual(spear["median_seconds"], sorted(kept)[1], places=12)
    self.assertAlmostEqual(spear["min_seconds"], min(kept), places=12)
    psnr = [records[i]["mean_psnr"] for i in (0, 1, 3)]
    self.assertAlmostEqual(spear["mean_psnr"], sum(psnr) / 3, places=10)
    other = next(r for r in rows if r["method"] == "spearpp")
    self.assertEqual((other["batch_size"], other["exact_batch_rate"]), (8, 1.0))

  def test_csv_and_plots(self):
    rng = np.random.default_rng()
    records = [
      _record(rng, t, b=b, exact=bool(rng.integers(2)))
      for b in (2, 4, 6)
      for t in range(2)
    ]
    rows = _report.summarize(records)
    out = tempfile.mkdtemp()
    _report.write_csv(os.path.join(out, "s.csv"), rows)
    with open(os.path.join(out, "s.csv")) as f:
      read = list(csv.DictReader(f))
    self.assertEqual([int(r["batch_size"]) for r in read], [2, 4, 6])
    for row, back in zip(rows, read):
      self.assertTrue(
        math.isclose(float(back["exact_batch_rate"]), row["exact_batch_rate"])
      )
    paths = _report.plot_summary(rows, os.path.join(out, "plot"))
    self.assertLen(paths, 2)
    # FedSGD only: no client plot; with DP-SGD and FedAvg rows: one.
    self.assertEqual(_report.plot_clients(rows, os.path.join(out, "c")), [])
    clients = [
      {**r, "client_spec": spec}
      for r in records
      for spec in ("dpsgd/1e-4", "fedavg/3/4/0.01")
    ]
    client_rows = _report.summarize(records + clients)
    self.assertLen(client_rows, 9)  # 3 batch sizes x 3 clients
    paths += _report.plot_clients(client_rows, os.path.join(out, "c"))
    self.assertLen(paths, 3)
    for path in paths:
      with open(path, "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


class _Terminal(io.StringIO):
  def isatty(self):
    return True


class ProgressBarTest(absltest.TestCase):
  def test_plain_stream_gets_one_line_per_update(self):
    stream = io.StringIO()
    bar = _report.ProgressBar(10, "trials", stream=stream)
    bar.advance(3, "finished earlier, read back", timed=False)
    bar.advance(1, "last: 4/4 exact")
    bar.advance(2)
    bar.close()
    bar.close()  # the scripts may close twice
    text = stream.getvalue()
    self.assertNotIn("\r", text)
    self.assertNotIn("\x1b", text)
    lines = text.splitlines()
    self.assertLen(lines, 4)  # the start and three updates
    self.assertTrue(text.endswith("\n"))
    for line, count in zip(lines, ("0/10", "3/10", "4/10", "6/10")):
      self.assertIn(count, line)
      self.assertIn("trials", line)
    self.assertIn("finished earlier, read back", lines[1])
    self.assertIn("last: 4/4 exact", lines[2])
    self.assertNotIn("exact", lines[3])

  def test_time_left_counts_timed_items_only(self):
    # A fake clock: 3 items read back at t=100, then 2 timed ones of 10 s
    # each: 20 s elapsed since the read-back, 5 items left at 10 s each.
    stream = io.StringIO()
    with mock.patch.object(_report.time, "time", return_value=100.0):
      bar = _report.ProgressBar(10, "trials", stream=stream)
      bar.advance(3, timed=False)
    with mock.patch.object(_report.time, "time", return_value=120.0):
      bar.advance(2)
    last = stream.getvalue().splitlines()[-1]
    self.assertIn("5/10 [00:20<00:50", last)

  def test_terminal_gets_a_tqdm_bar(self):
    stream = _Terminal()
    bar = _report.ProgressBar(4, "trials", stream=stream)
    for _ in range(4):
      bar.advance(1, "note")
    bar.close()
    text = stream.getvalue()
    self.assertIn("\r", text)  # redrawn in place
    self.assertEqual(text.count("\n"), 1)  # the newline of close
    self.assertRegex(text, re.escape("4/4 [") + r".*note\]")


if __name__ == "__main__":
  absltest.main()
