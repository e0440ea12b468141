r"""Does a deployment leak? A measured privacy audit of client updates.

:func:`run_audit` attacks simulated clients of a deployment (its model, its
batch sizes, its FedAvg and DP-SGD settings) on real images with SPEAR,
SPEAR++ and the gradient-matching baseline, over a grid that varies one
setting at a time around the deployment's own:

* ``batch_size``: ``b`` at the deployment's width, FedSGD;
* ``width``: ``m`` at the deployment's batch size, FedSGD;
* ``noise_multiplier``: DP-SGD's ``sigma`` (clipping norm ``C``; its
  ``epsilon`` for one release at ``delta = 1e-5``);
* ``local_steps``: FedAvg, one epoch of ``s`` mini-batch SGD steps.

Every trial is appended to ``trials.jsonl`` in the output directory as it
finishes, so an interrupted audit resumes where it stopped (the report is
written from what is finished, marked incomplete). :func:`write_report`
turns the records into ``report.md`` (tables, findings, the threat model),
``report.json`` and PNG plots.

The numbers are measurements on a finite number of trials: a rate comes
with its Wilson 95% interval, and "no attack recovered anything" is a
finding with its trial count, never a guarantee.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from typing import Any

import numpy as np

from spear_jax import _baseline
from spear_jax import _clients
from spear_jax import _report
from spear_jax._attack import default_max_proposals

__all__ = [
  "AXES",
  "AuditConfig",
  "audit_cells",
  "run_audit",
  "spear_success_estimate",
  "wilson_interval",
  "write_report",
]

AXES = ("batch_size", "width", "noise_multiplier", "local_steps")
METHODS = ("spear", "spearpp", "baseline")
_AXIS_TITLES = {
  "batch_size": "batch size b",
  "width": "width m",
  "noise_multiplier": "DP-SGD noise multiplier sigma",
  "local_steps": "FedAvg local steps",
}


@dataclasses.dataclass(frozen=True)
class AuditConfig:
  """The deployment under audit and the grid around it.

  Attributes:
    dataset: image set the clients hold (bundled or tensorflow-datasets).
    data_dir: tensorflow-datasets data directory.
    model: ``"mlp"`` (``depth`` Dense-ReLU layers of the width) or
      ``"cnn"`` (:class:`spear_jax.fl.CNN`); a model factory passed to
      :func:`run_audit` replaces it.
    depth: hidden layers of the MLP.
    num_classes: classifier outputs.
    batch_size: the deployment's client batch size (the grid's centre).
    width: the deployment's width of the attacked layer.
    batch_sizes: ``b`` values of the ``batch_size`` axis.
    widths: ``m`` values of the ``width`` axis.
    noise_multipliers: ``sigma`` values of the ``noise_multiplier`` axis.
    local_steps: FedAvg steps per round of the ``local_steps`` axis (one
      epoch of mini-batches of ``ceil(b / s)``).
    local_lr: FedAvg's SGD learning rate.
    clip_norm: DP-SGD's clipping norm ``C``.
    methods: attacks to run: ``spear``, ``spearpp``, ``baseline``.
    spear_max_batch_size: SPEAR is exponential in ``b``; larger batches
      are left to SPEAR++ (not run, reported as such).
    trials: client batches per cell (the same batches for every method
      and client setting).
    time_budget_s: wall-time budget of each SPEAR or SPEAR++ attack.
    recognizable_psnr: a sample counts as recognizably leaked at this PSNR
      (dB) or above, exact or not.
    seed: seed of the batches, models and attacks.
    baseline: settings of the gradient-matching baseline.
  """

  dataset: str = "cifar_like"
  data_dir: str | None = None
  model: str = "mlp"
  depth: int = 2
  num_classes: int = 10
  batch_size: int = 8
  width: int = 400
  batch_sizes: tuple[int, ...] = (4, 8, 16, 32)
  widths: tuple[int, ...] = (100, 400, 1000)
  noise_multipliers: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
  local_steps: tuple[int, ...] = (1, 2, 4)
  local_lr: float = 0.01
  clip_norm: float = 1.0
  methods: tuple[str, ...] = METHODS
  spear_max_batch_size: int = 16
  trials: int = 3
  time_budget_s: float = 60.0
  recognizable_psnr: float = 25.0
  seed: int = 0
  baseline: _baseline.BaselineConfig = dataclasses.field(
    default_factory=_baseline.BaselineConfig
  )

  def __post_init__(self):
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown or not self.methods:
      raise ValueError(
        f"methods must be some of {', '.join(METHODS)}, got {self.methods}."
      )
    for name in ("batch_size", "width", "depth", "trials", "num_classes"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1.")
    for name in ("batch_sizes", "widths", "local_steps"):
      if any(v < 1 for v in getattr(self, name)):
        raise ValueError(f"every entry of {name} must be at least 1.")
    if any(not s > 0 for s in self.noise_multipliers):
      raise ValueError("noise multipliers must be positive.")
    if not self.time_budget_s > 0 or not self.local_lr > 0:
      raise ValueError("time_budget_s and local_lr must be positive.")
    if self.model not in ("mlp", "cnn"):
      raise ValueError(f"model must be 'mlp' or 'cnn', not {self.model!r}.")


def _fedavg_spec(b: int, steps: int, lr: float) -> str:
  return f"fedavg/1/{math.ceil(b / steps)}/{lr:g}"


def _cell(axis, value, b, m, client) -> dict[str, Any]:
  return {"axis": axis, "value": value, "b": b, "m": m, "client": client}


def audit_cells(config: AuditConfig) -> list[dict[str, Any]]:
  """The grid: one dict per (axis, value) with ``b``, ``m`` and the client.

  A cell shared by two axes (the deployment's own setting) appears once
  per axis; its trials are run once.
  """
  b0, m0 = config.batch_size, config.width
  cells = []
  for b in config.batch_sizes:
    cells.append(_cell("batch_size", b, b, m0, "fedsgd"))
  for m in config.widths:
    cells.append(_cell("width", m, b0, m, "fedsgd"))
  for sigma in config.noise_multipliers:
    spec = f"dpsgd/{sigma:g}"
    cells.append(_cell("noise_multiplier", sigma, b0, m0, spec))
  for steps in config.local_steps:
    spec = _fedavg_spec(b0, steps, config.local_lr)
    cells.append(_cell("local_steps", steps, b0, m0, spec))
  return cells


def _client_config(spec: str, config: AuditConfig) -> _clients.ClientConfig:
  client = _clients.parse_client_spec(spec)
  if client.mode == "dpsgd":
    client = dataclasses.replace(client, clip_norm=config.clip_norm)
  return client


def _fingerprint(config: AuditConfig, model_name: str) -> str:
  """What makes two audits' trials interchangeable (not the grid, trials)."""
  fields = {
    k: v
    for k, v in dataclasses.asdict(config).items()
    if k
    not in (
      "batch_sizes",
      "widths",
      "noise_multipliers",
      "local_steps",
      "methods",
      "trials",
      "batch_size",
      "width",
      "data_dir",
    )
  }
  fields["model"] = model_name
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _skip_reason(config: AuditConfig, method: str, b: int) -> str:
  """Why an attack is not run on a cell ("" when it is)."""
  if method == "spear" and b > config.spear_max_batch_size:
    return f"not run (b > {config.spear_max_batch_size}: exponential in b)"
  if method == "baseline" and config.model == "cnn":
    return "not run (the CNN's attacked layer sees conv features)"
  return ""


def _runs(config: AuditConfig) -> list[tuple[str, int, int, str, int]]:
  """``(method, b, m, client, trial)`` of every attack, each once."""
  runs, seen = [], set()
  for cell in audit_cells(config):
    for method in config.methods:
      if _skip_reason(config, method, cell["b"]):
        continue
      for trial in range(config.trials):
        run = (method, cell["b"], cell["m"], cell["client"], trial)
        if run not in seen:
          seen.add(run)
          runs.append(run)
  return runs


def _run_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
  return (
    record["method"],
    record["batch_size"],
    record["width"],
    record["client_spec"],
    record["trial"],
  )


def run_audit(
  config: AuditConfig,
  out_dir: str | os.PathLike[str],
  *,
  model_factory: Callable[..., Any] | None = None,
  model_name: str | None = None,
  environment: Mapping[str, Any] | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Runs (or resumes) the audit and writes its report under ``out_dir``.

  Args:
    config: the deployment and the grid (:class:`AuditConfig`).
    out_dir: where ``trials.jsonl``, ``report.md``, ``report.json`` and the
      plots go.
    model_factory: a user's own model instead of ``config.model``:
      ``model_factory(key, n, width, num_classes, dtype) ->``
      :class:`spear_jax.fl.ModelSpec`; the baseline needs the attacked
      layer to see the images (``features_fn=None``).
    model_name: the name of the factory's model in the report and in the
      resume check (default: the factory's ``__name__``).
    environment: machine description for the report (device, CPU count,
      versions); default: what JAX reports.
    progress: show a progress bar on stderr.

  Returns:
    The report as a dict (also written to ``report.json``), with
    ``complete`` false when the audit was interrupted.
  """
  from spear_jax import _data  # pylint: disable=g-import-not-at-top
  from spear_jax._config import AttackConfig  # pylint: disable=g-import-not-at-top

  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  name: str = config.model
  if model_factory is not None:
    name = model_name or str(getattr(model_factory, "__name__", "custom"))
  fingerprint = _fingerprint(config, name)
  log_path = os.path.join(out_dir, "trials.jsonl")
  done = {
    _run_key(r): r
    for r in _report.read_records(log_path)
    if r.get("audit") == fingerprint
  }
  image_set = _data.load_dataset(config.dataset, data_dir=config.data_dir)
  too_big = max(config.batch_sizes + (config.batch_size,))
  if too_big > image_set.num_images:
    raise ValueError(
      f"batch size {too_big} exceeds the {image_set.num_images} images of "
      f"{config.dataset!r}."
    )
  runs = _runs(config)
  pending = [r for r in runs if r not in done]
  bar = _report.ProgressBar(len(runs), "attacks") if progress else None
  if bar is not None and len(runs) > len(pending):
    bar.advance(
      len(runs) - len(pending), "finished earlier, read back", timed=False
    )
  attack_config = AttackConfig(time_budget_s=config.time_budget_s)
  interrupted = False
  for run in pending:
    try:
      record = _attack(config, run, image_set, attack_config, model_factory)
    except KeyboardInterrupt:
      record = None
    if record is None:  # Ctrl-C, in the attack or around it
      interrupted = True
      break
    record.update(audit=fingerprint, model=name)
    _report.append_record(log_path, record)
    done[_run_key(record)] = record
    if bar is not None:
      bar.advance(
        1,
        f"{run[0]} b={run[1]} m={run[2]} {run[3]} #{run[4]}: "
        f"{record['exact_samples']}/{run[1]} exact, "
        f"{record['seconds']:.1f} s",
      )
  if bar is not None:
    bar.close()
  records = [done[r] for r in runs if r in done]
  return write_report(
    out_dir,
    config,
    records,
    model_name=name,
    environment=_environment() if environment is None else environment,
    complete=not interrupted and len(records) == len(runs),
  )


def _attack(config, run, image_set, attack_config, model_factory):
  """One attack of the grid as a record; ``None`` if interrupted."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from spear_jax import _experiment  # pylint: disable=g-import-not-at-top

  method, b, m, spec, trial = run
  # Trial t of (b, m) is the same batch and model for every method and
  # client setting: the audit compares them on identical data.
  key = jax.random.fold_in(jax.random.key(config.seed), b)
  key = jax.random.fold_in(jax.random.fold_in(key, m), trial)
  result = _experiment.run_trial(
    key,
    image_set,
    batch_size=b,
    width=m,
    depth=config.depth,
    method=method,
    num_classes=config.num_classes,
    dtype=jnp.float64,
    config=attack_config,
    model=model_factory if model_factory is not None else config.model,
    client=_client_config(spec, config),
    baseline=config.baseline,
  )
  if result["stats"]["stop_reason"] == "interrupted":
    return None
  psnr = np.asarray(result["per_sample"].get("psnr", []), np.float64)
  return _experiment.trial_record(
    result,
    seed=config.seed,
    trial=trial,
    client_spec=spec,
    recognizable_samples=int(np.sum(psnr >= config.recognizable_psnr)),
  )


def _environment() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  return {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
  }


# --------------------------------------------------------------------------
# Statistics


def wilson_interval(successes: int, trials: int, confidence: float = 0.95):
  """Wilson score interval of a binomial rate (``(nan, nan)`` for 0 trials)."""
  if trials == 0:
    return (math.nan, math.nan)
  from scipy import stats  # pylint: disable=g-import-not-at-top

  interval = stats.binomtest(successes, trials).proportion_ci(
    confidence_level=confidence, method="wilson"
  )
  return (float(interval.low), float(interval.high))


def spear_success_estimate(
  m: int, b: int, proposals: float, false_rejection: float = 1e-9
) -> float:
  r"""The SPEAR paper's model of its success probability (Sec. 5.2).

  Our reconstruction of the paper's analysis (its formula was not
  retrieved; see ``notes/spear.md`` 2.6-2.7). Each column of ``D`` has
  ``z ~ Bin(m, 1/2)`` zeros; the filter keeps directions with at least
  ``t*`` zeros, the ``false_rejection`` quantile of ``Bin(m, 1/2)``.
  A column is found by ``proposals`` uniform ``(b-1)``-row samples with
  probability ``1 - (1 - C(z, b-1) / C(m, b-1))^N`` when ``z >= t*``
  (coupon collector, Lemma 5.2), and a wrong direction (a two-column
  mixture with ``Bin(m, 1/4) + b - 1`` zeros) passes the filter with a
  probability union-bounded over the ``C(b, 2)`` pairs:

  .. math::
    p \approx \Big(\mathbb{E}_z\big[1 - (1 - \tbinom{z}{b-1} /
    \tbinom{m}{b-1})^N\big]\Big)^b \big(1 - \min(1, \tbinom{b}{2}
    P[\mathrm{Bin}(m, 1/4) \ge t^* - b + 1])\big).

  It ignores what the implementation adds (adaptive threshold, greedy
  selection with a certificate), so it is conservative at small ``m``.
  """
  from scipy import special  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top

  if b < 2:
    return 1.0
  t_star = int(stats.binom.ppf(false_rejection, m, 0.5))
  z = np.arange(m + 1)
  weights = stats.binom.pmf(z, m, 0.5)
  log_hit = np.full(m + 1, -np.inf)
  ok = z >= max(b - 1, t_star)
  k = b - 1
  log_comb = special.gammaln(z + 1) - special.gammaln(k + 1)
  log_comb = log_comb - special.gammaln(np.maximum(z - k, 0) + 1)
  log_all = special.gammaln(m + 1) - special.gammaln(k + 1)
  log_all -= special.gammaln(m - k + 1)
  log_hit[ok] = log_comb[ok] - log_all
  hit = np.exp(log_hit)
  found = -np.expm1(proposals * np.log1p(-np.minimum(hit, 1 - 1e-16)))
  found = np.where(ok, found, 0.0)
  per_column = float(np.sum(weights * found))
  wrong = stats.binom.sf(t_star - b, m, 0.25)  # P[Bin >= t* - b + 1]
  clean = 1.0 - min(1.0, math.comb(b, 2) * float(wrong))
  return per_column**b * clean


# --------------------------------------------------------------------------
# Report


def _rows(config: AuditConfig, records: Sequence[Mapping[str, Any]]):
  """One row per (axis, value, method) with its rates and means."""
  by_run: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
  for r in records:
    by_run.setdefault(
      (r["method"], r["batch_size"], r["width"], r["client_spec"]), []
    ).append(r)
  rates = [
    r["stats_proposals"] / r["seconds"]
    for r in records
    if r["method"] == "spear" and r["seconds"] > 0 and r["stats_proposals"]
  ]
  rate = statistics.median(rates) if rates else math.nan
  rows = []
  for cell in audit_cells(config):
    for method in config.methods:
      trials = by_run.get((method, cell["b"], cell["m"], cell["client"]), [])
      skipped = _skip_reason(config, method, cell["b"])
      exact = sum(bool(t["exact_batch"]) for t in trials)
      certified = sum(
        bool(t["exact_batch"]) and bool(t["success"]) for t in trials
      )
      low, high = wilson_interval(exact, len(trials))
      samples = sum(int(t["batch_size"]) for t in trials)
      row = {
        "axis": cell["axis"],
        "value": cell["value"],
        "batch_size": cell["b"],
        "width": cell["m"],
        "client_spec": cell["client"],
        "method": method,
        "trials": len(trials),
        "skipped": skipped,
        "exact_batches": exact,
        "certified_batches": certified,
        "exact_rate": exact / len(trials) if trials else math.nan,
        "exact_rate_ci95": [low, high],
        "exact_samples": sum(int(t["exact_samples"]) for t in trials),
        "recognizable_sample_rate": (
          sum(int(t.get("recognizable_samples", 0)) for t in trials) / samples
          if samples
          else math.nan
        ),
        "mean_psnr": _report._mean([t.get("mean_psnr") for t in trials]),  # pylint: disable=protected-access
        "label_accuracy": _report._mean(  # pylint: disable=protected-access
          [t.get("label_accuracy") for t in trials]
        ),
        "median_seconds": (
          statistics.median(float(t["seconds"]) for t in trials)
          if trials
          else math.nan
        ),
        "stop_reasons": sorted({str(t["stop_reason"]) for t in trials}),
      }
      if cell["axis"] == "noise_multiplier":
        row["dp_epsilon"] = _clients.dp_epsilon(cell["value"])
      if method == "spear" and cell["client"] == "fedsgd":
        budget = float(default_max_proposals(cell["b"]))
        if math.isfinite(rate):
          budget = min(budget, rate * config.time_budget_s)
        row["analytic_estimate"] = spear_success_estimate(
          cell["m"], cell["b"], budget
        )
        row["analytic_proposals"] = budget
      rows.append(row)
  return rows, rate


def _leaked(row) -> bool:
  return row["exact_samples"] > 0 or row["recognizable_sample_rate"] > 0


def _findings(config, rows) -> list[str]:
  """Smallest b and sigma where no attack recovered anything, as measured."""
  findings = []
  for axis, what in (
    ("batch_size", "batch size"),
    ("noise_multiplier", "noise multiplier"),
  ):
    values = sorted({r["value"] for r in rows if r["axis"] == axis})
    for value in values:
      cell = [r for r in rows if r["axis"] == axis and r["value"] == value]
      ran = [r for r in cell if r["trials"]]
      if ran and not any(_leaked(r) for r in ran):
        count = sum(r["trials"] for r in ran)
        findings.append(
          f"Smallest {what} at which no attack recovered anything: "
          f"{value:g} (0 exact and 0 samples at PSNR >= "
          f"{config.recognizable_psnr:g} dB in {count} attacks: "
          f"{', '.join(sorted({r['method'] for r in ran}))}). A measured "
          "finding on these trials, not a guarantee."
        )
        break
    else:
      if values:
        findings.append(
          f"Every {what} in the grid ({', '.join(f'{v:g}' for v in values)})"
          " leaked: some attack recovered a sample exactly or at PSNR >= "
          f"{config.recognizable_psnr:g} dB. The grid found no safe {what}."
        )
  return findings


_THREAT_MODEL = """\
* The server is honest but curious: it runs the protocol as specified and
  sends every client the current model, then inspects what a client sends
  back. It knows the architecture and every weight it sent (the audit's
  SPEAR and SPEAR++ certificates use them); it does not modify the model
  (no malicious weights) and sees one client's update alone (no secure
  aggregation across clients).
* The attacked layer is a fully connected layer followed by ReLU: here the
  first layer of the MLP (it sees the images) or the dense layer after the
  CNN's convolutions (it sees conv features). The update of that layer is
  sent in the clear, as the gradient (FedSGD), the parameter delta after
  local SGD steps (FedAvg, server minus client) or a DP-SGD gradient
  (per-example clipping to C, Gaussian noise sigma C on the sum, then the
  mean).
* Loss: softmax cross-entropy, mean over the batch. Labels are recovered
  from the classifier's update after the inputs; the baseline is given the
  true labels (its paper's assumption; that favours it).
* Client data: real images of the named set, float64 arithmetic. Batches
  are drawn at random; trial t uses the same batch and model for every
  method and client setting.
* "Exact" means every sample of the batch within relative L2 error 1e-8
  of the truth after optimal matching; "certified" means the attack itself
  proved it without the truth (SPEAR's ReLU certificate, or the drift
  certificate for FedAvg). A DP-SGD gradient is never exact; its leakage
  is the PSNR. A sample counts as recognizable at the stated PSNR.
* Rates are over few trials: read the Wilson 95% intervals. A setting at
  which nothing leaked in N trials is a measurement, not a guarantee:
  other batches, seeds, longer budgets or better attacks may succeed.
* The SPEAR analytic estimate is our reconstruction of the paper's model
  (columns of D half zeros, i.i.d.; a filter at the 1e-9 false-rejection
  quantile; a union bound over two-column mixtures) with the sampling
  budget this machine reaches within the time budget. It ignores the
  adaptive threshold and the certified greedy selection, so it is
  conservative at small widths.
"""


def _fmt(value, digits=1):
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "—"
  return f"{value:.{digits}f}"


def _markdown(config, rows, findings, meta) -> str:
  lines = [
    "# Privacy audit: gradient inversion of client updates",
    "",
    f"Deployment: model `{meta['model']}`"
    + (f" (depth {config.depth})" if meta["model"] == "mlp" else "")
    + f", width m = {config.width}, client batch size b = "
    f"{config.batch_size}, data `{config.dataset}`, {config.num_classes} "
    f"classes. Attacks: {', '.join(config.methods)}; {config.trials} "
    f"batches per setting; {config.time_budget_s:g} s budget per SPEAR / "
    "SPEAR++ attack; baseline "
    f"{config.baseline.steps} Adam steps x {config.baseline.restarts} "
    "restarts.",
    "",
    f"Machine: {meta['environment'].get('device_kind', '?')} "
    f"({meta['environment'].get('platform', '?')}), "
    f"{meta['environment'].get('cpu_count', '?')} CPU cores. Audit "
    + (
      "complete."
      if meta["complete"]
      else "**incomplete** (interrupted; run the same command again to resume)."
    ),
    "",
    "## Findings",
    "",
  ]
  lines += [f"* {f}" for f in findings]
  base = [
    r
    for r in rows
    if r["axis"] == "batch_size" and r["value"] == config.batch_size
  ]
  for r in base:
    if r["trials"]:
      lines.append(
        f"* At the deployment's own setting (FedSGD), {r['method']}: "
        f"{r['exact_batches']}/{r['trials']} batches recovered exactly, "
        f"{_fmt(r['median_seconds'])} s per batch on this machine."
      )
  lines += ["", "![exact recovery rate per axis](exact_rate.png)", ""]
  lines += ["![mean PSNR per axis](psnr.png)", ""]
  for axis in AXES:
    lines += _axis_table(config, axis, [r for r in rows if r["axis"] == axis])
  columns = (
    "Columns: exact batches (every sample exact), the Wilson 95% interval "
    "of that rate, batches also certified by the attack, share of samples "
    f"at PSNR >= {config.recognizable_psnr:g} dB, mean PSNR (100 = the "
    "cap, no visible error), label accuracy of the recovered samples (SPEAR "
    "and SPEAR++; the baseline is given the labels), median wall time per "
    "attacked batch (the first attack of each shape includes compilation)."
  )
  lines += [
    columns,
    "",
    "## Threat model and assumptions",
    "",
    _THREAT_MODEL,
  ]
  return "\n".join(lines)


def _axis_table(config, axis, axis_rows) -> list[str]:
  """The Markdown table of one axis."""
  if not axis_rows:
    return []
  extra = ""
  if axis == "noise_multiplier":
    extra = " | epsilon (one release, delta 1e-5)"
  if axis in ("batch_size", "width"):
    extra = " | SPEAR analytic estimate"
  header = (
    f"| {axis} | method | exact batches | exact rate [95% CI] | certified "
    f"| recognizable samples | mean PSNR dB | label accuracy | median s"
    f"{extra} |"
  )
  lines = [
    f"## Versus {_AXIS_TITLES[axis]}",
    "",
    header,
    "|---" * (9 + bool(extra)) + "|",
  ]
  for r in axis_rows:
    if r["skipped"]:
      blank = " |" * (6 + bool(extra))
      lines.append(
        f"| {r['value']:g} | {r['method']} | {r['skipped']} |{blank}"
      )
      continue
    low, high = r["exact_rate_ci95"]
    tail = ""
    if axis == "noise_multiplier":
      tail = f" | {r['dp_epsilon']:.3g}"
    elif axis in ("batch_size", "width"):
      estimate = r.get("analytic_estimate")
      tail = " | " + ("—" if estimate is None else f"{estimate:.3f}")
    lines.append(
      f"| {r['value']:g} | {r['method']} | {r['exact_batches']}/"
      f"{r['trials']} | {_fmt(r['exact_rate'], 2)} [{_fmt(low, 2)}, "
      f"{_fmt(high, 2)}] | {r['certified_batches']}/{r['trials']} | "
      f"{_fmt(100 * r['recognizable_sample_rate'], 0)}% | "
      f"{_fmt(r['mean_psnr'])} | {_fmt(r['label_accuracy'], 2)} | "
      f"{_fmt(r['median_seconds'])}{tail} |"
    )
  return lines + [""]


def _dodge(value, i, count, axis):
  shift = (i - (count - 1) / 2) * 0.04
  if axis == "noise_multiplier":
    return value * 10**shift
  return value * (1 + shift)


def _plot(rows, out_dir) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = []
  for name, ylabel in (
    ("exact_rate", "exact batch rate"),
    ("psnr", "mean PSNR, dB"),
  ):
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=100)
    for ax, axis in zip(axes.flat, AXES, strict=True):
      axis_rows = [r for r in rows if r["axis"] == axis and r["trials"]]
      methods = sorted({r["method"] for r in axis_rows})
      for i, method in enumerate(methods):
        series = sorted(
          (r for r in axis_rows if r["method"] == method),
          key=lambda r: r["value"],
        )
        # Methods side by side (else equal rates hide each other).
        x = [_dodge(r["value"], i, len(methods), axis) for r in series]
        if name == "exact_rate":
          y = [r["exact_rate"] for r in series]
          low = [r["exact_rate"] - r["exact_rate_ci95"][0] for r in series]
          high = [r["exact_rate_ci95"][1] - r["exact_rate"] for r in series]
          ax.errorbar(
            x,
            y,
            yerr=[low, high],
            marker="o",
            capsize=3,
            alpha=0.8,
            elinewidth=1,
            label=f"{method} (Wilson 95%)",
          )
          if method == "spear":
            est = [(r["value"], r.get("analytic_estimate")) for r in series]
            est = [(v, e) for v, e in est if e is not None]
            if est:
              ax.plot(*zip(*est), ls="--", color="gray", label="SPEAR estimate")
          ax.set_ylim(-0.05, 1.05)
        else:
          ax.plot(x, [r["mean_psnr"] for r in series], marker="o", label=method)
      if axis == "noise_multiplier":
        ax.set_xscale("log")
      ax.set_xlabel(_AXIS_TITLES[axis])
      ax.set_ylabel(ylabel)
      ax.grid(True, alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
      else:  # an axis left out of the grid
        ax.text(
          0.5, 0.5, "not in the grid", ha="center", transform=ax.transAxes
        )
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths


def write_report(
  out_dir: str | os.PathLike[str],
  config: AuditConfig,
  records: Sequence[Mapping[str, Any]],
  *,
  model_name: str,
  environment: Mapping[str, Any],
  complete: bool,
) -> dict[str, Any]:
  """Writes ``report.md``, ``report.json`` and the plots; returns the JSON."""
  out_dir = os.fspath(out_dir)
  rows, rate = _rows(config, records)
  findings = _findings(config, rows)
  meta = {
    "model": model_name,
    "environment": dict(environment),
    "complete": complete,
  }
  report = {
    "config": dataclasses.asdict(config),
    "model": model_name,
    "environment": dict(environment),
    "complete": complete,
    "attacks": len(records),
    "spear_proposals_per_s": rate,
    "findings": findings,
    "rows": rows,
    "written": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  plots = []
  try:
    plots = _plot(rows, out_dir)
  except ImportError:  # matplotlib is optional
    findings.append("(plots not drawn: pip install matplotlib)")
  report["plots"] = [os.path.basename(p) for p in plots]
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(_markdown(config, rows, findings, meta))
  report = _strict_json(report)
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, allow_nan=False)
  return report


def _strict_json(value):
  """NaN and infinities as ``None`` (strict JSON), tuples as lists."""
  if isinstance(value, Mapping):
    return {str(k): _strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict_json(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value
