r"""Benchmarks: a resumable sweep of attacks, and SPEAR's raw throughput.

``--mode=sweep`` (default) runs ``--trials`` attacks for every method x
objective x dataset x width ``m`` x batch size ``b``: a real batch, the
client MLP (``--depth`` hidden layers, PyTorch-style init, mean
cross-entropy), its FedSGD gradient, the inversion of the first layer and
the scores. Trial ``t`` of a given (dataset, m, b) is the same gradient for
every method, so methods are compared on identical problems. Each finished
trial is appended as one JSON line to ``--output``; a re-run skips the
trials already there, so an interrupted sweep resumes where it stopped.
At the end (and after an interruption) the whole log is summarized into
``PREFIX_summary.csv`` and the plots ``PREFIX_exact_rate.png`` and
``PREFIX_time.png`` (``PREFIX`` is ``--output`` without ``.jsonl``; plots
need matplotlib: ``pip install -e ".[plots]"``). Before the first trial of
each shape a warm-up attack on another gradient of that shape compiles
everything, so the recorded times are warm; the first call's time is
recorded next to them (the SPEAR warm-up stops after 5 s of attacking, the
SPEAR++ warm-up after two rounds, which compile the deflated search).

``--mode=cold_start`` times whole processes on the same gradients:
``scripts/invert.py`` with an empty compilation cache (cold), again with
the cache it filled (warm), and ``scripts/numpy_baseline.py --gradients``
(wall time, peak resident memory from GNU time, exit code).

``--mode=factorization`` times ``L R = weight_grad`` by the full SVD and
by the sketch (randomized range finder) on synthetic rank-``b`` gradients
of ``m x --n`` (warm, median of ``--repeats``, in one process so the ratio
is fair), and checks that both rebuild the gradient to 1e-12.

``--mode=big_layer`` is the bounded-memory check of a big input (offline,
synthetic): a rank-``b`` ReLU-layer gradient of ``m x --n`` (150528 for
ImageNet's 224x224x3) with its weight and bias is written to an npz, and
``scripts/invert.py`` inverts it as a separate process: wall time, peak
resident memory of the whole process (GNU time), exit code and the
largest relative error against the true inputs.

``--mode=throughput`` measures SPEAR alone: the jitted proposal block in
proposals/s (median and min over ``--repeats``), the same block in the
numpy baseline (``scripts/numpy_baseline.py``), and the time to a certified
recovery of both on the same gradients.

  python scripts/benchmark.py --methods=spear,spearpp --bs=8,16,24,50 \
      --ms=200,1000 --trials=5 --output=docs/benchmarks/sweep.jsonl
  python scripts/benchmark.py --methods=spearpp --objectives=l1,logcosh,l4 \
      --bs=50 --ms=1000
  OPENBLAS_NUM_THREADS=1 python scripts/benchmark.py --mode=throughput \
      --bs=16 --baseline
  python scripts/benchmark.py --mode=cold_start --ms=400 --bs=16,20 \
      --trials=3 --output=docs/benchmarks/cold_start.jsonl
"""

import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any
import zlib

import _runtime  # before jax: one device per core, compilation cache
from absl import app
from absl import flags
from absl import logging

# The varied evaluation set (issue 12): natural photographs, four kinds of
# near-duplicate-heavy batches (shifted frames, overlapping crops,
# washed-out photographs, faces) and digits. Mostly-dark images are kept
# apart (``cifar_like_dark``): most of their samples are not identifiable.
VARIED = (
  "cifar_like",
  "cifar_like_shifted",
  "cifar_like_crops",
  "cifar_like_lowcontrast",
  "faces",
  "digits",
)

_MODE = flags.DEFINE_enum(
  "mode",
  "sweep",
  [
    "sweep",
    "throughput",
    "cold_start",
    "factorization",
    "big_layer",
    "frontier",
  ],
  "A resumable sweep of attacks, or SPEAR's raw "
  "proposal throughput against the numpy baseline.",
)
_DATASETS = flags.DEFINE_list(
  "datasets",
  ["cifar_like"],
  "Image sets (bundled or tensorflow-datasets); 'varied' stands for the "
  "varied evaluation set: " + ", ".join(VARIED) + " (digits, n = 64, only "
  "where b <= 64).",
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "tensorflow-datasets data directory."
)
_DEPTH = flags.DEFINE_integer("depth", 2, "Hidden layers of the client MLP.")
_NEXT_LAYER_GRAD = flags.DEFINE_boolean(
  "next_layer_grad",
  False,
  "FedSGD: also give the attack the next dense layer's weight gradient "
  "(spear_jax.invert's next_weight_grad; the server receives it anyway), "
  "which makes each found sample's input exact on its own.",
)
_WARMUP = flags.DEFINE_boolean(
  "warmup", True, "Compile with one untimed attack per shape first."
)
_BS = flags.DEFINE_list("bs", ["12", "16"], "Batch sizes b.")
_DTYPES = flags.DEFINE_list(
  "dtypes",
  ["float64"],
  "Dtypes of the sweep's attacks: float64, float32 (for accelerators; "
  "exactness is judged at float32's own tolerance).",
)
flags.register_validator(
  "dtypes",
  lambda v: set(v) <= {"float64", "float32"},
  "--dtypes takes float64 and/or float32.",
)
_METHODS = flags.DEFINE_list(
  "methods", ["spear"], "Attack methods to time: spear and/or spearpp."
)
_OBJECTIVES = flags.DEFINE_list(
  "objectives", ["l1"], "SPEAR++ dictionary-learning objectives to compare."
)
_MS = flags.DEFINE_list("ms", ["400"], "Widths m of the attacked layer.")
_CLIENTS = flags.DEFINE_list(
  "clients",
  ["fedsgd"],
  "Client modes of the sweep: fedsgd, dpsgd/SIGMA (C=1) or "
  "fedavg/E/B/LR (E local epochs of mini-batches of B at SGD rate LR).",
)
_MODELS = flags.DEFINE_list(
  "models",
  ["mlp"],
  "Client models of the sweep: mlp (--depth Dense-ReLU layers of m) and/or "
  "cnn (spear_jax.fl.CNN: its dense layer of m follows two convolutions).",
)
flags.register_validator(
  "models", lambda v: set(v) <= {"mlp", "cnn"}, "--models takes mlp, cnn."
)
_LAYERS = flags.DEFINE_list(
  "layers",
  ["0"],
  "Attacked hidden layers of the MLP (0: the first, which sees the images; "
  "k > 0: its inputs are layer k-1's ReLU features). The CNN has one.",
)
_LEARNER = flags.DEFINE_list(
  "learner",
  [],
  "SPEAR++ settings to override, as NAME=VALUE of spear_jax.LearnerConfig "
  "(e.g. pivot_twins=7); part of each trial's identity, so a sweep with "
  "other overrides in the same --output runs its own trials.",
)
_TRIALS = flags.DEFINE_integer("trials", 3, "Gradients per (dataset, m, b).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats of block timings.")
_BASELINE = flags.DEFINE_boolean(
  "baseline", True, "Also run the numpy baseline on the same gradients."
)
_BASELINE_MAX_B = flags.DEFINE_integer(
  "baseline_max_b", 16, "Skip the (slow) numpy baseline above this b."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the problems and samplers.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 8192, "Proposals per block.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 64, "Proposals per vmap.")
_TIME_BUDGET_S = flags.DEFINE_float(
  "time_budget_s", 600.0, "Per-inversion wall-time budget."
)
_N = flags.DEFINE_integer(
  "n", 3072, "Input size of --mode=factorization (150528: ImageNet)."
)
_OUTPUT = flags.DEFINE_string(
  "output", "benchmark.jsonl", "JSON-lines log to append to (and resume)."
)


def _problem(key, m, b, dtype):
  """A client update (FedSGD gradient) of real images (`ClientUpdate`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from spear_jax import _client  # pylint: disable=g-import-not-at-top
  from spear_jax import _data  # pylint: disable=g-import-not-at-top

  data_key, model_key, label_key = jax.random.split(key, 3)
  images = _data.load_bundled("cifar_like")
  seed = int(jax.random.randint(data_key, (), 0, 2**31 - 1))
  x, _ = _data.sample_batch(seed, images, b)
  x = jnp.asarray(x, dtype)
  model = _client.MLP(widths=(m, m), num_classes=10)
  params = _client.init_mlp(model_key, model, x.shape[1], dtype)
  labels = jax.random.randint(label_key, (b,), 0, 10)
  return _client.client_update(params, model, x, labels)


def _max_error(recovered, truth):
  import numpy as np  # pylint: disable=g-import-not-at-top

  from spear_jax import _metrics  # pylint: disable=g-import-not-at-top

  scores = _metrics.match_and_score(np.asarray(recovered), np.asarray(truth))
  return float(np.max(scores["max_abs_error"])), int(scores["exact"].sum())


def _time_block(fn, repeats):
  import jax  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  jax.block_until_ready(fn(0))
  compile_s = time.perf_counter() - start
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(i + 1))
    times.append(time.perf_counter() - start)
  return compile_s, times


def _throughput(config, emit):
  """SPEAR proposal blocks and inversions, JAX against the numpy baseline."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import spear_jax  # pylint: disable=g-import-not-at-top
  from spear_jax import _linalg  # pylint: disable=g-import-not-at-top
  from spear_jax import _proposals  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import numpy_baseline  # pylint: disable=g-import-not-at-top

  root = jax.random.key(_SEED.value)
  for m in map(int, _MS.value):
    for b in map(int, _BS.value):
      shape_key = jax.random.fold_in(jax.random.fold_in(root, m), b)
      # Warm-up on a problem of the same shape: compiles everything.
      warm = _problem(jax.random.fold_in(shape_key, 10_000), m, b, jnp.float64)
      start = time.perf_counter()
      spear_jax.invert(
        warm.weight_grad,
        warm.bias_grad,
        key=jax.random.key(0),
        weight=warm.weight,
        bias=warm.bias,
        config=config,
      )
      first_call_s = time.perf_counter() - start

      # Throughput of the vmapped proposal stage alone.
      tol = _linalg.resolve_tolerances(config, jnp.float64, m, 3072)
      l_mxb, _, _, _ = spear_jax.attack.factorize(
        warm.weight_grad, b, tol.rank_rtol
      )
      alive = jnp.ones((m,), bool)
      rows = jnp.arange(m, dtype=jnp.int32)

      devices = _proposals._devices(config)  # pylint: disable=protected-access
      screen = _proposals._screen_block_fn(  # pylint: disable=protected-access
        devices,
        config.block_size,
        config.chunk_size,
        config.max_candidates_per_block,
      )

      args = (
        l_mxb,
        rows,
        alive,
        jnp.asarray(m),
        jnp.asarray(tol.screen),
        jnp.asarray(b + 10),
      )
      count = len(devices)

      def jax_block(i, screen=screen, args=args, count=count):
        return screen(jax.random.split(jax.random.key(i), count), *args)

      compile_s, times = _time_block(jax_block, _REPEATS.value)
      emit(
        {
          "kind": "proposal_block",
          "impl": "jax",
          "m": m,
          "b": b,
          "num_devices": len(devices),
          "block_size": config.block_size,
          "compile_s": compile_s,
          "median_s": statistics.median(times),
          "min_s": min(times),
          "proposals_per_s": config.block_size / statistics.median(times),
        }
      )
      if _BASELINE.value and b <= _BASELINE_MAX_B.value:
        l_np = np.asarray(l_mxb)
        rng = np.random.default_rng(0)
        np_times = []
        for _ in range(_REPEATS.value):
          start = time.perf_counter()
          numpy_baseline._propose(  # pylint: disable=protected-access
            rng, l_np, m, b, config.block_size, tol.screen
          )
          np_times.append(time.perf_counter() - start)
        emit(
          {
            "kind": "proposal_block",
            "impl": "numpy",
            "m": m,
            "b": b,
            "block_size": config.block_size,
            "median_s": statistics.median(np_times),
            "min_s": min(np_times),
            "proposals_per_s": config.block_size / statistics.median(np_times),
          }
        )

      for trial in range(_TRIALS.value):
        update = _problem(
          jax.random.fold_in(shape_key, trial), m, b, jnp.float64
        )
        start = time.perf_counter()
        result = spear_jax.invert(
          update.weight_grad,
          update.bias_grad,
          key=jax.random.key(trial),
          weight=update.weight,
          bias=update.bias,
          config=config,
        )
        jax.block_until_ready(result.inputs)
        seconds = time.perf_counter() - start
        max_err, exact = _max_error(result.inputs, update.inputs)
        record = {
          "kind": "inversion",
          "m": m,
          "b": b,
          "trial": trial,
          "jax_s": seconds,
          "jax_first_call_s": first_call_s,
          "jax_proposals": result.stats.proposals,
          "jax_success": bool(result.success),
          "jax_stop_reason": result.stats.stop_reason,
          "jax_max_abs_error": max_err,
          "jax_exact": exact,
          "tau": result.stats.tau,
        }
        if _BASELINE.value and b <= _BASELINE_MAX_B.value:
          out = numpy_baseline.invert_numpy(
            np.asarray(update.weight_grad),
            np.asarray(update.bias_grad),
            seed=trial,
            weight=np.asarray(update.weight),
            bias=np.asarray(update.bias),
            block_size=config.block_size,
            time_budget_s=_TIME_BUDGET_S.value,
          )
          np_err, np_exact = _max_error(out["inputs"], update.inputs)
          record.update(
            {
              "numpy_s": out["seconds"],
              "numpy_proposals": out["proposals"],
              "numpy_success": bool(out["success"]),
              "numpy_max_abs_error": np_err,
              "numpy_exact": np_exact,
              "time_ratio_numpy_over_jax": out["seconds"] / seconds,
              "per_proposal_ratio": (out["seconds"] / out["proposals"])
              / (seconds / result.stats.proposals),
            }
          )
        emit(record)


def _run_process(argv):
  """Runs a whole process: (wall seconds, peak RSS in MB, exit code, stdout).

  The peak resident memory comes from GNU time when it is installed
  (``/usr/bin/time -f %M``); ``getrusage`` of a child forked from this
  (large) process would also count the parent's pages before ``exec``.
  Without GNU time the peak is reported as NaN.
  """
  import math  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  gnu_time = "/usr/bin/time"
  with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
    if os.path.exists(gnu_time):
      argv = [gnu_time, "-f", "%M", "-o", rss.name, *argv]
    start = time.perf_counter()
    proc = subprocess.run(
      argv,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
      check=False,
    )
    seconds = time.perf_counter() - start
    text = rss.read().strip().splitlines()
  peak_mb = int(text[-1]) / 1024.0 if text else math.nan
  return seconds, peak_mb, proc.returncode, proc.stdout


def _cold_start(emit):
  """Whole-process times of scripts/invert.py, cold and warm, against numpy.

  For every (m, b) and trial: a real-image client gradient is written to an
  npz; then, each as a separate process, ``invert.py`` with an empty
  compilation cache (cold), ``invert.py`` again with the cache it just
  filled (warm), and ``numpy_baseline.py --gradients`` (the plain numpy
  SPEAR) on the same file. Wall time includes interpreter start, imports,
  compilation (or cache loading) and the attack.
  """
  import tempfile  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  here = os.path.dirname(os.path.abspath(__file__))
  root = jax.random.key(_SEED.value)
  for m in map(int, _MS.value):
    for b in map(int, _BS.value):
      for trial in range(_TRIALS.value):
        key = jax.random.fold_in(jax.random.fold_in(root, m * 1000 + b), trial)
        update = _problem(key, m, b, np.float64)
        with tempfile.TemporaryDirectory() as tmp:
          grads = os.path.join(tmp, "grads.npz")
          np.savez(
            grads,
            **{
              k: np.asarray(getattr(update, k))
              for k in ("weight_grad", "bias_grad", "weight", "bias")
            },
          )
          invert = [
            sys.executable,
            os.path.join(here, "invert.py"),
            f"--gradients={grads}",
            f"--output={tmp}/out.npz",
            f"--compilation_cache_dir={tmp}/cache",
            f"--seed={trial}",
          ]
          runs = {
            "cold": invert,
            "warm": invert,
            "numpy": [
              sys.executable,
              os.path.join(here, "numpy_baseline.py"),
              f"--gradients={grads}",
              f"--seed={trial}",
            ],
          }
          record = {"kind": "cold_start", "m": m, "b": b, "trial": trial}
          for name, argv in runs.items():
            seconds, rss_mb, code, stdout = _run_process(argv)
            summary = json.loads(stdout.strip().splitlines()[-1])
            record.update(
              {
                f"{name}_s": seconds,
                f"{name}_peak_rss_mb": rss_mb,
                f"{name}_exit": code,
                f"{name}_attack_s": summary["seconds"],
                f"{name}_proposals": summary["proposals"],
              }
            )
          record["warm_over_numpy"] = record["warm_s"] / record["numpy_s"]
          record["cold_over_numpy"] = record["cold_s"] / record["numpy_s"]
          emit(record)


def _environment():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  return {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "jax": jax.__version__,
    "numpy": np.__version__,
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
    "jax_devices": len(jax.local_devices()),
    "matmul_precision": "highest",
  }


def _models():
  """Every (model, layer) of the sweep (the CNN's one dense layer)."""
  for model in _MODELS.value:
    for layer in [0] if model == "cnn" else map(int, _LAYERS.value):
      if not 0 <= layer < _DEPTH.value:
        raise ValueError(
          f"--layers: {layer} is not a hidden layer of --depth={_DEPTH.value}."
        )
      yield model, layer


def _settings():
  """Every (method, objective, dataset, m, b, client) of the sweep."""
  for method in _METHODS.value:
    objectives = _OBJECTIVES.value if method == "spearpp" else ["none"]
    for objective in objectives:
      datasets = [
        name
        for entry in _DATASETS.value
        for name in (VARIED if entry == "varied" else (entry,))
      ]
      for dataset in datasets:
        for m in map(int, _MS.value):
          for b in map(int, _BS.value):
            if dataset == "digits" and b > 64 and "varied" in _DATASETS.value:
              continue  # 8x8 digits: n = 64 < b, the gradient's rank
            for client in _CLIENTS.value:
              yield method, objective, dataset, m, b, client


def client_config(spec: str):
  """The :class:`spear_jax.fl.ClientConfig` of a ``--clients`` entry."""
  from spear_jax import fl  # pylint: disable=g-import-not-at-top

  try:
    return fl.parse_client_spec(spec)
  except ValueError as err:
    raise ValueError(f"--clients: {err}") from None


def learner_overrides(entries: list[str]) -> dict[str, Any]:
  """``--learner`` entries ``NAME=VALUE`` as typed ``LearnerConfig`` fields.

  Raises:
    ValueError: naming the entry (unknown field, bad value or no ``=``).
  """
  import dataclasses  # pylint: disable=g-import-not-at-top

  import spear_jax  # pylint: disable=g-import-not-at-top

  defaults = spear_jax.LearnerConfig()
  overrides = {}
  for entry in entries:
    name, sep, text = entry.partition("=")
    if not sep or not hasattr(defaults, name):
      raise ValueError(
        f"--learner: expected NAME=VALUE of a LearnerConfig "
        f"field, got {entry!r}."
      )
    default = getattr(defaults, name)
    try:
      if default is None:  # an optional count (restarts, rounding_pool)
        value = None if text.lower() == "none" else int(text)
      elif isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
          raise ValueError(text)
        value = text.lower() in ("true", "1")
      else:
        value = type(default)(text)
    except ValueError:
      raise ValueError(f"--learner: bad value in {entry!r}.") from None
    overrides[name] = value
  dataclasses.replace(defaults, **overrides)  # validates
  return overrides


def _plan(done):
  """The sweep's pending (setting, trial) tasks, in the sweep's order."""
  from spear_jax import _report  # pylint: disable=g-import-not-at-top

  learner_overrides(_LEARNER.value)  # fail early on a bad entry
  learner = ",".join(sorted(_LEARNER.value))
  tasks = []
  for (method, objective, dataset, m, b, client), (
    model,
    layer,
  ), dtype in itertools.product(_settings(), _models(), _DTYPES.value):
    client_config(client)  # fail early on a bad spec
    setting = {
      "client_spec": client,
      "method": method,
      "objective": objective,
      "dataset": dataset,
      "width": m,
      "batch_size": b,
      "depth": _DEPTH.value,
      "dtype": dtype,
      "seed": _SEED.value,
      "learner": learner,
      "model": model,
      "layer": layer,
      "next_layer_grad": _NEXT_LAYER_GRAD.value,
    }
    tasks += [
      (setting, t)
      for t in range(_TRIALS.value)
      if _report.trial_key({**setting, "trial": t}) not in done
    ]
  return tasks


def _trial_runner(config, env):
  """``run(setting, trial) -> record``: loads data and warms up once per
  setting (every process for its own trials)."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  import spear_jax  # pylint: disable=g-import-not-at-top
  from spear_jax import _experiment  # pylint: disable=g-import-not-at-top

  image_sets, first_call = {}, {}
  root = jax.random.key(_SEED.value)

  def run(setting, trial):
    name = setting["dataset"]
    if name not in image_sets:
      image_sets[name] = spear_jax.data.load_dataset(
        name, data_dir=_DATA_DIR.value
      )
    objective = setting["objective"]
    learner = spear_jax.LearnerConfig(
      objective="l1" if objective == "none" else objective,
      **learner_overrides(
        setting["learner"].split(",") if setting["learner"] else []
      ),
    )
    cfg = dataclasses.replace(config, learner=learner)
    # Problems depend on (dataset, m, b, trial) only: every method and
    # objective attacks the same gradients.
    shape_key = jax.random.fold_in(root, zlib.crc32(name.encode()))
    shape_key = jax.random.fold_in(shape_key, setting["width"])
    shape_key = jax.random.fold_in(shape_key, setting["batch_size"])
    kwargs = {
      "batch_size": setting["batch_size"],
      "width": setting["width"],
      "depth": setting["depth"],
      "method": setting["method"],
      "dtype": jnp.dtype(setting["dtype"]),
      "config": cfg,
      "client": client_config(setting["client_spec"]),
      "model": setting["model"],
      "layer": setting["layer"],
      "next_layer_grad": setting["next_layer_grad"],
    }
    setting_id = json.dumps(setting, sort_keys=True)
    if _WARMUP.value and setting_id not in first_call:
      # Compiles everything; a short budget keeps a hopeless setting
      # from costing a full extra attack. SPEAR++ runs two rounds (the
      # second compiles the deflated search) with no time budget.
      if setting["method"] == "spear":
        warm_cfg = dataclasses.replace(cfg, time_budget_s=5.0)
      else:
        warm_cfg = dataclasses.replace(
          cfg,
          time_budget_s=None,
          learner=dataclasses.replace(learner, max_rounds=2),
        )
      start = time.perf_counter()
      _experiment.run_trial(
        jax.random.fold_in(shape_key, 1_000_000),
        image_sets[name],
        **{**kwargs, "config": warm_cfg},
      )
      first_call[setting_id] = time.perf_counter() - start
    result = _experiment.run_trial(
      jax.random.fold_in(shape_key, trial), image_sets[name], **kwargs
    )
    if setting["next_layer_grad"]:
      # Each peel searches a batch of a new size: its compilations would
      # pile up over a sweep (5 GB after ten b = 150 trials).
      jax.clear_caches()
    if result["stats"]["stop_reason"] == "interrupted":
      raise KeyboardInterrupt
    return _experiment.trial_record(
      result,
      seed=setting["seed"],
      trial=trial,
      first_call_s=first_call.get(setting_id),
      client_spec=setting["client_spec"],
      learner=setting["learner"],
      kind="trial",
      # The process's peak so far (warm-up and earlier trials included).
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      **env,
    )

  return run


def _sweep(config, env):
  """Runs the pending trials of the sweep; returns True if interrupted.

  With several processes (``--coordinator_address``), process ``i`` of
  ``N`` runs the pending trials ``i, i + N, ...``, each attack on its own
  devices; after every wave of ``N`` trials the records are gathered and
  process 0 appends them to ``--output``, so the one merged log is
  resumable by any number of processes.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top

  from spear_jax import _report  # pylint: disable=g-import-not-at-top

  index, count = _runtime.process_share()
  done = {
    _report.trial_key(r)
    for r in _report.read_records(_runtime.shared_copy(_OUTPUT.value))
  }
  tasks = _plan(done)
  logging.info(
    "%d trials pending, %d already in %s", len(tasks), len(done), _OUTPUT.value
  )
  run = _trial_runner(dataclasses.replace(config, across_processes=False), env)
  progress = _report.ProgressBar(len(tasks), "trials")
  try:
    for wave in range(0, len(tasks), count):
      mine = tasks[wave : wave + count][index : index + 1]
      records = [run(*task) for task in mine]
      if count > 1:
        texts = _runtime.gather_strings(json.dumps(records))
        records = [r for text in texts for r in json.loads(text)]
      for record in records:
        if _runtime.is_writer():
          _report.append_record(_OUTPUT.value, record)
        progress.advance(
          1,
          f"{record['method']}/{record['objective']} "
          f"{record['client_spec']} {record['dataset']} "
          f"m={record['width']} b={record['batch_size']} "
          f"trial {record['trial']}: {record['exact_samples']}/"
          f"{record['batch_size']} exact, {record['seconds']:.1f} s",
        )
  except KeyboardInterrupt:
    progress.close()
    return True
  progress.close()
  return False


def _summarize(env):
  from spear_jax import _report  # pylint: disable=g-import-not-at-top

  rows = _report.summarize(_report.read_records(_OUTPUT.value))
  prefix = _OUTPUT.value
  prefix = prefix.removesuffix(".jsonl")
  _report.write_csv(f"{prefix}_summary.csv", rows)
  print(
    f"{'method':>8} {'obj':>7} {'client':>18} {'dataset':>10} {'m':>5} "
    f"{'b':>4} {'exact':>7} {'median s':>9} {'PSNR':>7} {'SSIM':>6} "
    f"{'twins':>5} {'ident':>7}"
  )
  for r in rows:
    print(
      f"{r['method']:>8} {r['objective']:>7} {r['client_spec']:>18} "
      f"{r['dataset']:>10} {r['width']:>5} {r['batch_size']:>4} "
      f"{r['exact_batches']:>3}/{r['trials']:<3} "
      f"{r['median_seconds']:>9.2f} {r['mean_psnr']:>7.1f} "
      f"{r['mean_ssim']:>6.3f} {r['near_duplicates_095']:>5.2f} "
      f"{r['identifiable_batches']:>3.0f}/{r['trials']:<3}"
    )
  written = [f"{prefix}_summary.csv"]
  try:
    written += _report.plot_summary(
      rows, prefix, title=f"{env['device_kind']}, {env['jax_devices']} dev"
    )
    written += _report.plot_clients(rows, prefix)
  except ImportError as err:
    logging.warning("%s; skipping the plots.", err)
  print("wrote " + ", ".join(written))


def _big_layer(emit):
  """invert.py on a synthetic big layer: time and peak memory of the process."""
  import tempfile  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  n = _N.value
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "invert.py")
  for method, m, b in itertools.product(
    _METHODS.value, map(int, _MS.value), map(int, _BS.value)
  ):
    with tempfile.TemporaryDirectory() as tmp:
      rng = np.random.default_rng(_SEED.value)
      x_nxb = (rng.random((n, b)) - 0.5) / 0.25  # standardized pixels
      weight = rng.standard_normal((m, n)) / np.sqrt(n)
      bias = 0.1 * rng.standard_normal(m)
      d = ((weight @ x_nxb + bias[:, None]) > 0) * rng.standard_normal((m, b))
      path, out = os.path.join(tmp, "layer.npz"), os.path.join(tmp, "out.npz")
      np.savez(
        path,
        weight_grad=d @ x_nxb.T,
        bias_grad=d.sum(1),
        weight=weight,
        bias=bias,
      )
      del weight, d
      seconds, peak_mb, code, _ = _run_process(
        [
          sys.executable,
          script,
          f"--gradients={path}",
          f"--output={out}",
          f"--method={method}",
        ]
        + (
          [f"--time_budget_s={_TIME_BUDGET_S.value}"]
          if _TIME_BUDGET_S.value
          else []
        )
      )
      error = float("nan")
      if os.path.exists(out):
        with np.load(out) as result:
          rec, truth = result["inputs"], x_nxb.T
        cos = np.abs(rec @ truth.T) / np.outer(
          np.linalg.norm(rec, axis=1), np.linalg.norm(truth, axis=1)
        )
        match = truth[np.argmax(cos, axis=1)]
        error = float(
          np.max(
            np.linalg.norm(rec - match, axis=1) / np.linalg.norm(match, axis=1)
          )
        )
    emit(
      {
        "kind": "big_layer",
        "method": method,
        "m": m,
        "n": n,
        "b": b,
        "seconds": seconds,
        "peak_rss_mb": peak_mb,
        "exit_code": code,
        "max_relative_error": error,
      }
    )


def _factorization(emit):
  """Full SVD against the sketch on the same synthetic gradients."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from spear_jax import _linalg  # pylint: disable=g-import-not-at-top

  n = _N.value
  for m in (int(v) for v in _MS.value):
    for b in (int(v) for v in _BS.value):
      rng = np.random.default_rng(_SEED.value)
      x = rng.standard_normal((b, n))
      d = (rng.random((m, b)) < 0.5) * rng.standard_normal((m, b))
      grad = jax.device_put(d @ x)
      rtol = 10 * max(m, n) * np.finfo(np.float64).eps
      record = {"kind": "factorization", "m": m, "n": n, "b": b}
      for method in ("svd", "sketch"):
        times = []
        for _ in range(_REPEATS.value + 1):  # the first compiles
          start = time.perf_counter()
          l, r, rank, _ = _linalg.factorize(grad, None, rtol, method)
          jax.block_until_ready((l, r))
          times.append(time.perf_counter() - start)
        error = float(np.abs(np.asarray(l @ r) - np.asarray(grad)).max())
        record[f"{method}_s"] = statistics.median(times[1:])
        record[f"{method}_first_s"] = times[0]
        record[f"{method}_rank"] = rank
        record[f"{method}_max_error"] = error / float(np.abs(d @ x).max())
      record["speedup"] = record["svd_s"] / record["sketch_s"]
      emit(record)


def _frontier(emit):
  """Truth-side identifiability margin of real gradients across m and b.

  No attack: for each (dataset, m, b, client, trial) of the sweep's
  gradients (a FedAvg update's ``D_eff`` under plain SGD), the
  zero counts of the columns of ``D`` over alive rows against the
  ``b - 1`` that pin a column down, and how many samples the layer
  identifies at all (``spear_jax.metrics.identifiable_samples``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import spear_jax  # pylint: disable=g-import-not-at-top
  from spear_jax import _experiment  # pylint: disable=g-import-not-at-top

  root = jax.random.key(_SEED.value)
  cells = dict.fromkeys(setting[2:] for setting in _settings())
  for dataset, m, b, client in cells:
    image_set = spear_jax.data.load_dataset(dataset, data_dir=_DATA_DIR.value)
    key = jax.random.fold_in(root, zlib.crc32(dataset.encode()))
    key = jax.random.fold_in(jax.random.fold_in(key, m), b)
    for trial in range(_TRIALS.value):
      keys = jax.random.split(jax.random.fold_in(key, trial), 4)
      inputs, labels = _experiment._sample(  # pylint: disable=protected-access
        keys, image_set, b, 10, jnp.float64
      )
      update, _ = _experiment._simulate(  # pylint: disable=protected-access
        "mlp",
        keys[1],
        image_set,
        inputs,
        labels,
        (m, _DEPTH.value, 0, 10),
        client_config(client),
      )
      d = np.asarray(update.grad_z)  # FedAvg: D_eff (plain SGD)
      alive = np.any(d != 0, axis=1)
      zeros = np.sum((d == 0) & alive[:, None], axis=0)
      identifiable = spear_jax.metrics.identifiable_samples(d)
      emit(
        {
          "mode": "frontier",
          "client_spec": client,
          "dataset": dataset,
          "width": m,
          "batch_size": b,
          "trial": trial,
          "alive_rows": int(alive.sum()),
          "min_zeros": int(zeros.min()),
          "median_zeros": float(np.median(zeros)),
          "needed_zeros": b - 1,
          "margin": float(np.median(zeros)) / max(b - 1, 1),
          "identifiable_samples": int(identifiable.sum()),
          **spear_jax.metrics.near_duplicates(np.asarray(update.inputs)),
        }
      )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

  _runtime.configure_jax(x64=True)
  import spear_jax  # pylint: disable=g-import-not-at-top

  env = _environment()
  logging.info("environment: %s", env)
  config = spear_jax.AttackConfig(
    block_size=_BLOCK_SIZE.value,
    chunk_size=_CHUNK_SIZE.value,
    time_budget_s=_TIME_BUDGET_S.value,
    log_every_s=30.0,
  )
  if _MODE.value in (
    "throughput",
    "cold_start",
    "factorization",
    "big_layer",
    "frontier",
  ):

    def emit(record):
      record = {**env, "dtype": "float64", **record}
      print(json.dumps(record), flush=True)
      if not _runtime.is_writer():
        return
      with open(_OUTPUT.value, "a") as f:
        f.write(json.dumps(record) + "\n")

    if _MODE.value == "throughput":
      _throughput(config, emit)
    elif _MODE.value == "factorization":
      _factorization(emit)
    elif _MODE.value == "big_layer":
      _big_layer(emit)
    elif _MODE.value == "frontier":
      _frontier(emit)
    else:
      _cold_start(emit)
    return
  try:
    interrupted = _sweep(config, env)
  except (ValueError, FileNotFoundError, ImportError) as err:
    print(f"benchmark.py: error: {str(err).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  if _runtime.is_writer():
    _summarize(env)
  if interrupted:
    print("interrupted; run the same command again to resume.", file=sys.stderr)
  _runtime.exit_all(1 if interrupted else 0)


if __name__ == "__main__":
  app.run(main, flags_parser=_runtime.flags_parser("benchmark.py"))
