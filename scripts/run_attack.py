r"""End-to-end SPEAR attack on real images shipped with the package.

With no flags: a batch of 16 natural-image patches (32x32x3) goes through a
2-hidden-layer ReLU MLP of width 400 (PyTorch-style init); the client's
FedSGD gradient of the first layer is inverted and every reconstruction is
compared with its original and certified by the ReLU pattern.

  python scripts/run_attack.py
  python scripts/run_attack.py --batch_size=20 --width=1000 --out_dir=/tmp/run
"""

import json
import os
import sys

import _cpu_devices  # noqa: F401  (before jax: one device per core)
from absl import app
from absl import flags
from absl import logging

_DATASET = flags.DEFINE_enum(
  "dataset", "cifar_like", ["cifar_like", "faces", "digits"],
  "Bundled real image set (offline).",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Client batch size b.")
_WIDTH = flags.DEFINE_integer("width", 400, "Hidden width m.")
_DEPTH = flags.DEFINE_integer("depth", 2, "Number of hidden layers.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the experiment.")
_DTYPE = flags.DEFINE_enum("dtype", "float64", ["float64", "float32"],
                           "Computation dtype.")
_TIME_BUDGET_S = flags.DEFINE_float("time_budget_s", None,
                                    "Wall-time budget of the sampler.")
_OUT_DIR = flags.DEFINE_string("out_dir", None,
                               "If set, write metrics.json there.")


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    print(f"run_attack.py: error: {str(err).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_enable_x64", _DTYPE.value == "float64")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import spear_jax  # pylint: disable=g-import-not-at-top
  from spear_jax import _experiment  # pylint: disable=g-import-not-at-top

  logging.info("devices: %s", jax.devices())
  config = spear_jax.AttackConfig(time_budget_s=_TIME_BUDGET_S.value)
  try:
    trial = _experiment.run_trial(
      jax.random.key(_SEED.value),
      dataset=_DATASET.value,
      batch_size=_BATCH_SIZE.value,
      width=_WIDTH.value,
      depth=_DEPTH.value,
      dtype=jnp.dtype(_DTYPE.value),
      config=config,
    )
  except ValueError as err:
    print(f"run_attack.py: error: {err}", file=sys.stderr)
    sys.exit(2)
  stats = trial["stats"]
  print(f"SPEAR on {trial['batch_size']} {trial['dataset']} images, "
        f"width {trial['width']}, depth {trial['depth']}, {trial['dtype']}")
  print(f"{'sample':>6} {'rel. L2 error':>14} {'max abs error':>14} "
        f"{'verified':>9}")
  for i, (rel, mx, ok) in enumerate(zip(trial["relative_error"],
                                        trial["max_abs_error"],
                                        trial["verified"])):
    print(f"{i:>6} {rel:>14.3e} {mx:>14.3e} {str(ok):>9}")
  print(f"exact samples: {sum(trial['exact'])}/{trial['batch_size']}, "
        f"certified: {sum(trial['verified'])}/{trial['batch_size']}, "
        f"{stats['proposals']} proposals, {trial['seconds']:.1f} s "
        f"({stats['stop_reason']})")
  summary = {k: v for k, v in trial.items() if k != "arrays"}
  if _OUT_DIR.value:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUT_DIR.value, "metrics.json"), "w") as f:
      json.dump(summary, f, indent=2)
  print(json.dumps({"success": trial["success"],
                    "exact": sum(trial["exact"]),
                    "batch_size": trial["batch_size"],
                    "seconds": round(trial["seconds"], 2)}))
  sys.exit(0 if trial["success"] else 1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
