r"""Inverts one linear layer's gradients with SPEAR.

Usage:
  python scripts/invert.py --gradients=IN.npz --output=OUT.npz \
      [--method=spear] [--seed=0] [--batch_size=B] [--dtype=float64]

IN.npz holds ``weight_grad`` (m, n) and ``bias_grad`` (m,) in the paper's
layout, optionally the layer's ``weight`` (m, n) and ``bias`` (m,) for the
ReLU certificate and a scalar ``noise_std`` (the known per-entry noise of a
DP-SGD gradient, ``sigma C / b``), and ``next_weight`` (c, m): the weight of
the dense layer that reads this layer's ReLU output (a classifier after the
last hidden layer), which rules out mixed columns when c is small
(:func:`spear_jax.invert`'s ``next_weight``), and ``next_weight_grad`` (c, m):
that layer's weight gradient, whose rows (c >= b) span the batch's ReLU
outputs and make every found sample's input exact on its own
(``next_weight_grad``). OUT.npz receives ``inputs`` (b, n),
``verified`` (b,), ``grad_z`` (m, b) and ``success``. The last line printed
is a JSON summary, with the certificate applied (``check``: relu, drift,
none or noise) and the noise level.

With ``--labels``, IN.npz describes a whole ReLU MLP with softmax
cross-entropy (mean over the batch) on top, every layer in the paper's
layout (``weight_k`` is ``m_k x n_k``): ``weight_0..weight_{K-1}``,
``bias_0..``, ``weight_grad_0..``, ``bias_grad_0..`` (K >= 2; layer K-1 is
the classifier). Layer 0 is attacked (``weight_grad``, ``bias_grad``,
``weight``, ``bias`` may be left out; when present they must equal layer
0's), the recovered inputs are passed forward to the classifier, and each
sample's label is read off the classifier's gradient
(:func:`spear_jax.attack.recover_labels`). OUT.npz then also holds
``labels`` (b,), in the order of ``inputs`` (-1 where no label could be
read), and ``labels_verified`` (b,). An optional string key ``loss`` other
than ``softmax_cross_entropy`` is refused (no labels, the reason printed).

A FedAvg update (several local steps) is valid input: pass
``--certificate=drift``. A noisy (DP-SGD) gradient is valid input: its
noise is estimated from the spectrum unless ``--noise_std`` or the npz key
gives it, and the best reconstruction is written with exit code 1 (noise
rules out an exact certificate).

Exit codes: 0 = the whole batch recovered (and certified, when the weights
were given; with ``--labels``, every label verified); 1 = the attack ran but did not recover or certify the whole
batch (the best partial result is still written), or the gradient is noisy;
2 = invalid input: wrong shapes, non-finite values, a pickled object, or no
low-rank structure even above the noise (nothing is written).
"""

import hashlib
import json
import os
import tempfile
import zipfile

import _runtime  # before jax: one device per core, compilation cache
from absl import app
from absl import flags
from absl import logging

_GRADIENTS = flags.DEFINE_string(
  "gradients", None, "Input .npz with weight_grad, bias_grad[, weight, bias]."
)
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz path.")
_METHOD = flags.DEFINE_enum(
  "method", "spear", ["spear", "spearpp"], "Attack method: SPEAR or SPEAR++."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampler's PRNG key.")
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", None, "Batch size b; default: the numerical rank."
)
_DTYPE = flags.DEFINE_enum(
  "dtype",
  "float64",
  ["float64", "float32"],
  "Computation dtype; exact recovery needs float64.",
)
_MAX_PROPOSALS = flags.DEFINE_integer(
  "max_proposals", None, "Sampling budget (default: automatic, see docs)."
)
_TIME_BUDGET_S = flags.DEFINE_float(
  "time_budget_s", None, "Wall-time budget of the sampler in seconds."
)
_BLOCK_SIZE = flags.DEFINE_integer(
  "block_size", 8192, "Proposals per jitted block."
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "Optional .npz where the directions found so far are saved every few "
  "seconds and on exit (also on Ctrl-C); an existing checkpoint of the same "
  "gradient is resumed.",
)

_CERTIFICATE = flags.DEFINE_enum(
  "certificate",
  "relu",
  ["relu", "drift"],
  "relu: the update is a gradient at the server's weights (FedSGD); drift: "
  "a FedAvg update from several local steps.",
)
_NOISE_STD = flags.DEFINE_float(
  "noise_std",
  None,
  "Known per-entry noise of the gradient (DP-SGD: sigma*C/b); default: the "
  "npz key noise_std, else estimated when the gradient has full rank.",
)

_LABELS = flags.DEFINE_boolean(
  "labels",
  False,
  "Also recover each sample's label: IN.npz holds the whole MLP "
  "(weight_k, bias_k, weight_grad_k, bias_grad_k).",
)

flags.mark_flags_as_required(["gradients", "output"])

_REQUIRED = ("weight_grad", "bias_grad")
_OPTIONAL = ("weight", "bias", "noise_std", "next_weight", "next_weight_grad")
_LAYER_KEYS = ("weight", "bias", "weight_grad", "bias_grad")
_BIG = ("weight_grad", "weight")  # m x n: moved to the device as read


class InputError(Exception):
  """Invalid user input: reported in one line, exit code 2."""


def _fail(message: str) -> None:
  _runtime.fail("invert.py", message)


def load_gradients(path: str) -> dict:
  """Reads the gradient file; raises :class:`InputError` on any problem."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file.")
  if not zipfile.is_zipfile(path):
    raise InputError(f"{path}: not an .npz archive.")
  try:
    with np.load(path, allow_pickle=False) as data:
      if not hasattr(data, "files"):
        raise InputError(f"{path}: not an .npz archive (a single .npy?).")
      layered = _LABELS.value or "weight_grad_0" in data.files
      arrays, fingerprint = {}, hashlib.sha256()
      for k in sorted(data.files, key=lambda k: k != "weight_grad"):
        arrays[k] = np.asarray(data[k])
        if k in ("weight_grad", "bias_grad"):  # in this order
          fingerprint.update(memoryview(np.ascontiguousarray(arrays[k])))
        if k in _BIG and not layered:
          arrays[k] = _to_device(arrays[k])
      arrays["fingerprint"] = fingerprint.hexdigest()
  except InputError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
    raise InputError(f"{path}: not a readable .npz file ({err}).") from None
  if _LABELS.value or "weight_grad_0" in arrays:
    layers = _mlp_layers(path, arrays)
    for name, value in zip(_LAYER_KEYS, layers[0]):
      if name in arrays and not _same(arrays[name], value):
        raise InputError(
          f"{path}: {name} disagrees with {name}_0 (both given; they must "
          "be the same layer)."
        )
      arrays[name] = value
    arrays["layers"] = layers
  missing = [k for k in _REQUIRED if k not in arrays]
  if missing:
    raise InputError(
      f"{path}: missing {', '.join(missing)} (found: "
      f"{', '.join(sorted(arrays)) or 'nothing'})."
    )
  keep = (*_REQUIRED, *_OPTIONAL, "layers", "loss", "fingerprint")
  return {k: arrays[k] for k in keep if k in arrays}


def _to_device(value):
  """A big numpy array on the JAX device, in the run's dtype.

  Copied now and waited for, so that the numpy original can be dropped
  before the next array is read (an ImageNet-size layer is 1.2 GB; the
  lazy alias of ``jnp.asarray`` would keep both alive and copy later).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if not np.issubdtype(value.dtype, np.number) or value.ndim != 2:
    return value  # left to the validation's one-line errors
  return jax.device_put(
    value.astype(_DTYPE.value, copy=False)
  ).block_until_ready()


def _same(a, b) -> bool:
  import numpy as np  # pylint: disable=g-import-not-at-top

  return a.shape == b.shape and bool(
    np.allclose(a, b, rtol=1e-6, atol=0, equal_nan=False)
  )


def _mlp_layers(path: str, arrays: dict) -> list:
  """``[(weight_k, bias_k, weight_grad_k, bias_grad_k)]`` of a whole MLP."""
  depth = 0
  while f"weight_{depth}" in arrays:
    depth += 1
  if depth < 2:
    raise InputError(
      f"{path}: --labels needs a whole MLP, weight_0 .. weight_{{K-1}} with "
      f"K >= 2 (the last layer is the classifier); found K = {depth}."
    )
  layers = []
  for k in range(depth):
    names = [f"{name}_{k}" for name in _LAYER_KEYS]
    missing = [name for name in names if name not in arrays]
    if missing:
      raise InputError(f"{path}: missing {', '.join(missing)}.")
    weight, bias, weight_grad, bias_grad = (arrays[n] for n in names)
    if (
      weight.ndim != 2
      or weight_grad.shape != weight.shape
      or bias.shape != (weight.shape[0],)
      or bias_grad.shape != bias.shape
    ):
      raise InputError(
        f"{path}: layer {k}: weight {weight.shape}, bias {bias.shape}, "
        f"weight_grad {weight_grad.shape} and bias_grad {bias_grad.shape} "
        "must be (m, n), (m,), (m, n) and (m,)."
      )
    if layers and layers[-1][0].shape[0] != weight.shape[1]:
      raise InputError(
        f"{path}: layer {k} takes {weight.shape[1]} inputs but layer "
        f"{k - 1} has {layers[-1][0].shape[0]} outputs."
      )
    layers.append((weight, bias, weight_grad, bias_grad))
  return layers


def _labels(arrays, result, noisy: bool) -> dict:
  """Each recovered sample's label, off the classifier's gradient."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  import spear_jax  # pylint: disable=g-import-not-at-top

  loss = "softmax_cross_entropy"
  if "loss" in arrays:
    loss = str(arrays["loss"].reshape(()))
  *hidden, head = arrays["layers"]
  features = np.asarray(result.inputs, np.float64)
  for weight, bias, _, _ in hidden:
    features = np.maximum(features @ weight.T + bias[None, :], 0.0)
  b = features.shape[0]
  return spear_jax.attack.recover_labels(
    features,
    *head,
    scale=None if noisy else 1.0 / b,
    loss=loss,
  )


def _load_checkpoint(fingerprint: str):
  """Directions and proposal count of an earlier run on this gradient."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  path = _CHECKPOINT.value
  if not path or not os.path.exists(path):
    return None, 0
  try:
    with np.load(path, allow_pickle=False) as data:
      saved = str(data["fingerprint"])
      candidates = np.asarray(data["candidates"])
      proposals = int(data["proposals"])
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
    raise InputError(f"{path}: not a readable checkpoint ({err}).") from None
  if saved != fingerprint:
    raise InputError(
      f"{path}: checkpoint belongs to a different gradient; remove it or "
      "pass another --checkpoint."
    )
  logging.info(
    "resuming from %s: %d directions, %d proposals",
    path,
    candidates.shape[0],
    proposals,
  )
  return candidates, proposals


def _noise_std(arrays) -> float | None:
  """The known noise level: the flag, else the npz key, else ``None``."""
  if _NOISE_STD.value is not None:
    value = _NOISE_STD.value
  elif "noise_std" in arrays:
    if arrays["noise_std"].size != 1:
      raise InputError("noise_std must be a scalar.")
    value = float(arrays["noise_std"].reshape(()))
  else:
    return None
  if not value >= 0 or value == float("inf"):
    raise InputError(f"noise_std must be finite and >= 0, got {value}.")
  return value


def _write_npz(path: str, **arrays) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top

  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
  os.close(fd)
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax  # pylint: disable=g-import-not-at-top

  _runtime.configure_jax(x64=_DTYPE.value == "float64")
  import numpy as np  # pylint: disable=g-import-not-at-top

  import spear_jax  # pylint: disable=g-import-not-at-top

  logging.info("devices: %s", jax.devices())
  try:
    arrays = load_gradients(_GRADIENTS.value)
    arrays = {
      # copy=False: an ImageNet-size layer is 1.2 GB per array.
      k: v.astype(_DTYPE.value, copy=False)
      if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.number)
      else v
      for k, v in arrays.items()
    }
    config = spear_jax.AttackConfig(
      max_proposals=_MAX_PROPOSALS.value,
      time_budget_s=_TIME_BUDGET_S.value,
      block_size=_BLOCK_SIZE.value,
      chunk_size=min(64, _BLOCK_SIZE.value),
      certificate=_CERTIFICATE.value,
    )
    noise_std = _noise_std(arrays)
    fingerprint = arrays.pop("fingerprint")
    initial, earlier_proposals = _load_checkpoint(fingerprint)

    def checkpoint_fn(candidates, proposals):
      if _CHECKPOINT.value and _runtime.is_writer():
        _write_npz(
          _CHECKPOINT.value,
          candidates=candidates,
          proposals=np.asarray(earlier_proposals + proposals),
          fingerprint=np.asarray(fingerprint),
        )

    result = spear_jax.invert(
      arrays["weight_grad"],
      arrays["bias_grad"],
      key=jax.random.key(_SEED.value),
      method=_METHOD.value,
      batch_size=_BATCH_SIZE.value,
      weight=arrays.get("weight"),
      bias=arrays.get("bias"),
      config=config,
      initial_candidates=initial,
      checkpoint_fn=checkpoint_fn,
      noise_std=noise_std,
      next_weight=arrays.get("next_weight"),
      next_weight_grad=arrays.get("next_weight_grad"),
    )
  except (InputError, ValueError, TypeError) as err:
    _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)

  verified = np.asarray(result.verified)
  outputs = {}
  labels = None
  if _LABELS.value:
    labels = _labels(arrays, result, noisy=result.stats.check == "noise")
    outputs = {"labels": labels.labels, "labels_verified": labels.verified}
  if _runtime.is_writer():
    _write_npz(
      _OUTPUT.value,
      inputs=np.asarray(result.inputs),
      verified=verified,
      grad_z=np.asarray(result.grad_z),
      success=np.asarray(result.success),
      **outputs,
    )
  summary = {
    "success": result.success,
    "certified": "weight" in arrays,
    "batch_size": result.inputs.shape[0],
    "rank": result.stats.rank,
    "dependent": result.stats.dependent,
    "verified": int(verified.sum()),
    "proposals": result.stats.proposals,
    "resumed_proposals": earlier_proposals,
    "candidates": result.stats.candidates,
    "seconds": round(result.stats.seconds, 3),
    "stop_reason": result.stats.stop_reason,
    "tau": round(result.stats.tau, 4),
    "check": result.stats.check,
    "noise_std": result.stats.noise_std,
    "dtype": _DTYPE.value,
    "output": _OUTPUT.value,
  }
  labels_ok = True
  if labels is not None:
    summary["labels"] = int((labels.labels >= 0).sum())
    summary["labels_verified"] = int(labels.verified.sum())
    summary["labels_reason"] = labels.reason
    labels_ok = bool(labels.verified.all())
  print(json.dumps(summary))
  _runtime.exit_all(0 if result.success and labels_ok else 1)


if __name__ == "__main__":
  app.run(main, flags_parser=_runtime.flags_parser("invert.py"))
