"""Matching reconstructions to the ground truth, and how good they are.

A gradient does not reveal the order of the batch, so reconstructions are
first matched to the true samples by an optimal assignment on relative L2
distances (``scipy.optimize.linear_sum_assignment``). Each matched pair is
then scored in the normalized input space the attack works in (relative L2
error, max abs error, an exact flag) and, for images, in the de-normalized
``[0, 1]`` pixel space that image reconstruction papers report: ``mse``,
``psnr`` and ``ssim``, named as in the breaching library.
:func:`aggregate_trials` pools the scores of many attacked batches into the
exact-batch rate and mean metrics.

``mse``, ``psnr`` and ``ssim`` wrap the ``dm_pix`` image metrics with the
conventions of this module (a leading batch axis, a PSNR cap, a shrinking
SSIM window); they are undecorated and jit-able. Matching and scoring run
in numpy float64 on the host.
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array
from jaxtyping import ArrayLike
from jaxtyping import Float
import numpy as np

from spear_jax._certificate import identifiable_inputs

__all__ = [
  "EXACT_RTOL",
  "PSNR_MAX_DB",
  "aggregate_trials",
  "denormalize_images",
  "hungarian",
  "identifiable_samples",
  "independent_samples",
  "match_and_score",
  "mse",
  "near_duplicates",
  "psnr",
  "score_reconstruction",
  "ssim",
]

# A sample is exact if its relative L2 error is below this (float64 runs).
EXACT_RTOL = 1e-8
# Cap of the PSNR: an RMS error of 1e-5 of the data range. 8-bit
# quantization alone gives about 59 dB, so any capped value means "no error
# visible at any bit depth"; whether it is exact is the ``exact`` flag.
PSNR_MAX_DB = 100.0
# Relative distance from the other samples' span below which a sample is
# numerically dependent (:func:`independent_samples`).
INDEPENDENCE_RTOL = 1e-6


def hungarian(cost: np.ndarray) -> np.ndarray:
  """Minimum-cost perfect matching of a square cost matrix.

  A thin wrapper over :func:`scipy.optimize.linear_sum_assignment`.

  Args:
    cost: ``(b, b)`` costs; ``cost[i, j]`` of assigning row ``i`` to ``j``
      (``inf`` forbids the pair).

  Returns:
    ``assignment`` with ``assignment[i]`` the column of row ``i``.

  Raises:
    ValueError: if ``cost`` is not square, or (from scipy) contains NaN or
      admits no assignment of finite cost.
  """
  cost = np.asarray(cost, np.float64)
  if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
    raise ValueError(f"cost must be square, got {cost.shape}.")
  from scipy import optimize  # lazy: 0.9 s of import

  rows, columns = optimize.linear_sum_assignment(cost)
  assignment = np.empty(cost.shape[0], int)
  assignment[rows] = columns
  return assignment


def match_and_score(recovered_bxn, truth_bxn, exact_rtol: float = EXACT_RTOL):
  """Matches recovered samples to the truth and scores each one.

  Args:
    recovered_bxn: reconstructions, one per row, in any order.
    truth_bxn: ground truth, one per row.
    exact_rtol: a sample is exact if its relative L2 error is below this
      (an all-zero sample's error is relative to the batch's mean norm).

  Returns:
    A dict with ``order`` (the truth row of each reconstruction),
    ``relative_error`` and ``max_abs_error`` per reconstruction, and
    ``exact`` flags.
  """
  rec = np.asarray(recovered_bxn, np.float64)
  true = np.asarray(truth_bxn, np.float64)
  if rec.shape != true.shape:
    raise ValueError(f"shape mismatch: {rec.shape} vs {true.shape}.")
  norms = np.linalg.norm(true, axis=1)
  # An all-zero sample (a black image in [0, 1] pixels) is measured on the
  # scale of the batch's other samples.
  scale = np.mean(norms[norms > 0]) if np.any(norms > 0) else 1.0
  norms = np.where(norms > 0, norms, scale)
  diff = rec[:, None, :] - true[None, :, :]
  rel = np.linalg.norm(diff, axis=2) / norms[None, :]
  rel = np.where(np.isfinite(rel), rel, 1e300)
  order = hungarian(_exact_first(rel, exact_rtol))
  relative_error = rel[np.arange(rec.shape[0]), order]
  max_abs = np.max(np.abs(rec - true[order]), axis=1)
  return {
    "order": order,
    "relative_error": relative_error,
    "max_abs_error": max_abs,
    "exact": relative_error < exact_rtol,
  }


def _float_pair(images: ArrayLike, reference: ArrayLike) -> tuple[Array, Array]:
  """Both arrays as one floating dtype; raises on a shape mismatch."""
  images = jnp.asarray(images)
  reference = jnp.asarray(reference)
  if images.shape != reference.shape:
    raise ValueError(
      f"images and reference must have the same shape, got {images.shape}"
      f" and {reference.shape}."
    )
  if images.ndim < 1:
    raise ValueError("images must have a leading batch axis.")
  with jax.numpy_dtype_promotion("standard"):
    dtype = jnp.promote_types(images.dtype, reference.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
  return images.astype(dtype), reference.astype(dtype)


def _as_nhwc(*arrays: Array) -> tuple[Array, ...]:
  """Each sample flattened to a ``(d, 1, 1)`` image, the layout of dm_pix.

  dm_pix averages over the last three axes, so this gives the mean over
  every entry of a sample whatever its shape.
  """
  b = arrays[0].shape[0]
  d = math.prod(arrays[0].shape[1:])
  return tuple(a.reshape(b, d, 1, 1) for a in arrays)


def mse(images: ArrayLike, reference: ArrayLike) -> Float[Array, " b"]:
  r"""Mean squared error of each sample.

  .. math:: \mathrm{MSE}_i = \frac{1}{d} \sum_p (x_{ip} - y_{ip})^2

  over the ``d`` entries of sample ``i`` (every axis but the first).

  Args:
    images: samples, the first axis indexing them (any further shape).
    reference: the reference samples, same shape.

  Returns:
    The mean squared error of each sample.

  Raises:
    ValueError: if the shapes differ or there is no batch axis.

  Examples:
    >>> import numpy as np
    >>> mse(np.zeros((2, 3)), np.full((2, 3), 0.5)).tolist()
    [0.25, 0.25]
  """
  images, reference = _float_pair(images, reference)
  import dm_pix  # lazy, like scipy: a fast `import spear_jax`

  return dm_pix.mse(*_as_nhwc(images, reference))


def psnr(
  images: ArrayLike,
  reference: ArrayLike,
  data_range: float = 1.0,
  max_db: float = PSNR_MAX_DB,
) -> Float[Array, " b"]:
  r"""Peak signal-to-noise ratio of each sample, capped at ``max_db``.

  .. math:: \mathrm{PSNR}_i = \min\Bigl(10 \log_{10}
     \frac{R^2}{\mathrm{MSE}_i}, \ \mathrm{max\_db}\Bigr)

  with ``R = data_range``. The cap keeps a perfect reconstruction
  (``MSE = 0``) finite, so means over samples stay meaningful; a capped
  value says "below ``R * 10**(-max_db / 20)`` RMS error", not "exact" (use
  the ``exact`` flag of :func:`score_reconstruction` for that). Inputs are
  not clipped here. A NaN in a sample gives a NaN PSNR. Computed as
  ``dm_pix.psnr`` (which assumes ``R = 1``) plus ``20 log10(R)``.

  Args:
    images: samples, the first axis indexing them.
    reference: the reference samples, same shape.
    data_range: ``R``, the span of the pixel values (1 for ``[0, 1]``
      images, 255 for 8-bit).
    max_db: the cap, by default :data:`PSNR_MAX_DB` (100 dB).

  Returns:
    The PSNR of each sample, in dB.

  Raises:
    ValueError: if the shapes differ or there is no batch axis.

  Examples:
    >>> import numpy as np
    >>> db = psnr(np.zeros((2, 4)), np.full((2, 4), 0.1))
    >>> np.round(db, 6).tolist()
    [20.0, 20.0]
  """
  images, reference = _float_pair(images, reference)
  # dm_pix assumes a data range of 1: -10 log10(MSE). A zero MSE gives +inf,
  # which the cap turns into max_db; a NaN stays NaN.
  import dm_pix

  db = dm_pix.psnr(*_as_nhwc(images, reference))
  db = db + 20.0 * jnp.log10(jnp.asarray(data_range, db.dtype))
  return jnp.minimum(db, max_db)


def _ssim_window_size(win_size: int, height: int, width: int) -> int:
  """The SSIM window side: ``win_size``, shrunk to fit a small image."""
  if win_size < 1 or win_size % 2 == 0:
    raise ValueError(f"win_size must be odd and positive, got {win_size}.")
  side = min(height, width)
  return min(win_size, side if side % 2 else side - 1)


def ssim(
  images: ArrayLike,
  reference: ArrayLike,
  data_range: float = 1.0,
  *,
  win_size: int = 11,
  sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> Float[Array, " b"]:
  r"""Structural similarity (Wang et al. 2004) of each image.

  With Gaussian-weighted local statistics over each window,

  .. math:: \mathrm{SSIM}(x, y) = \frac{(2 \mu_x \mu_y + C_1)
     (2 \sigma_{xy} + C_2)}{(\mu_x^2 + \mu_y^2 + C_1)
     (\sigma_x^2 + \sigma_y^2 + C_2)},
     \quad C_1 = (k_1 R)^2, \ C_2 = (k_2 R)^2,

  averaged over every window position that lies fully inside the image
  ('valid' filtering, as the reference MATLAB code and
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  use_sample_covariance=False)`` do) and over the channels. The window is a
  ``win_size x win_size`` Gaussian of standard deviation ``sigma``
  (normalized to sum 1).

  Small images: when an image side is shorter than ``win_size`` (e.g. 8x8
  digits), the window shrinks to the largest odd size that fits (7 for 8x8,
  leaving 2x2 positions; 1 for a 1x1 image, where SSIM reduces to the
  luminance term) and keeps the same ``sigma``, truncated to the smaller
  window and renormalized. skimage refuses such images instead.

  Computed by ``dm_pix.ssim`` (separable 'valid' Gaussian filtering at
  ``HIGHEST`` precision). dm_pix floors the local variances at float32
  ``eps**2`` (about 1.4e-14), so on flat windows (constant images, a 1x1
  image) the value is off by up to ``2 eps**2 / C_2`` (3.2e-11 for
  ``R = 1``); elsewhere it agrees with skimage to rounding (float64). The
  result has the dtype of the (promoted) images.

  Args:
    images: ``(b, H, W, C)`` images.
    reference: ``(b, H, W, C)`` reference images.
    data_range: ``R``, the span of pixel values (1 for ``[0, 1]``).
    win_size: odd side of the Gaussian window (11 in the paper).
    sigma: standard deviation of the window, in pixels (1.5 in the paper).
    k1: luminance stabilizer (0.01 in the paper).
    k2: contrast stabilizer (0.03 in the paper).

  Returns:
    The mean SSIM of each image, in ``[-1, 1]`` (1 iff equal up to the
    stabilizers).

  Raises:
    ValueError: if the shapes differ, the images are not 4-D, or
      ``win_size`` is not odd and positive.

  Examples:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).random((2, 16, 16, 3))
    >>> np.allclose(ssim(x, x), 1.0)
    True

  References:
    Wang, Bovik, Sheikh, Simoncelli. Image quality assessment: from error
    visibility to structural similarity. IEEE TIP 13(4), 2004.
  """
  import dm_pix

  x, y = _float_pair(images, reference)
  if x.ndim != 4:
    raise ValueError(f"ssim needs (b, H, W, C) images, got shape {x.shape}.")
  height, width = x.shape[1], x.shape[2]
  size = _ssim_window_size(win_size, height, width)
  # dm_pix builds its Gaussian taps in the default float dtype (float64
  # under x64), so float32 images need standard promotion; the result keeps
  # the dtype of the images.
  with jax.numpy_dtype_promotion("standard"):
    value = dm_pix.ssim(
      x,
      y,
      max_val=data_range,
      filter_size=size,
      filter_sigma=sigma,
      k1=k1,
      k2=k2,
      precision=jax.lax.Precision.HIGHEST,
    )
  return value.astype(x.dtype)


def denormalize_images(
  inputs_bxn: ArrayLike,
  image_shape: Sequence[int],
  mean: ArrayLike | None = None,
  std: ArrayLike | None = None,
  *,
  clip: bool = True,
) -> np.ndarray:
  """Flat normalized inputs back to ``(b, H, W, C)`` images in ``[0, 1]``.

  ``images = inputs * std + mean`` (per channel, broadcast against
  ``(H, W, C)``), the inverse of :func:`spear_jax._data.sample_batch`'s
  normalization, then clipped to ``[0, 1]`` as breaching does before
  scoring or showing a reconstruction.

  Args:
    inputs_bxn: flattened inputs, one sample per row (row-major ``H, W,
      C``).
    image_shape: ``(H, W, C)``.
    mean: per-channel mean, or ``None`` for 0.
    std: per-channel standard deviation, or ``None`` for 1.
    clip: whether to clip to ``[0, 1]``.

  Returns:
    float64 images ``(b, H, W, C)``.

  Raises:
    ValueError: if ``image_shape`` is not ``(H, W, C)`` or does not match
      the rows.
  """
  inputs = np.asarray(inputs_bxn, np.float64)
  image_shape = tuple(int(d) for d in image_shape)
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (H, W, C), got {image_shape}.")
  if inputs.ndim != 2 or inputs.shape[1] != math.prod(image_shape):
    raise ValueError(
      f"inputs of shape {inputs.shape} are not flattened images of shape"
      f" {image_shape}."
    )
  images = inputs.reshape((inputs.shape[0],) + image_shape)
  if std is not None:
    images = images * np.asarray(std, np.float64)
  if mean is not None:
    images = images + np.asarray(mean, np.float64)
  return np.clip(images, 0.0, 1.0) if clip else images


def _exact_first(cost: np.ndarray, exact_rtol: float) -> np.ndarray:
  """Matching costs that keep as many exact pairs as any matching has.

  Every pair at or above ``exact_rtol`` costs more than all exact pairs
  together, so the minimum-cost matching first maximizes the exact pairs
  and then the error. Two reconstructions of one sample (an unidentifiable
  twin recovered as its partner) otherwise could push the exact one onto
  the twin, relative errors dividing by different norms.
  """
  finite = np.isfinite(cost) & (cost < 1e300)
  penalty = 1.0 + cost.shape[0] * np.max(np.where(finite, cost, 0.0))
  return np.where(cost < exact_rtol, cost, cost + penalty)


def _match_rows(
  rec_rxn: np.ndarray, true_bxn: np.ndarray, exact_rtol: float = EXACT_RTOL
) -> np.ndarray:
  """The recovered row matched to each truth row (-1 for none).

  Minimizes the summed relative L2 distance with :func:`hungarian`, exact
  pairs first (:func:`_exact_first`), the cost matrix padded to a square
  with a constant when the counts differ (which does not change the
  optimal assignment of the real pairs).
  """
  r, b = rec_rxn.shape[0], true_bxn.shape[0]
  if r == 0:
    return np.full(b, -1, int)
  rec_sq = np.sum(rec_rxn * rec_rxn, axis=1)
  true_sq = np.sum(true_bxn * true_bxn, axis=1)
  dist_sq = rec_sq[:, None] + true_sq[None, :] - 2.0 * (rec_rxn @ true_bxn.T)
  norms = np.maximum(np.sqrt(true_sq), np.finfo(np.float64).tiny)
  cost = np.sqrt(np.maximum(dist_sq, 0.0)) / norms[None, :]
  # The expansion loses about sqrt(eps) to cancellation; near pairs are
  # measured directly.
  for i, j in np.argwhere(cost < 1e-6):
    cost[i, j] = np.linalg.norm(rec_rxn[i] - true_bxn[j]) / norms[j]
  cost = _exact_first(cost, exact_rtol)
  finite = np.isfinite(cost)
  big = 1.0 + 2.0 * (np.max(cost[finite]) if finite.any() else 0.0)
  size = max(r, b)
  square = np.full((size, size), big)
  square[:r, :b] = np.where(finite, cost, big)
  truth_of_row = hungarian(square)[:r]
  matched = np.full(b, -1, int)
  real = truth_of_row < b
  matched[truth_of_row[real]] = np.arange(r)[real]
  return matched


def near_duplicates(
  batch_bxn: ArrayLike, thresholds: Sequence[float] = (0.95, 0.98)
) -> dict[str, float]:
  r"""How alike the samples of a batch are: the near-twin statistics.

  Near-duplicate samples (dark crops, video frames, faces) share most of
  their ReLU zero sets, the hard case of SPEAR and SPEAR++. For the inputs
  as the network sees them (flattened, after normalization), the cosine of
  every pair of samples is computed; for each threshold ``t`` the result
  gives the share of samples that have a partner with cosine above ``t``.

  Args:
    batch_bxn: the batch, one sample per row.
    thresholds: cosine thresholds.

  Returns:
    ``{"near_duplicates_095": share, ..., "max_pair_cosine": c}`` with the
    threshold's two decimals in the key; ``max_pair_cosine`` is NaN for a
    single sample.
  """
  x = np.asarray(batch_bxn, np.float64)
  x = x.reshape(x.shape[0], -1)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  unit = x / np.where(norms > 0, norms, 1.0)
  cosine = unit @ unit.T
  np.fill_diagonal(cosine, -np.inf)
  partner = cosine.max(axis=1) if x.shape[0] > 1 else np.full(1, np.nan)
  out = {
    f"near_duplicates_{round(100 * t):03d}": float(np.mean(partner > t))
    for t in thresholds
  }
  out["max_pair_cosine"] = float(np.max(partner))
  return out


def identifiable_samples(grad_z_mxb: ArrayLike) -> np.ndarray:
  """Which samples a batch's first-layer gradient can pin down at all.

  The truth-side twin of the attack's own test
  (:func:`spear_jax.attack.identifiable_inputs`, read there off the
  recovered batch): from the true ``D = dL/dZ`` (exact ReLU zeros), with
  ``L`` the left singular vectors of ``D`` and ``Q = L^T D``. A sample is
  not identifiable when near-twins let its input slide or be traded while
  the weight gradient, the bias gradient and every ReLU pattern stay
  explained; no attack on this layer can then certify it. Used to report
  the cause of a failure beside the failure.

  Args:
    grad_z_mxb: the true ``D`` (``m x b``), float64.

  Returns:
    A boolean per sample.
  """
  d = np.asarray(grad_z_mxb, np.float64)
  b = d.shape[1]
  u, _, _ = np.linalg.svd(d, full_matrices=False)
  l_mxb = u[:, :b]
  eps = np.finfo(np.float64).eps
  return np.asarray(
    identifiable_inputs(
      jnp.asarray(d),
      jnp.asarray(l_mxb.T @ d),
      jnp.asarray(l_mxb),
      jnp.asarray(np.any(d != 0, axis=1)),
      jnp.asarray(1e-12),
      jnp.asarray(np.sqrt(eps)),
      jnp.asarray(eps ** (1 / 3)),
    )
  )


def independent_samples(
  inputs_bxn: ArrayLike, *, rtol: float = INDEPENDENCE_RTOL
) -> np.ndarray:
  """Which inputs float64 can tell apart from the other samples' span.

  A sample whose input lies within relative distance ``delta`` of the
  span of the others (``dist(x_i, span{x_j, j != i}) / |x_i| < rtol``)
  is numerically dependent: its component the gradient carries is
  ``delta`` of its norm, so the gradient's own rounding (``eps`` of its
  norm) moves its recovery by about ``eps / delta``, amplified by the
  conditioning of ``D``. Below ``rtol = 1e-6`` that is beyond the
  ``1e-8`` of an exact sample for any attack in float64: frames of one
  scene that differ only by a brightness gain (``x``, ``g1 x``, ``g2 x``
  normalized with one mean are dependent up to the float32 rounding of
  the images). The truth-side twin of :func:`identifiable_samples`, which
  judges the zero sets; this judges the inputs.

  Args:
    inputs_bxn: the true inputs, one per row.
    rtol: the relative distance below which a sample is dependent.

  Returns:
    A boolean per sample.
  """
  x = np.asarray(inputs_bxn, np.float64)
  b, n = x.shape
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  if b > n or not s[-1] > 0:
    # Rank below b: row i of U S^-1 is only meaningful on the kernel
    # complement; solve each sample against the others instead.
    return np.asarray([_distance_to_others(x, i) for i in range(b)]) >= (
      rtol * np.linalg.norm(x, axis=1)
    )
  # Row i of pinv(X^T) = U S^-1 V^T has norm 1 / dist(x_i, span others).
  distance = 1.0 / np.linalg.norm(u / s, axis=1)
  return distance >= rtol * np.linalg.norm(x, axis=1)


def _distance_to_others(x_bxn: np.ndarray, i: int) -> float:
  others = np.delete(x_bxn, i, axis=0).T
  coef = np.linalg.lstsq(others, x_bxn[i], rcond=None)[0]
  return float(np.linalg.norm(others @ coef - x_bxn[i]))


def score_reconstruction(
  recovered_bxn: ArrayLike,
  truth_bxn: ArrayLike,
  *,
  image_shape: Sequence[int] | None = None,
  mean: ArrayLike | None = None,
  std: ArrayLike | None = None,
  exact_rtol: float = EXACT_RTOL,
  max_db: float = PSNR_MAX_DB,
) -> dict[str, Any]:
  r"""Matches a reconstructed batch to the truth and scores every sample.

  Reconstructions are matched to true samples by :func:`hungarian` on the
  relative L2 distance. For each true sample ``x`` with matched
  reconstruction ``\hat x`` (both normalized, flat):

  * ``relative_error = ||\hat x - x|| / ||x||``, ``max_abs_error =
    max |\hat x - x|``, and ``exact = relative_error < exact_rtol``;
  * for images, with both de-normalized by :func:`denormalize_images`
    (clipped to ``[0, 1]``, as breaching does): ``mse``, ``psnr`` (capped at
    ``max_db``) and ``ssim`` (data range 1);
  * without ``image_shape``: ``mse`` on the inputs (de-normalized with
    ``mean`` and ``std`` if given, not clipped); no ``psnr`` or ``ssim``.

  If fewer samples were recovered than the truth has, the unmatched true
  samples are scored against an all-zero normalized input (the dataset
  mean, the guess of an attacker without information) and are never exact;
  extra recovered samples are left unmatched. Non-finite reconstructions
  give NaN metrics.

  Args:
    recovered_bxn: the ``r`` reconstructions, flat rows, in any order.
    truth_bxn: the ``b`` true inputs, flat rows.
    image_shape: ``(H, W, C)`` of one image, or ``None`` for non-images.
    mean: per-channel normalization mean (``None``: 0).
    std: per-channel normalization standard deviation (``None``: 1).
    exact_rtol: a sample is exact if its relative error is below this;
      the default :data:`EXACT_RTOL` (1e-8) suits float64 attacks, pass a
      looser one (e.g. 1e-4) for float32.
    max_db: the PSNR cap, in dB.

  Returns:
    A dict. Per true sample, in truth order (numpy arrays of length ``b``):
    ``matched_row`` (the recovered row, -1 if none), ``relative_error``,
    ``max_abs_error``, ``exact``, ``mse``, and for images ``psnr`` and
    ``ssim``. Aggregates (Python scalars): ``batch_size``,
    ``num_recovered``, ``exact_samples`` (number exact), ``exact_batch``
    (every sample exact), ``exact_rtol``, ``mean_relative_error``,
    ``max_relative_error``, ``max_abs_error_overall``, ``mean_mse``, and
    for images ``mean_psnr``, ``mean_ssim`` and ``psnr_max_db``. It is
    JSON-serializable once the arrays are converted with ``.tolist()``.

  Raises:
    ValueError: on shapes that are not ``(r, n)`` and ``(b, n)``, an empty
      truth, or an ``image_shape`` that does not match ``n``.

  Examples:
    >>> import numpy as np
    >>> truth = np.random.default_rng(0).standard_normal((3, 12))
    >>> scores = score_reconstruction(truth[[2, 0, 1]], truth,
    ...                               image_shape=(2, 2, 3))
    >>> scores["matched_row"].tolist(), scores["exact_batch"]
    ([1, 2, 0], True)
  """
  rec = np.asarray(recovered_bxn, np.float64)
  true = np.asarray(truth_bxn, np.float64)
  if rec.ndim != 2 or true.ndim != 2 or rec.shape[1] != true.shape[1]:
    raise ValueError(
      "recovered and truth must be (r, n) and (b, n) with the same n, got"
      f" {rec.shape} and {true.shape}."
    )
  b, n = true.shape
  if b == 0 or n == 0:
    raise ValueError(f"truth must be non-empty, got shape {true.shape}.")
  matched_row = _match_rows(rec, true, exact_rtol)
  has_match = matched_row >= 0
  aligned = np.zeros_like(true)
  aligned[has_match] = rec[matched_row[has_match]]
  diff = aligned - true
  norms = np.linalg.norm(true, axis=1)
  relative_error = np.linalg.norm(diff, axis=1) / np.maximum(
    norms, np.finfo(np.float64).tiny
  )
  exact = has_match & (relative_error < exact_rtol)
  scores = {
    "matched_row": matched_row,
    "relative_error": relative_error,
    "max_abs_error": np.max(np.abs(diff), axis=1),
    "exact": exact,
  }
  if image_shape is not None:
    rec_images = denormalize_images(aligned, image_shape, mean, std)
    true_images = denormalize_images(true, image_shape, mean, std)
    scores["mse"] = np.asarray(mse(rec_images, true_images), np.float64)
    scores["psnr"] = np.asarray(
      psnr(rec_images, true_images, 1.0, max_db), np.float64
    )
    scores["ssim"] = np.asarray(ssim(rec_images, true_images, 1.0), np.float64)
  else:
    scale = 1.0 if std is None else np.asarray(std, np.float64)
    scores["mse"] = np.mean(np.square(diff * scale), axis=1)
  scores.update(
    {
      "batch_size": b,
      "num_recovered": rec.shape[0],
      "exact_samples": int(exact.sum()),
      "exact_batch": bool(exact.all()),
      "exact_rtol": float(exact_rtol),
      "mean_relative_error": float(np.mean(relative_error)),
      "max_relative_error": float(np.max(relative_error)),
      "max_abs_error_overall": float(np.max(scores["max_abs_error"])),
      "mean_mse": float(np.mean(scores["mse"])),
      **near_duplicates(true),
    }
  )
  if image_shape is not None:
    scores["mean_psnr"] = float(np.mean(scores["psnr"]))
    scores["mean_ssim"] = float(np.mean(scores["ssim"]))
    scores["psnr_max_db"] = float(max_db)
  return scores


def aggregate_trials(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Pools the scores of several attacked batches.

  Each trial is a dict from :func:`score_reconstruction` (or the same dict
  after a JSON round trip, lists in place of arrays). Means are over all
  samples of all trials pooled, so every sample weighs the same.

  Args:
    trials: the per-trial scores.

  Returns:
    A dict of Python scalars: ``trials``, ``samples``, ``exact_batches``,
    ``exact_batch_rate`` (fraction of trials whose whole batch is exact),
    ``exact_samples``, ``exact_sample_rate``, ``mean_relative_error``,
    ``max_relative_error``, ``mean_mse``, and ``mean_psnr`` and
    ``mean_ssim`` when every trial has them.

  Raises:
    ValueError: if ``trials`` is empty.
  """
  if not trials:
    raise ValueError("aggregate_trials needs at least one trial.")

  def pooled(name):
    return np.concatenate(
      [np.asarray(t[name], np.float64).reshape(-1) for t in trials]
    )

  exact = pooled("exact")
  relative_error = pooled("relative_error")
  exact_batches = sum(bool(np.all(np.asarray(t["exact"]))) for t in trials)
  result = {
    "trials": len(trials),
    "samples": int(exact.size),
    "exact_batches": exact_batches,
    "exact_batch_rate": exact_batches / len(trials),
    "exact_samples": int(exact.sum()),
    "exact_sample_rate": float(exact.mean()),
    "mean_relative_error": float(relative_error.mean()),
    "max_relative_error": float(relative_error.max()),
    "mean_mse": float(pooled("mse").mean()),
  }
  for name in ("psnr", "ssim"):
    if all(name in t for t in trials):
      result[f"mean_{name}"] = float(pooled(name).mean())
  return result
