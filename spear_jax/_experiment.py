"""One simulated attack: a client batch, its FedSGD gradient, SPEAR, scores.

This wires the rooms together (data -> client -> attack -> evaluation) for
the scripts and tests; the attack itself never sees anything but arrays.
"""

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spear_jax import _client
from spear_jax import _data
from spear_jax import _metrics
from spear_jax._attack import invert
from spear_jax._config import AttackConfig

__all__ = ["run_trial"]


def run_trial(
  key: jax.Array,
  *,
  dataset: str = "cifar_like",
  batch_size: int = 16,
  width: int = 400,
  depth: int = 2,
  num_classes: int = 10,
  layer: int = 0,
  dtype=jnp.float64,
  config: AttackConfig | None = None,
) -> dict[str, Any]:
  """Samples a real batch, simulates the client and inverts its gradient.

  Args:
    key: PRNG key; split into the batch, the model, the labels and the
      attack.
    dataset: a bundled image set (see :func:`spear_jax._data.load_bundled`).
    batch_size: ``b``.
    width: ``m``, width of every hidden layer.
    depth: number of hidden Dense-ReLU layers.
    num_classes: classifier outputs.
    layer: the attacked hidden layer.
    dtype: computation dtype of client and attack.
    config: attack configuration.

  Returns:
    A JSON-friendly dict: the setting, the attack's stats, per-sample
    matched errors and certificate flags, plus the arrays under
    ``"arrays"`` (truth and reconstruction, matched order).
  """
  batch_key, model_key, label_key, attack_key = jax.random.split(key, 4)
  images = _data.load_bundled(dataset)
  seed = int(jax.random.randint(batch_key, (), 0, 2**31 - 1))
  inputs, indices = _data.sample_batch(seed, images, batch_size)
  inputs = jnp.asarray(inputs, dtype)
  if images.labels is not None:
    labels = jnp.asarray(images.labels[indices] % num_classes)
  else:
    labels = jax.random.randint(label_key, (batch_size,), 0, num_classes)
  model = _client.MLP(widths=(width,) * depth, num_classes=num_classes)
  params = _client.init_mlp(model_key, model, inputs.shape[1], dtype)
  update = _client.client_update(params, model, inputs, labels, layer=layer)
  start = time.perf_counter()
  result = invert(
    update.weight_grad, update.bias_grad, key=attack_key,
    weight=update.weight, bias=update.bias, config=config,
  )
  seconds = time.perf_counter() - start
  truth = np.asarray(update.inputs)
  recovered = np.asarray(result.inputs)
  scores = _metrics.match_and_score(recovered, truth)
  return {
    "dataset": dataset,
    "batch_size": batch_size,
    "width": width,
    "depth": depth,
    "layer": layer,
    "dtype": jnp.dtype(dtype).name,
    "success": bool(result.success),
    "verified": np.asarray(result.verified).tolist(),
    "exact": scores["exact"].tolist(),
    "relative_error": scores["relative_error"].tolist(),
    "max_abs_error": scores["max_abs_error"].tolist(),
    "seconds": seconds,
    "stats": result.stats._asdict(),
    "arrays": {
      "truth": truth[scores["order"]],
      "recovered": recovered,
      "image_shape": images.image_shape,
    },
  }
