"""One simulated attack: a client batch, its FedSGD gradient, SPEAR, scores.

This wires the rooms together (data -> client -> attack -> evaluation) for
the scripts and tests; the attack itself never sees anything but arrays.
"""

from collections.abc import Callable
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spear_jax import _baseline
from spear_jax import _client
from spear_jax import _clients
from spear_jax import _data
from spear_jax import _labels
from spear_jax import _metrics
from spear_jax._attack import invert
from spear_jax._config import AttackConfig
from spear_jax._layouts import dense_layer
from spear_jax._noisy import NoStructureError
from spear_jax._types import InversionResult
from spear_jax._types import InversionStats

__all__ = ["run_trial", "trial_record"]


def run_trial(
  key: jax.Array,
  image_set: _data.ImageSet,
  *,
  batch_size: int = 16,
  width: int = 400,
  depth: int = 2,
  method: str = "spear",
  num_classes: int = 10,
  layer: int = 0,
  dtype=jnp.float64,
  config: AttackConfig | None = None,
  exact_rtol: float = 1e-8,
  model: str | Callable[..., Any] = "mlp",
  client: _clients.ClientConfig | None = None,
  baseline: _baseline.BaselineConfig | None = None,
  with_labels: bool = True,
  next_layer_grad: bool = False,
) -> dict[str, Any]:
  """Samples a real batch, simulates the client and inverts its gradient.

  Args:
    key: PRNG key; split into the batch, the model, the labels and the
      attack.
    image_set: the images to sample from (see :func:`spear_jax.load_dataset`).
    batch_size: ``b``.
    width: ``m``, width of every hidden layer.
    depth: number of hidden Dense-ReLU layers.
    method: ``"spear"``, ``"spearpp"`` or ``"baseline"`` (gradient matching
      on the whole update with the true labels,
      :func:`spear_jax.attack.gradient_matching`; the first layer of the
      MLP only: it reconstructs images).
    num_classes: classifier outputs; labels of a labelled set are taken
      modulo this, an unlabelled set gets uniform random labels.
    layer: the attacked hidden layer (0: the first, which sees the images).
    dtype: computation dtype of client and attack.
    config: attack configuration.
    exact_rtol: a sample is exact when its relative L2 error is below this.
    model: ``"mlp"`` (``depth`` Dense-ReLU layers of ``width``), ``"cnn"``
      (:class:`spear_jax.fl.CNN`; its dense layer of ``width`` follows two
      convolutions and is the attacked layer, so ``layer`` must be 0) or a
      factory ``factory(key, n, width, num_classes, dtype) ->``
      :class:`spear_jax.fl.ModelSpec` for a user's own model (``depth``
      and ``layer`` are then the factory's business).
    client: what the client sends (:class:`spear_jax.fl.ClientConfig`);
      ``None`` is FedSGD. A FedAvg client is certified with the drift
      certificate; a DP-SGD gradient goes to the noise-aware attack, which
      estimates the noise.
    baseline: settings of ``method="baseline"``.
    with_labels: after SPEAR or SPEAR++, read each sample's label off the
      classifier's update (:func:`spear_jax.attack.recover_labels`) from
      the recovered inputs and score it (``label_accuracy``).
    next_layer_grad: under FedSGD, also hand the attack the weight gradient
      of the dense layer after the attacked one (``invert``'s
      ``next_weight_grad``: the server receives the whole model's
      gradient).

  Returns:
    A JSON-friendly dict: the setting, the attack's stats, the per-batch
    scores of :func:`spear_jax.score_reconstruction` at the top level, the
    per-sample scores and certificate flags in truth order under
    ``"per_sample"``, and under ``"arrays"`` (numpy, not JSON) the truth and
    the matched reconstruction: ``(b, H, W, C)`` images in [0, 1]
    (de-normalized and clipped) when the first layer is attacked, else the
    ``(b, n)`` layer inputs.
  """
  if config is None:
    config = AttackConfig()
  keys = jax.random.split(key, 4)  # batch, model, labels, attack
  inputs, labels = _sample(keys, image_set, batch_size, num_classes, dtype)
  model_key, attack_key = keys[1], keys[3]
  client = _clients.ClientConfig() if client is None else client
  if client.mode == "fedavg":
    config = dataclasses.replace(config, certificate="drift")
  shape = (width, depth, layer, num_classes)
  update, spec = _simulate(
    model, model_key, image_set, inputs, labels, shape, client
  )
  is_image = spec.features_fn is None and image_set.image_shape is not None
  if method == "baseline" and not is_image:
    raise ValueError(
      "the baseline reconstructs images: it needs the attacked layer to "
      "see them (the MLP's first layer)."
    )
  start = time.perf_counter()
  if method == "baseline":
    result = _run_baseline(
      update, spec, image_set, inputs, labels, attack_key, baseline
    )
  else:
    result = _invert_update(
      update, spec, client, attack_key, method, config, next_layer_grad
    )
  jax.block_until_ready(result.inputs)
  seconds = time.perf_counter() - start
  scores, per_sample, arrays = _score(
    result, update, image_set if is_image else None, exact_rtol
  )
  label_record = {}
  if with_labels and method != "baseline":
    label_record = _score_labels(
      update, spec, result, per_sample, labels, client
    )
  return {
    "dataset": image_set.name,
    "batch_size": batch_size,
    "width": width,
    "depth": depth,
    "layer": layer,
    "model": _model_name(model),
    **_client_record(client, batch_size),
    "method": method,
    "next_layer_grad": next_layer_grad,
    "objective": config.learner.objective if method != "spear" else "none",
    "dtype": jnp.dtype(dtype).name,
    "success": bool(result.success),
    "seconds": seconds,
    "verified_samples": int(np.sum(per_sample["verified"])),
    **label_record,
    **_jsonable(scores),
    "stats": _stats_record(result.stats),
    "per_sample": _jsonable(per_sample),
    "arrays": arrays,
  }


def _stats_record(stats: InversionStats) -> dict:
  """The attack's stats as JSON: ``timings`` by phase name."""
  record = stats._asdict()
  record["timings"] = {
    t.phase: {k: v for k, v in t._asdict().items() if k != "phase"}
    for t in stats.timings
  }
  return record


def _invert_update(update, spec, client, key, method, config, next_grad):
  """The attack; a gradient whose noise hides everything recovers nothing.

  Under FedSGD the layer after the attacked one (``spec.next_layer``) is
  the server's to give: it rules out mixed columns (``next_weight``), and
  with ``next_grad`` its weight gradient spans the hidden outputs
  (``next_weight_grad``).
  """
  next_weight = next_weight_grad = None
  if spec.next_layer is not None and client.mode == "fedsgd":
    next_weight = dense_layer(spec.params, spec.next_layer)[0]
    if next_grad:
      next_weight_grad = dense_layer(update.update, spec.next_layer)[0]
  try:
    return invert(
      update.weight_grad,
      update.bias_grad,
      key=key,
      method=method,
      weight=update.weight,
      bias=update.bias,
      config=config,
      next_weight=next_weight,
      next_weight_grad=next_weight_grad,
    )
  except NoStructureError:
    # Not an input error here: the attacker gets nothing (NaN inputs score
    # as not exact, with no PSNR), and the record says why.
    m, n = update.weight_grad.shape
    b = update.inputs.shape[0]
    return _nothing(m, n, b, update.weight_grad.dtype, "no_structure", "noise")


def _model_name(model) -> str:
  return (
    model if isinstance(model, str) else getattr(model, "__name__", "custom")
  )


def _sample(keys, image_set, batch_size, num_classes, dtype):
  """A batch of real images and its labels (random if the set has none)."""
  batch_key, label_key = keys[0], keys[2]
  seed = int(jax.random.randint(batch_key, (), 0, 2**31 - 1))
  batch, indices = _data.sample_batch(seed, image_set, batch_size)
  inputs = jnp.asarray(batch, dtype)
  if image_set.labels is not None:
    labels = jnp.asarray(np.asarray(image_set.labels[indices]) % num_classes)
  else:
    labels = jax.random.randint(label_key, (batch_size,), 0, num_classes)
  return inputs, labels


def _score(result, update, image_set, exact_rtol):
  """Scores, per-sample scores (truth order) and the matched arrays."""
  truth = np.asarray(update.inputs)
  recovered = np.asarray(result.inputs)
  image_shape = None if image_set is None else image_set.image_shape
  scores = _metrics.score_reconstruction(
    recovered,
    truth,
    image_shape=image_shape,
    mean=None if image_set is None else image_set.mean,
    std=None if image_set is None else image_set.std,
    exact_rtol=exact_rtol,
  )
  matched = scores.pop("matched_row")
  per_sample = {k: scores.pop(k) for k in _PER_SAMPLE if k in scores}
  per_sample["matched_row"] = matched
  per_sample["verified"] = np.asarray(result.verified)[matched]
  if update.grad_z is not None and update.mode == "fedsgd":
    # The cause beside the failure: near-twins no attack can pin down. A
    # verified sample is exact, so its zero sets are the truth's and the
    # attack's own test already passed on them: only failures are assessed.
    per_sample["identifiable"] = (
      np.ones_like(per_sample["verified"])
      if per_sample["verified"].all()
      else _metrics.identifiable_samples(update.grad_z)
    )
    scores["unidentifiable_samples"] = int(np.sum(~per_sample["identifiable"]))
    # And inputs that float64 cannot tell from the others' span.
    per_sample["independent"] = (
      np.ones_like(per_sample["verified"])
      if per_sample["verified"].all()
      else _metrics.independent_samples(truth)
    )
    scores["dependent_samples"] = int(np.sum(~per_sample["independent"]))
  arrays = {"truth": truth, "recovered": recovered[matched]}
  if image_set is not None:
    for name in ("truth", "recovered"):
      arrays[name] = _metrics.denormalize_images(
        arrays[name], image_shape, image_set.mean, image_set.std
      )
  return scores, per_sample, arrays


def _builtin_model(model, key, image_set, inputs, shape) -> _clients.ModelSpec:
  """The MLP or the CNN of ``run_trial`` as a :class:`ModelSpec`."""
  width, depth, layer, num_classes = shape
  dtype = inputs.dtype
  if model == "cnn":
    if layer != 0 or image_set.image_shape is None:
      raise ValueError("the CNN attacks its dense layer (layer 0) of images.")
    cnn = _client.CNN(
      image_shape=image_set.image_shape,
      width=width,
      num_classes=num_classes,
      param_dtype=dtype,
    )
    return _clients.ModelSpec(
      apply_fn=cnn.apply,
      params=cnn.init(key, inputs[:1]),
      layer="params/Dense_0",
      head="params/Dense_1",
      features_fn=lambda p, x: cnn.apply(p, x, method=_client.CNN.features),
      tail_fn=lambda p, z: _client.hidden_features(p, z, 1),
      next_layer="params/Dense_1",
    )
  if model == "mlp":
    net = _client.MLP(widths=(width,) * depth, num_classes=num_classes)
    return _clients.ModelSpec(
      apply_fn=net.apply,
      params=_client.init_mlp(key, net, inputs.shape[1], dtype),
      layer=f"params/Dense_{layer}",
      head=f"params/Dense_{depth}",
      features_fn=(
        None
        if layer == 0
        else lambda p, x: _client.hidden_features(p, x, layer)
      ),
      tail_fn=lambda p, z: _client.hidden_features(p, z, depth, start=layer),
      next_layer=f"params/Dense_{layer + 1}",
    )
  raise ValueError(f"Unknown model {model!r}; use 'mlp', 'cnn' or a factory.")


def _simulate(model, key, image_set, inputs, labels, shape, client):
  """The client round of ``run_trial``; returns (update, model spec)."""
  width, _, _, num_classes = shape
  if callable(model):
    spec = model(key, inputs.shape[1], width, num_classes, inputs.dtype)
    if not isinstance(spec, _clients.ModelSpec):
      raise TypeError("a model factory must return a spear_jax.fl.ModelSpec.")
  else:
    spec = _builtin_model(model, key, image_set, inputs, shape)
  update = _clients.simulate_client(
    spec.apply_fn,
    spec.params,
    inputs,
    labels,
    layer=spec.layer,
    key=jax.random.fold_in(key, 1),
    client=client,
    features_fn=spec.features_fn or (lambda p, x: x),
  )
  return update, spec


def _score_labels(update, spec, result, per_sample, labels, client):
  """Labels of the recovered samples from the classifier's update, scored."""
  if spec.head is None or spec.tail_fn is None:
    return {"label_reason": "no classifier (head, tail_fn) given."}
  params = spec.params
  weight, bias = dense_layer(params, spec.head)
  weight_grad, bias_grad = dense_layer(update.update, spec.head)
  if client.mode == "fedavg" and client.sign == "client_minus_server":
    weight_grad, bias_grad = -weight_grad, -bias_grad
  b = labels.shape[0]
  scale = None
  if client.mode == "fedsgd":
    scale = 1.0 / b if client.reduction == "mean" else 1.0
  head_inputs = spec.tail_fn(params, jnp.asarray(result.inputs))
  found = _labels.recover_labels(
    head_inputs, weight, bias, weight_grad, bias_grad, scale=scale
  )
  matched = np.asarray(per_sample["matched_row"])
  has_match = matched >= 0
  labels = np.where(has_match, found.labels[matched], -1)
  verified = has_match & found.verified[matched]
  truth = np.asarray(labels)
  per_sample["label"] = labels
  per_sample["true_label"] = truth
  per_sample["label_verified"] = verified
  return {
    "label_accuracy": _labels.label_accuracy(labels, truth),
    "labels_verified": int(verified.sum()),
    "label_reason": found.reason,
  }


def _run_baseline(update, spec, image_set, inputs, labels, key, config):
  """Gradient matching on the client's whole update, as an InversionResult."""
  apply_fn = spec.apply_fn

  def loss_fn(p, x):
    logits = apply_fn(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels
    ).mean()

  # The box of pixel values in [0, 1], normalized per channel (the
  # flattened layout is (H, W, C): channels vary fastest).
  channels = image_set.image_shape[-1]
  shape = (channels,)
  mean = np.broadcast_to(np.asarray(image_set.mean, np.float64), shape)
  std = np.broadcast_to(np.asarray(image_set.std, np.float64), shape)
  pixels = inputs.shape[1] // channels
  low, high = np.tile(-mean / std, pixels), np.tile((1.0 - mean) / std, pixels)
  found = _baseline.gradient_matching(
    loss_fn,
    spec.params,
    update.update,
    key=key,
    shape=inputs.shape,
    image_shape=image_set.image_shape,
    bounds=(jnp.asarray(low, inputs.dtype), jnp.asarray(high, inputs.dtype)),
    config=config,
    dtype=inputs.dtype,
  )
  m, n = update.weight.shape
  result = _nothing(m, n, inputs.shape[0], inputs.dtype, "steps", "none")
  return result._replace(
    inputs=found.inputs, stats=result.stats._replace(seconds=found.seconds)
  )


def _nothing(m, n, b, dtype, stop_reason, check) -> InversionResult:
  """An uncertified result with NaN inputs (for the non-SPEAR outcomes)."""
  return InversionResult(
    inputs=jnp.full((b, n), jnp.nan, dtype),
    grad_z=jnp.zeros((m, b), dtype),
    verified=jnp.zeros((b,), bool),
    success=False,
    directions=jnp.zeros((b, b), dtype),
    sparsity=jnp.zeros((b,), jnp.int32),
    candidates=np.zeros((0, b)),
    stats=InversionStats(
      proposals=0,
      candidates=0,
      blocks=0,
      seconds=0.0,
      rank=b,
      alive_rows=m,
      threshold=0,
      tau=0.0,
      stop_reason=stop_reason,
      check=check,
    ),
  )


def _client_record(client, batch_size):
  record: dict[str, Any] = {"client": client.mode}
  if client.mode == "fedavg":
    record.update(
      local_epochs=client.local_epochs,
      local_batch_size=client.local_batch_size or batch_size,
      local_lr=client.learning_rate,
      sign=client.sign,
    )
  elif client.mode == "dpsgd":
    record.update(
      clip_norm=client.clip_norm,
      noise_multiplier=client.noise_multiplier,
      dp_epsilon=_clients.dp_epsilon(client.noise_multiplier),
      dp_delta=1e-5,
    )
  return record


_PER_SAMPLE = (
  "relative_error",
  "max_abs_error",
  "exact",
  "mse",
  "psnr",
  "ssim",
)


def _jsonable(value):
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  return value


def trial_record(result: dict[str, Any], **extra: Any) -> dict[str, Any]:
  """A flat JSON record of a trial for logs and summaries.

  Drops the arrays and the per-sample lists; keeps the setting, the
  per-batch scores (``exact_batch``, ``mean_psnr``, ``mean_ssim``,
  ``max_relative_error``, ...), the stop reason and the attack's stats
  (prefixed ``stats_``) next to ``extra`` (e.g. seed and trial).
  """
  record = {
    k: v
    for k, v in result.items()
    if k not in ("arrays", "per_sample", "stats")
  }
  stats = dict(result["stats"])
  record["stop_reason"] = stats.pop("stop_reason")
  record.update({f"stats_{k}": v for k, v in stats.items()})
  record.update(extra)
  return record
