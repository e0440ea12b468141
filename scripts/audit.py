r"""Does my deployment leak? A measured privacy audit of client updates.

Attacks simulated clients of a deployment on real images with SPEAR,
SPEAR++ and a gradient-matching baseline ("Inverting Gradients"), varying
one setting at a time around the deployment's own: the batch size, the
width of the attacked layer, DP-SGD's noise multiplier and FedAvg's local
steps. Writes under ``--out_dir``:

* ``report.md``: findings, one table per axis (exact-batch rate with its
  Wilson 95% interval, certified batches, recognizable samples, PSNR,
  label accuracy, time per batch, SPEAR's analytic estimate, epsilon),
  the threat model and every assumption;
* ``report.json``: the same numbers; ``exact_rate.png`` and ``psnr.png``;
* ``trials.jsonl``: one record per finished attack. Re-running the same
  command resumes: finished attacks are read back, not recomputed.

The default (bundled natural images, an MLP of width 400, b = 8, 3 batches
per setting) finishes on a 2-core CPU in under 15 minutes.

Exit code 0 when the report is complete, 1 when interrupted (run the same
command again to resume), 2 for bad flags.

  python scripts/audit.py --out_dir=runs/audit
  python scripts/audit.py --out_dir=runs/audit_cnn --model=cnn \
      --batch_sizes=4,8 --widths=200,400 --trials=5
  python scripts/audit.py --out_dir=runs/audit_dp --noise_multipliers=0.01,0.1,1
"""

import os
import sys

import _runtime  # before jax: one device per core, compilation cache
from absl import app
from absl import flags

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the report goes.")
_DATASET = flags.DEFINE_string(
  "dataset", "cifar_like", "Image set (bundled, or tfds under --data_dir)."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory.")
_MODEL = flags.DEFINE_enum(
  "model", "mlp", ["mlp", "cnn"], "Client model: the MLP or the flax CNN."
)
_DEPTH = flags.DEFINE_integer("depth", 2, "Hidden layers of the MLP.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", 8, "The deployment's client batch size."
)
_WIDTH = flags.DEFINE_integer(
  "width", 400, "The deployment's width of the attacked layer."
)
_BATCH_SIZES = flags.DEFINE_list(
  "batch_sizes", ["4", "8", "16", "32"], "Batch sizes of the b axis."
)
_WIDTHS = flags.DEFINE_list("widths", ["100", "400", "1000"], "Widths m.")
_NOISE_MULTIPLIERS = flags.DEFINE_list(
  "noise_multipliers",
  ["1e-4", "1e-3", "1e-2", "0.1"],
  "DP-SGD noise multipliers sigma (empty: no DP axis).",
)
_LOCAL_STEPS = flags.DEFINE_list(
  "local_steps", ["1", "2", "4"], "FedAvg local steps (empty: no axis)."
)
_LOCAL_LR = flags.DEFINE_float("local_lr", 0.01, "FedAvg SGD learning rate.")
_CLIP_NORM = flags.DEFINE_float("clip_norm", 1.0, "DP-SGD clipping norm C.")
_METHODS = flags.DEFINE_list(
  "methods", ["spear", "spearpp", "baseline"], "Attacks to run."
)
_SPEAR_MAX_B = flags.DEFINE_integer(
  "spear_max_batch_size", 16, "SPEAR (exponential in b) only up to this b."
)
_TRIALS = flags.DEFINE_integer("trials", 3, "Client batches per setting.")
_TIME_BUDGET_S = flags.DEFINE_float(
  "time_budget_s", 60.0, "Budget of each SPEAR / SPEAR++ attack (s)."
)
_BASELINE_STEPS = flags.DEFINE_integer(
  "baseline_steps", 200, "Adam steps of the gradient-matching baseline."
)
_BASELINE_RESTARTS = flags.DEFINE_integer(
  "baseline_restarts", 2, "Restarts of the baseline."
)
_RECOGNIZABLE_PSNR = flags.DEFINE_float(
  "recognizable_psnr", 25.0, "A sample at this PSNR (dB) or above leaked."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of batches, models, attacks.")
_RESUME = flags.DEFINE_boolean(
  "resume", True, "Reuse the attacks already finished in --out_dir."
)

flags.mark_flags_as_required(["out_dir"])

_PROG = "audit.py"


def _fail(message: str) -> None:
  _runtime.fail(_PROG, message)


def _numbers(flag, kind):
  try:
    return tuple(kind(v) for v in flag.value)
  except ValueError:
    _fail(f"--{flag.name} must be a list of numbers, got {flag.value}.")


def _config():
  from spear_jax import attack  # pylint: disable=g-import-not-at-top
  from spear_jax import audit  # pylint: disable=g-import-not-at-top

  try:
    return audit.AuditConfig(
      dataset=_DATASET.value,
      data_dir=_DATA_DIR.value,
      model=_MODEL.value,
      depth=_DEPTH.value,
      num_classes=_NUM_CLASSES.value,
      batch_size=_BATCH_SIZE.value,
      width=_WIDTH.value,
      batch_sizes=_numbers(_BATCH_SIZES, int),
      widths=_numbers(_WIDTHS, int),
      noise_multipliers=_numbers(_NOISE_MULTIPLIERS, float),
      local_steps=_numbers(_LOCAL_STEPS, int),
      local_lr=_LOCAL_LR.value,
      clip_norm=_CLIP_NORM.value,
      methods=tuple(_METHODS.value),
      spear_max_batch_size=_SPEAR_MAX_B.value,
      trials=_TRIALS.value,
      time_budget_s=_TIME_BUDGET_S.value,
      recognizable_psnr=_RECOGNIZABLE_PSNR.value,
      seed=_SEED.value,
      baseline=attack.BaselineConfig(
        steps=_BASELINE_STEPS.value, restarts=_BASELINE_RESTARTS.value
      ),
    )
  except ValueError as err:
    _fail(str(err).splitlines()[0])


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  _runtime.configure_jax(x64=True)
  config = _config()
  from spear_jax import audit  # pylint: disable=g-import-not-at-top

  out_dir = _runtime.trial_dir(
    os.path.expanduser(_OUT_DIR.value), resume=_RESUME.value
  )
  try:
    report = audit.run_audit(config, out_dir)
  except (ValueError, FileNotFoundError, ImportError) as err:
    _fail(str(err).splitlines()[0])
  for finding in report["findings"]:
    print(f"* {finding}")
  print(
    f"{report['attacks']} attacks; wrote {out_dir}/report.md, report.json"
    + "".join(f", {p}" for p in report["plots"])
  )
  if not report["complete"]:
    print("interrupted: run the same command again to resume.", file=sys.stderr)
  _runtime.exit_all(0 if report["complete"] else 1)


if __name__ == "__main__":
  app.run(main, flags_parser=_runtime.flags_parser(_PROG))
