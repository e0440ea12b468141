r"""Benchmarks SPEAR: proposals/s and time to a certified recovery vs b, m.

For every width ``m`` and batch size ``b`` it builds ``--trials`` client
gradients from the bundled 32x32x3 natural-image patches (2-hidden-layer
ReLU MLP, PyTorch-style init, mean cross-entropy, attacked first layer),
then measures

* the jitted proposal block (compiled once, untimed; median and min over
  ``--repeats`` with ``block_until_ready``), in proposals/s, and the same
  block of the numpy baseline;
* the wall time of ``spear_jax.invert`` to a certified recovery (after a
  warm-up call on another problem of the same shape, so compile time is
  reported separately), and of the vectorised numpy baseline
  (``scripts/numpy_baseline.py``) on the same gradient.

One JSON line per measurement is appended to ``--output`` with the device
kind, JAX version, dtype and matmul precision.

  python scripts/benchmark.py --bs=12,16,20 --ms=400 --trials=3
  OPENBLAS_NUM_THREADS=1 python scripts/benchmark.py --bs=16 --baseline
"""

import json
import os
import platform
import statistics
import sys
import time

import _cpu_devices  # noqa: F401  (before jax: one device per core)
from absl import app
from absl import flags
from absl import logging

_BS = flags.DEFINE_list("bs", ["12", "16"], "Batch sizes b.")
_METHODS = flags.DEFINE_list(
  "methods", ["spear"], "Attack methods to time: spear and/or spearpp."
)
_OBJECTIVES = flags.DEFINE_list(
  "objectives", ["l1"], "SPEAR++ dictionary-learning objectives to compare."
)
_MS = flags.DEFINE_list("ms", ["400"], "Widths m of the attacked layer.")
_TRIALS = flags.DEFINE_integer("trials", 3, "Gradients per (m, b).")
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
_TIME_BUDGET_S = flags.DEFINE_float("time_budget_s", 600.0,
                                    "Per-inversion wall-time budget.")
_OUTPUT = flags.DEFINE_string("output", "benchmark.jsonl",
                              "JSON-lines file to append to.")


def _problem(key, m, b, dtype):
  """A client gradient of real images: (update, truth)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spear_jax import _client, _data  # pylint: disable=g-import-not-at-top

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


def _spearpp_sweep(root, config, emit):
  """SPEAR++ time to certified recovery per objective (warm-up first)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import spear_jax  # pylint: disable=g-import-not-at-top

  for m in map(int, _MS.value):
    for b in map(int, _BS.value):
      shape_key = jax.random.fold_in(jax.random.fold_in(root, m), b)
      for objective in _OBJECTIVES.value:
        cfg = dataclasses.replace(
          config, learner=spear_jax.LearnerConfig(objective=objective))
        warm = _problem(jax.random.fold_in(shape_key, 10_000), m, b,
                        jnp.float64)
        start = time.perf_counter()
        spear_jax.invert(warm.weight_grad, warm.bias_grad,
                         key=jax.random.key(0), method="spearpp",
                         weight=warm.weight, bias=warm.bias, config=cfg)
        first_call_s = time.perf_counter() - start
        for trial in range(_TRIALS.value):
          update = _problem(jax.random.fold_in(shape_key, trial), m, b,
                            jnp.float64)
          start = time.perf_counter()
          result = spear_jax.invert(
            update.weight_grad, update.bias_grad, key=jax.random.key(trial),
            method="spearpp", weight=update.weight, bias=update.bias,
            config=cfg,
          )
          seconds = time.perf_counter() - start
          max_err, exact = _max_error(result.inputs, update.inputs)
          emit({
            "kind": "inversion", "method": "spearpp", "objective": objective,
            "m": m, "b": b, "trial": trial, "seconds": seconds,
            "first_call_s": first_call_s, "rounds": result.stats.blocks,
            "kernels": result.stats.proposals,
            "found": result.stats.candidates,
            "success": bool(result.success),
            "stop_reason": result.stats.stop_reason,
            "verified": int(jnp.sum(result.verified)),
            "max_abs_error": max_err, "exact": exact,
          })


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import spear_jax  # pylint: disable=g-import-not-at-top
  from spear_jax import _attack  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import numpy_baseline  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  env = {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "jax": jax.__version__,
    "numpy": np.__version__,
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
    "jax_devices": len(jax.local_devices()),
    "dtype": "float64",
    "matmul_precision": "highest",
  }
  logging.info("environment: %s", env)
  config = spear_jax.AttackConfig(
    block_size=_BLOCK_SIZE.value, chunk_size=_CHUNK_SIZE.value,
    time_budget_s=_TIME_BUDGET_S.value, log_every_s=30.0,
  )

  def emit(record):
    record = {**env, **record}
    print(json.dumps(record), flush=True)
    with open(_OUTPUT.value, "a") as f:
      f.write(json.dumps(record) + "\n")

  root = jax.random.key(_SEED.value)
  if "spearpp" in _METHODS.value:
    _spearpp_sweep(root, config, emit)
  if "spear" not in _METHODS.value:
    return
  for m in map(int, _MS.value):
    for b in map(int, _BS.value):
      shape_key = jax.random.fold_in(jax.random.fold_in(root, m), b)
      # Warm-up on a problem of the same shape: compiles everything.
      warm = _problem(jax.random.fold_in(shape_key, 10_000), m, b,
                      jnp.float64)
      start = time.perf_counter()
      spear_jax.invert(warm.weight_grad, warm.bias_grad,
                       key=jax.random.key(0), weight=warm.weight,
                       bias=warm.bias, config=config)
      first_call_s = time.perf_counter() - start

      # Throughput of the vmapped proposal stage alone.
      tol = spear_jax.resolve_tolerances(config, jnp.float64, m, 3072)
      l_mxb, _, _, _ = spear_jax.factorize(warm.weight_grad, b,
                                           tol.rank_rtol)
      alive = jnp.ones((m,), bool)
      rows = jnp.arange(m, dtype=jnp.int32)

      devices = _attack._devices(config)  # pylint: disable=protected-access
      screen = _attack._screen_block_fn(  # pylint: disable=protected-access
        devices, config.block_size, config.chunk_size,
        config.max_candidates_per_block,
      )

      def jax_block(i, l_mxb=l_mxb, alive=alive, rows=rows, screen=screen):
        return screen(
          jax.random.split(jax.random.key(i), len(devices)), l_mxb, rows,
          alive, jnp.asarray(m),
          jnp.asarray(tol.screen), jnp.asarray(b + 10),
        )

      compile_s, times = _time_block(jax_block, _REPEATS.value)
      emit({
        "kind": "proposal_block", "impl": "jax", "m": m, "b": b,
        "num_devices": len(devices),
        "block_size": config.block_size, "compile_s": compile_s,
        "median_s": statistics.median(times), "min_s": min(times),
        "proposals_per_s": config.block_size / statistics.median(times),
      })
      if _BASELINE.value and b <= _BASELINE_MAX_B.value:
        l_np = np.asarray(l_mxb)
        rng = np.random.default_rng(0)
        np_times = []
        for _ in range(_REPEATS.value):
          start = time.perf_counter()
          numpy_baseline._propose(  # pylint: disable=protected-access
            rng, l_np, m, b, config.block_size, tol.screen)
          np_times.append(time.perf_counter() - start)
        emit({
          "kind": "proposal_block", "impl": "numpy", "m": m, "b": b,
          "block_size": config.block_size,
          "median_s": statistics.median(np_times), "min_s": min(np_times),
          "proposals_per_s": config.block_size / statistics.median(np_times),
        })

      for trial in range(_TRIALS.value):
        update = _problem(jax.random.fold_in(shape_key, trial), m, b,
                          jnp.float64)
        start = time.perf_counter()
        result = spear_jax.invert(
          update.weight_grad, update.bias_grad,
          key=jax.random.key(trial), weight=update.weight,
          bias=update.bias, config=config,
        )
        jax.block_until_ready(result.inputs)
        seconds = time.perf_counter() - start
        max_err, exact = _max_error(result.inputs, update.inputs)
        record = {
          "kind": "inversion", "m": m, "b": b, "trial": trial,
          "jax_s": seconds, "jax_first_call_s": first_call_s,
          "jax_proposals": result.stats.proposals,
          "jax_success": bool(result.success),
          "jax_stop_reason": result.stats.stop_reason,
          "jax_max_abs_error": max_err, "jax_exact": exact,
          "tau": result.stats.tau,
        }
        if _BASELINE.value and b <= _BASELINE_MAX_B.value:
          out = numpy_baseline.invert_numpy(
            np.asarray(update.weight_grad), np.asarray(update.bias_grad),
            seed=trial, weight=np.asarray(update.weight),
            bias=np.asarray(update.bias), block_size=config.block_size,
            time_budget_s=_TIME_BUDGET_S.value,
          )
          np_err, np_exact = _max_error(out["inputs"], update.inputs)
          record.update({
            "numpy_s": out["seconds"], "numpy_proposals": out["proposals"],
            "numpy_success": bool(out["success"]),
            "numpy_max_abs_error": np_err, "numpy_exact": np_exact,
            "time_ratio_numpy_over_jax": out["seconds"] / seconds,
            "per_proposal_ratio": (out["seconds"] / out["proposals"])
            / (seconds / result.stats.proposals),
          })
        emit(record)


if __name__ == "__main__":
  app.run(main)
