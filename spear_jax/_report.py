"""Benchmark records: a resumable JSON-lines log, a CSV summary, plots.

A sweep appends one JSON object per finished trial to a log file. Each
record carries the fields of :data:`TRIAL_KEY`, which identify a trial; a
re-run reads the log, skips the trials already in it and appends the rest,
so an interrupted sweep loses at most the trial in flight. A line cut short
by an interruption is ignored (and reported) when the log is read back.

:func:`summarize` groups the trials by setting, :func:`write_csv` writes
that table and :func:`plot_summary` draws the exact-batch rate and the
time per batch against ``b`` (matplotlib, an optional dependency:
``pip install -e ".[plots]"``).

:class:`ProgressBar` shows the progress of a sweep (tqdm on a terminal,
one plain line per update in logs).
"""

from collections.abc import Iterable, Mapping, Sequence
import csv
import json
import math
import os
import statistics
import sys
import time
from typing import Any

from absl import logging
import tqdm

__all__ = [
  "SUMMARY_FIELDS",
  "TRIAL_KEY",
  "ProgressBar",
  "append_record",
  "plot_clients",
  "plot_summary",
  "read_records",
  "summarize",
  "trial_key",
  "write_csv",
]

# The fields that identify one trial of a sweep.
TRIAL_KEY = (
  "method",
  "objective",
  "dataset",
  "width",
  "batch_size",
  "depth",
  "dtype",
  "client_spec",
  "learner",
  "model",
  "layer",
  "next_layer_grad",
  "seed",
  "trial",
)
# Fields added later: records written before them read as the default.
_DEFAULTS = {
  "client_spec": "fedsgd",
  "learner": "",
  "model": "mlp",
  "layer": 0,
  "next_layer_grad": False,
}
# The grouping of the summary: a trial key without seed and trial.
_GROUP_KEY = TRIAL_KEY[:-2]

SUMMARY_FIELDS = _GROUP_KEY + (
  "trials",
  "exact_batches",
  "exact_batch_rate",
  "exact_sample_rate",
  "median_seconds",
  "min_seconds",
  "max_seconds",
  "mean_psnr",
  "mean_ssim",
  "near_duplicates_095",
  "max_relative_error",
  "label_accuracy",
  "identifiable_batches",
)


def trial_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
  """The identity of a trial: the values of :data:`TRIAL_KEY`.

  Raises:
    KeyError: naming the first missing field.
  """
  missing = [
    name for name in TRIAL_KEY if name not in record and name not in _DEFAULTS
  ]
  if missing:
    raise KeyError(f"record lacks the trial fields {missing}.")
  return tuple(_field(record, name) for name in TRIAL_KEY)


def _field(record: Mapping[str, Any], name: str) -> Any:
  return record.get(name, _DEFAULTS.get(name))


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a JSON-lines log; a missing file is an empty log.

  Lines that do not parse (a write cut short by an interruption) or that
  lack the trial fields are skipped with a warning, so that the trial is
  simply run again. Records whose ``kind`` is not ``"trial"`` (other
  measurements written to the same log) are skipped silently.
  """
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
        if record.get("kind", "trial") != "trial":
          continue  # other measurements sharing the log (throughput)
        trial_key(record)
      except (json.JSONDecodeError, KeyError, TypeError) as err:
        logging.warning(
          "%s:%d: skipping an unreadable record (%s).",
          path,
          number,
          str(err).splitlines()[0],
        )
        continue
      records.append(record)
  return records


def append_record(
  path: str | os.PathLike[str], record: Mapping[str, Any]
) -> None:
  """Appends one record as a line and flushes it to disk.

  If the file ends without a newline (an earlier write was cut short), a
  newline is written first so the new record stays on a line of its own.
  """
  trial_key(record)
  line = json.dumps(record, sort_keys=True) + "\n"
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "ab+") as f:
    f.seek(0, os.SEEK_END)
    if f.tell():
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.write(b"\n")
    f.write(line.encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


def _mean(values: Sequence[float | None]) -> float:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  return statistics.fmean(finite) if finite else math.nan


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per setting (method, objective, dataset, m, b, depth, dtype).

  Each record must have ``exact_batch`` (bool), ``exact_samples`` (int),
  ``seconds`` and optionally ``mean_psnr``, ``mean_ssim`` and
  ``max_relative_error`` (per-batch aggregates). A trial logged twice
  counts once (the last).

  Returns:
    Rows with the fields of :data:`SUMMARY_FIELDS`, sorted by setting.
  """
  latest = {trial_key(r): r for r in records}
  groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
  for record in latest.values():
    group = tuple(_field(record, name) for name in _GROUP_KEY)
    groups.setdefault(group, []).append(record)
  rows = []
  for group in sorted(groups, key=lambda g: tuple(map(str, g[:3])) + g[3:]):
    trials = groups[group]
    seconds = [float(r["seconds"]) for r in trials]
    samples = sum(int(r["batch_size"]) for r in trials)
    exact_batches = sum(bool(r["exact_batch"]) for r in trials)
    rows.append(
      {
        **dict(zip(_GROUP_KEY, group)),
        "trials": len(trials),
        "exact_batches": exact_batches,
        "exact_batch_rate": exact_batches / len(trials),
        "exact_sample_rate": sum(int(r["exact_samples"]) for r in trials)
        / samples,
        "median_seconds": statistics.median(seconds),
        "min_seconds": min(seconds),
        "max_seconds": max(seconds),
        "mean_psnr": _mean([r.get("mean_psnr") for r in trials]),
        "mean_ssim": _mean([r.get("mean_ssim") for r in trials]),
        # Share of samples with a partner above input cosine 0.95 (older
        # logs lack it: NaN).
        "near_duplicates_095": _mean(
          [r.get("near_duplicates_095") for r in trials]
        ),
        "max_relative_error": max(
          float(r.get("max_relative_error", math.nan)) for r in trials
        ),
        # Mean share of correct labels (NaN where none were read).
        "label_accuracy": _mean([r.get("label_accuracy") for r in trials]),
        # Batches in which every sample is identifiable from the layer
        # and numerically independent of the others (truth-side, FedSGD;
        # NaN where not assessed): the most exact batches any float64
        # attack on this layer can reach.
        "identifiable_batches": _count_identifiable(trials),
      }
    )
  return rows


def _count_identifiable(trials) -> float:
  counts = [r.get("unidentifiable_samples") for r in trials]
  if any(c is None for c in counts):
    return math.nan
  # Numerically dependent inputs (recorded from stop 21 on) count too.
  dependent = [int(r.get("dependent_samples") or 0) for r in trials]
  return float(sum(int(c) == 0 and d == 0 for c, d in zip(counts, dependent)))


def write_csv(
  path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]
) -> None:
  """Writes summary rows (see :func:`summarize`) as CSV with a header."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow(row)


def _series(rows):
  """Rows grouped into lines: one per setting other than ``b``."""
  lines: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    label = f"{row['method']}"
    if row["method"] != "spear":
      label += f" ({row['objective']})"
    label += f", {row['dataset']}, m={row['width']}"
    client = _field(row, "client_spec")
    if client != "fedsgd":
      label += f", {client}"
    lines.setdefault(label, []).append(row)
  for series in lines.values():
    series.sort(key=lambda r: r["batch_size"])
  return lines


def plot_clients(
  rows: Sequence[Mapping[str, Any]], out_prefix: str | os.PathLike[str]
) -> list[str]:
  """Quality per client setting: ``PREFIX_clients.png`` (if any).

  One bar per client setting (``client_spec``) and attack setting: the
  exact-batch rate for exact clients (FedSGD, FedAvg) and the mean PSNR
  (right axis) for noisy ones (DP-SGD), so a sweep over ``--clients``
  reads at a glance.

  Returns:
    The paths written (none for a sweep of FedSGD only).
  """
  if all(_field(r, "client_spec") == "fedsgd" for r in rows):
    return []
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  ordered = sorted(
    rows,
    key=lambda r: (
      r["method"],
      r["width"],
      r["batch_size"],
      _field(r, "client_spec"),
    ),
  )
  labels = [
    f"{r['method']} m={r['width']} b={r['batch_size']}\n"
    f"{_field(r, 'client_spec')}"
    for r in ordered
  ]
  noisy = [_field(r, "client_spec").startswith("dpsgd") for r in ordered]
  fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(rows)), 4.4), dpi=100)
  psnr_ax = ax.twinx()
  for i, (row, is_noisy) in enumerate(zip(ordered, noisy, strict=True)):
    if is_noisy:
      psnr_ax.bar(i, row["mean_psnr"], color="tab:orange", alpha=0.7)
    else:
      ax.bar(i, row["exact_batch_rate"], color="tab:blue", alpha=0.8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("exact-batch rate (blue: FedSGD, FedAvg)")
  psnr_ax.set_ylabel("mean PSNR, dB (orange: DP-SGD)")
  ax.set_xticks(range(len(labels)))
  ax.set_xticklabels(labels, rotation=90, fontsize="x-small")
  ax.set_title("attack quality per client setting")
  fig.tight_layout()
  path = f"{os.fspath(out_prefix)}_clients.png"
  fig.savefig(path)
  plt.close(fig)
  return [path]


def plot_summary(
  rows: Sequence[Mapping[str, Any]],
  out_prefix: str | os.PathLike[str],
  title: str = "",
) -> list[str]:
  """Draws the exact-batch rate and the median time against ``b``.

  Args:
    rows: summary rows from :func:`summarize`.
    out_prefix: path prefix; ``PREFIX_exact_rate.png`` and
      ``PREFIX_time.png`` are written.
    title: a suffix for both titles, e.g. the hardware.

  Returns:
    The paths written.

  Raises:
    ImportError: if matplotlib is not installed.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ImportError(
      'plots need matplotlib: pip install -e ".[plots]"'
    ) from err
  lines = _series(rows)
  paths = []
  for name, field, ylabel in (
    ("exact_rate", "exact_batch_rate", "exact-batch rate"),
    ("time", "median_seconds", "median time per batch (s)"),
  ):
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, series in lines.items():
      dashed = series[0]["method"] != "spear"
      ax.plot(
        [r["batch_size"] for r in series],
        [r[field] for r in series],
        marker="s" if dashed else "o",
        linestyle="--" if dashed else "-",
        label=label,
      )
    ax.set_xlabel("batch size b")
    ax.set_ylabel(ylabel)
    if field == "exact_batch_rate":
      ax.set_ylim(-0.05, 1.05)
    else:
      ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{ylabel} vs b{': ' + title if title else ''}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = f"{os.fspath(out_prefix)}_{name}.png"
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths


class ProgressBar:
  """A progress bar over trials on stderr, drawn by tqdm.

  On a terminal it is a tqdm bar redrawn in place. Elsewhere (a log file,
  CI, a pipe) the start and every update write one plain line, tqdm's
  meter (count, elapsed time, estimated time left, the note) and a
  newline, without carriage returns. The time left is estimated from the
  mean time per timed item.
  """

  def __init__(
    self, total: int, unit: str = "trials", width: int = 24, stream=None
  ):
    """Starts the bar.

    Args:
      total: the number of items.
      unit: what an item is called.
      width: the width of the bar in the plain lines, in characters.
      stream: where to write (stderr by default).
    """
    self.total, self.unit, self.width = total, unit, width
    self.stream = stream if stream is not None else sys.stderr
    self.done = 0
    self.timed = 0
    self.start = time.time()
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._bar = None
    if self.tty:
      # smoothing=0: the rate is the mean, (n - initial) / elapsed.
      self._bar = tqdm.tqdm(
        total=total,
        unit=unit,
        file=self.stream,
        dynamic_ncols=True,
        smoothing=0.0,
        mininterval=0.0,
        miniters=1,
      )
    else:
      self._write_line("")

  def advance(self, count: int = 1, note: str = "", timed: bool = True):
    """Marks ``count`` more items done; ``timed=False`` for read-back ones.

    Items that are not timed (finished earlier, read back from a log) count
    towards the total but restart the clock, so they do not shorten the
    estimate of the time left.
    """
    self.done += count
    if timed:
      self.timed += count
    else:
      self.start = time.time()
    if self._bar is None:
      self._write_line(note)
      return
    if timed:
      increment = count
    else:
      self._bar.reset()  # restarts tqdm's clock and its count
      self._bar.initial = self.done - self.timed
      increment = self.done
    self._bar.set_postfix_str(note, refresh=False)
    self._bar.update(increment)  # redraws

  def _write_line(self, note: str):
    line = tqdm.tqdm.format_meter(
      self.done,
      self.total,
      time.time() - self.start,
      unit=self.unit,
      initial=self.done - self.timed,
      postfix=note or None,
      ascii=True,
      bar_format=f"{{l_bar}}{{bar:{self.width}}}{{r_bar}}",
    )
    self.stream.write(line + "\n")
    self.stream.flush()

  def close(self):
    """Ends the bar (a newline on a terminal); closing twice is harmless."""
    if self._bar is not None:
      self._bar.close()
