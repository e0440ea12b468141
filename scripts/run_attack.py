r"""End-to-end gradient inversion on real images: attack, score, picture.

For each trial: sample a batch from ``--dataset``, build the client MLP
(``--depth`` hidden Dense-ReLU layers of width ``--width``, PyTorch-style
init), compute the client's FedSGD gradient, invert the first layer's
gradient with ``--method`` and score the reconstruction against the truth
(Hungarian matching; relative error, MSE, PSNR, SSIM, exact flags; ReLU
certificate). Each recovered sample's label is then read off the
classifier's update (``label_accuracy`` per trial and aggregated; ``*`` in
the table when some labels are not verified exactly, as under FedAvg
drift or DP noise).

With no flags: one batch of 16 natural-image patches (32x32x3, bundled with
the package, offline) through a width-400 MLP, SPEAR, in well under a minute
on a 2-core CPU.

Outputs under ``--out_dir``:

* ``metrics.json``: per-trial and aggregate metrics, the flags, the device
  and the library versions;
* ``reconstruction.png``: ground truth (top) against reconstruction (bottom)
  for the first trial, with a red frame around every inexact sample (for
  ``--layer`` > 0, whose inputs are activations, a heatmap of the absolute
  error per sample and feature);
* ``trials.jsonl`` and ``trial_NNN.npz``: one record and the arrays per
  finished trial. Re-running the same command resumes: finished trials are
  read back, not recomputed (``--noresume`` starts over).

Exit code 0 if every batch was recovered exactly and certified, 1 if not,
2 for bad flags or data.

  python scripts/run_attack.py
  python scripts/run_attack.py --dataset=faces --batch_size=20 --width=1000
  python scripts/run_attack.py --method=spearpp --batch_size=50 \
      --width=1000 --num_trials=3 --out_dir=/tmp/spearpp
  python scripts/run_attack.py --dataset=cifar10 --data_dir=~/tfds

Federated clients (``--client``): ``fedsgd`` (the gradient), ``fedavg``
(``--local_epochs`` epochs of mini-batches of ``--local_batch_size`` with
SGD at ``--local_lr``, sent as the parameter delta, certified with the
drift certificate) or ``dpsgd`` (per-example clipping to ``--clip_norm``,
Gaussian noise ``--noise_multiplier``; the noise-aware attack estimates the
noise, and nothing is certified exact). ``--model=cnn`` attacks the dense
layer after two convolutions (its inputs are conv features).

  python scripts/run_attack.py --client=fedavg --local_epochs=2 \
      --local_batch_size=4 --local_lr=0.01
  python scripts/run_attack.py --client=dpsgd --noise_multiplier=1e-4 \
      --batch_size=8
  python scripts/run_attack.py --model=cnn --batch_size=8
"""

import json
import os
import platform
import sys

import _runtime  # before jax: one device per core, compilation cache
from absl import app
from absl import flags
from absl import logging

_DATASET = flags.DEFINE_string(
  "dataset",
  "cifar_like",
  "Image set: a bundled offline set (cifar_like, faces, digits) or a "
  "tensorflow-datasets name prepared under --data_dir (mnist, cifar10, "
  "cifar100, imagenet2012, ...).",
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "tensorflow-datasets data directory (tfds sets only)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Client batch size b.")
_WIDTH = flags.DEFINE_integer("width", 400, "Hidden width m.")
_DEPTH = flags.DEFINE_integer("depth", 2, "Number of hidden layers.")
_LAYER = flags.DEFINE_integer(
  "layer",
  0,
  "Attacked hidden layer (0 sees the images; a deeper layer's "
  "inputs are activations, drawn as an error heatmap).",
)
_METHOD = flags.DEFINE_enum(
  "method",
  "spear",
  ["spear", "spearpp"],
  "Attack: SPEAR (sampling) or SPEAR++ (dictionary learning).",
)
_MODEL = flags.DEFINE_enum(
  "model", "mlp", ["mlp", "cnn"], "Client model: the MLP or the flax CNN."
)
_CLIENT = flags.DEFINE_enum(
  "client",
  "fedsgd",
  ["fedsgd", "fedavg", "dpsgd"],
  "What the client sends: FedSGD gradient, FedAvg delta or DP-SGD gradient.",
)
_NEXT_LAYER_GRAD = flags.DEFINE_boolean(
  "next_layer_grad",
  False,
  "FedSGD: also use the next dense layer's weight gradient (which the "
  "server receives anyway): every found sample's input comes out exact on "
  "its own.",
)
_LOCAL_EPOCHS = flags.DEFINE_integer("local_epochs", 1, "FedAvg epochs E.")
_LOCAL_BATCH_SIZE = flags.DEFINE_integer(
  "local_batch_size", None, "FedAvg mini-batch size B (default: the batch)."
)
_LOCAL_LR = flags.DEFINE_float("local_lr", 0.01, "FedAvg SGD learning rate.")
_SIGN = flags.DEFINE_enum(
  "sign",
  "server_minus_client",
  ["server_minus_client", "client_minus_server"],
  "FedAvg delta convention.",
)
_CLIP_NORM = flags.DEFINE_float("clip_norm", 1.0, "DP-SGD clipping norm C.")
_NOISE_MULTIPLIER = flags.DEFINE_float(
  "noise_multiplier", 0.0, "DP-SGD noise multiplier sigma."
)
_NUM_TRIALS = flags.DEFINE_integer(
  "num_trials", 1, "Number of batches to attack."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the experiment.")
_DTYPE = flags.DEFINE_enum(
  "dtype", "float64", ["float64", "float32"], "Computation dtype."
)
_TIME_BUDGET_S = flags.DEFINE_float(
  "time_budget_s", None, "Wall-time budget of each inversion (seconds)."
)
_OUT_DIR = flags.DEFINE_string(
  "out_dir", "runs/attack", "Directory for metrics.json and the picture."
)
_RESUME = flags.DEFINE_boolean(
  "resume", True, "Reuse the trials already finished in --out_dir."
)

_PROG = "run_attack.py"


def _fail(message: str) -> None:
  _runtime.fail(_PROG, message)


def _check_flags():
  for name, value in (
    ("batch_size", _BATCH_SIZE.value),
    ("width", _WIDTH.value),
    ("depth", _DEPTH.value),
    ("num_trials", _NUM_TRIALS.value),
  ):
    if value < 1:
      _fail(f"--{name} must be at least 1, got {value}.")
  if _SEED.value < 0:
    _fail(f"--seed must be non-negative, got {_SEED.value}.")
  if not 0 <= _LAYER.value < _DEPTH.value:
    _fail(
      f"--layer must be in [0, {_DEPTH.value - 1}] for --depth="
      f"{_DEPTH.value}, got {_LAYER.value}."
    )
  if _TIME_BUDGET_S.value is not None and _TIME_BUDGET_S.value <= 0:
    _fail(f"--time_budget_s must be positive, got {_TIME_BUDGET_S.value}.")
  if _MODEL.value == "cnn" and _LAYER.value != 0:
    _fail("--model=cnn has one hidden dense layer: --layer must be 0.")
  try:
    _client_config()
  except ValueError as err:
    _fail(str(err).splitlines()[0])


def _client_config():
  from spear_jax import fl  # pylint: disable=g-import-not-at-top

  return fl.ClientConfig(
    mode=_CLIENT.value,
    local_epochs=_LOCAL_EPOCHS.value,
    local_batch_size=_LOCAL_BATCH_SIZE.value,
    learning_rate=_LOCAL_LR.value,
    sign=_SIGN.value,
    clip_norm=_CLIP_NORM.value,
    noise_multiplier=_NOISE_MULTIPLIER.value,
  )


def _environment():
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import spear_jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  return {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "local_devices": len(jax.local_devices()),
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "python": platform.python_version(),
    "versions": {
      "spear_jax": spear_jax.__version__,
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
    },
  }


def _setting():
  return {
    "method": _METHOD.value,
    "objective": "l1" if _METHOD.value != "spear" else "none",
    "dataset": _DATASET.value,
    "width": _WIDTH.value,
    "batch_size": _BATCH_SIZE.value,
    "depth": _DEPTH.value,
    "layer": _LAYER.value,
    "dtype": _DTYPE.value,
    "seed": _SEED.value,
    **_client_setting(),
  }


def _client_setting():
  setting = {"model": _MODEL.value, "client": _CLIENT.value}
  if _CLIENT.value == "fedavg":
    setting.update(
      local_epochs=_LOCAL_EPOCHS.value,
      local_batch_size=_LOCAL_BATCH_SIZE.value,
      local_lr=_LOCAL_LR.value,
      sign=_SIGN.value,
    )
  elif _CLIENT.value == "dpsgd":
    setting.update(
      clip_norm=_CLIP_NORM.value, noise_multiplier=_NOISE_MULTIPLIER.value
    )
  return setting


def _label_cell(record):
  """``correct/b`` labels, with ``*`` when not all of them are verified."""
  if record.get("label_accuracy") is None:
    return "-"
  correct = round(record["label_accuracy"] * record["batch_size"])
  mark = "" if record.get("labels_verified") == record["batch_size"] else "*"
  return f"{correct}/{record['batch_size']}{mark}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _check_flags()
  import jax  # pylint: disable=g-import-not-at-top

  _runtime.configure_jax(x64=_DTYPE.value == "float64")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import spear_jax  # pylint: disable=g-import-not-at-top
  from spear_jax import _experiment  # pylint: disable=g-import-not-at-top
  from spear_jax import _report  # pylint: disable=g-import-not-at-top

  try:
    image_set = spear_jax.data.load_dataset(
      _DATASET.value, data_dir=_DATA_DIR.value
    )
  except (ValueError, FileNotFoundError, ImportError) as err:
    _fail(str(err).splitlines()[0])
  if _BATCH_SIZE.value > image_set.num_images:
    _fail(
      f"--batch_size={_BATCH_SIZE.value} exceeds the "
      f"{image_set.num_images} images of {_DATASET.value!r}."
    )
  out_dir = _runtime.trial_dir(
    os.path.expanduser(_OUT_DIR.value), resume=_RESUME.value
  )
  log_path = os.path.join(out_dir, "trials.jsonl")
  setting = _setting()
  finished = {
    r["trial"]: r
    for r in _report.read_records(log_path)
    if all(r.get(k) == v for k, v in setting.items())
  }
  config = spear_jax.AttackConfig(time_budget_s=_TIME_BUDGET_S.value)
  logging.info("devices: %s", jax.devices())
  print(
    f"{_METHOD.value} on {_BATCH_SIZE.value} {_DATASET.value} images "
    f"per batch, width {_WIDTH.value}, depth {_DEPTH.value}, "
    f"{_DTYPE.value}, {_NUM_TRIALS.value} trial(s)",
    flush=True,
  )
  progress = _report.ProgressBar(_NUM_TRIALS.value, "trials")
  resumed = sum(t < _NUM_TRIALS.value for t in finished)
  if resumed:
    progress.advance(resumed, "finished earlier, read back", timed=False)
  interrupted = False
  root = jax.random.key(_SEED.value)
  for trial in range(_NUM_TRIALS.value):
    if trial in finished:
      continue
    try:
      result = _experiment.run_trial(
        jax.random.fold_in(root, trial),
        image_set,
        batch_size=_BATCH_SIZE.value,
        width=_WIDTH.value,
        depth=_DEPTH.value,
        layer=_LAYER.value,
        method=_METHOD.value,
        dtype=jnp.dtype(_DTYPE.value),
        config=config,
        model=_MODEL.value,
        client=_client_config(),
        next_layer_grad=_NEXT_LAYER_GRAD.value,
      )
    except KeyboardInterrupt:
      interrupted = True
      break
    if result["stats"]["stop_reason"] == "interrupted":
      interrupted = True
      break
    arrays = result["arrays"]
    np.savez(
      os.path.join(out_dir, f"trial_{trial:03d}.npz"),
      truth=arrays["truth"],
      recovered=arrays["recovered"],
      verified=np.asarray(result["per_sample"]["verified"]),
      exact=np.asarray(result["per_sample"]["exact"]),
    )
    record = _experiment.trial_record(result, seed=_SEED.value, trial=trial)
    record["per_sample"] = result["per_sample"]
    _report.append_record(log_path, record)
    finished[trial] = record
    progress.advance(
      1,
      f"last: {record['exact_samples']}/"
      f"{record['batch_size']} exact, "
      f"{record['seconds']:.1f} s",
    )
  progress.close()

  trials = [finished[t] for t in sorted(finished) if t < _NUM_TRIALS.value]
  summary = _report.summarize(trials)
  aggregate = summary[0] if summary else {}
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(
      {
        "config": {
          **setting,
          "num_trials": _NUM_TRIALS.value,
          "data_dir": _DATA_DIR.value,
          "time_budget_s": _TIME_BUDGET_S.value,
        },
        "environment": _environment(),
        "complete": len(trials) == _NUM_TRIALS.value,
        "aggregate": aggregate,
        "trials": trials,
      },
      f,
      indent=2,
      default=float,
    )
  picture = None
  if trials and _runtime.is_writer():
    with np.load(
      os.path.join(out_dir, f"trial_{trials[0]['trial']:03d}.npz")
    ) as arrays:
      picture = os.path.join(out_dir, "reconstruction.png")
      if arrays["truth"].ndim == 4:
        spear_jax.metrics.save_image_grid(
          picture, arrays["truth"], arrays["recovered"], exact=arrays["exact"]
        )
      else:  # hidden activations: |error| per sample and feature
        spear_jax.metrics.save_error_heatmap(
          picture, arrays["recovered"], arrays["truth"]
        )

  nan = float("nan")
  print(
    f"{'trial':>5} {'exact':>7} {'certified':>9} {'PSNR dB':>8} "
    f"{'SSIM':>7} {'max rel err':>11} {'twins':>5} {'labels':>7} "
    f"{'seconds':>8}  stop"
  )
  for r in trials:
    print(
      f"{r['trial']:>5} {r['exact_samples']:>3}/{r['batch_size']:<3} "
      f"{r['verified_samples']:>9} {r.get('mean_psnr', nan):>8.2f} "
      f"{r.get('mean_ssim', nan):>7.4f} "
      f"{r['max_relative_error']:>11.2e} "
      f"{r.get('near_duplicates_095', nan):>5.2f} "
      f"{_label_cell(r):>7} {r['seconds']:>8.1f}  "
      f"{r['stop_reason']} ({r.get('stats_check', 'relu')})"
    )
  if interrupted:
    print(
      f"interrupted after {len(trials)} finished trial(s); run the same "
      "command again to resume.",
      file=sys.stderr,
    )
  exact = sum(bool(r["exact_batch"]) and bool(r["success"]) for r in trials)
  print(
    f"exact and certified batches: {exact}/{_NUM_TRIALS.value}; "
    f"wrote {out_dir}/metrics.json" + (f" and {picture}" if picture else "")
  )
  print(
    json.dumps(
      {
        "exact_batches": exact,
        "trials": _NUM_TRIALS.value,
        "finished": len(trials),
        "label_accuracy": aggregate.get("label_accuracy"),
        "seconds": round(sum(r["seconds"] for r in trials), 2),
      }
    )
  )
  _runtime.exit_all(0 if exact == _NUM_TRIALS.value else 1)


if __name__ == "__main__":
  app.run(main, flags_parser=_runtime.flags_parser(_PROG))
