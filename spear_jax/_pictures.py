"""Pictures of reconstructions: PNG files, image grids, error heatmaps.

:func:`image_grid` lays out a ground-truth row above a reconstruction row,
as in Figure 1 of the SPEAR paper, and can frame the reconstructions that
are not exact; :func:`error_heatmap` shows ``|error|`` per sample and
feature for inputs that are not images. The pictures are numpy arrays;
:func:`encode_png` and :func:`write_png` save them with Pillow.

References:
  Dimitrov, Baader, Mueller, Vechev. SPEAR: Exact Gradient Inversion of
  Batches in Federated Learning. NeurIPS 2024.
  https://arxiv.org/abs/2403.03945
"""

import io
import math
import os

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

__all__ = [
  "colormap",
  "encode_png",
  "error_heatmap",
  "image_grid",
  "save_error_heatmap",
  "save_image_grid",
  "write_png",
]

# Five samples of matplotlib's viridis at 0, 1/4, 1/2, 3/4 and 1; their
# luminance increases, so the linear interpolation between them does too.
_VIRIDIS_5 = np.array(
  [
    [68, 1, 84],
    [59, 82, 139],
    [33, 145, 140],
    [94, 201, 98],
    [253, 231, 37],
  ],
  np.float64,
)


def _pil_image(image: ArrayLike) -> Image.Image:
  """An 8-bit grayscale (``L``) or RGB Pillow image; raises on others."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"PNG images must be uint8, got {image.dtype}.")
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[:, :, 0]
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
    raise ValueError(
      f"PNG images must be (H, W), (H, W, 1) or (H, W, 3), got {image.shape}."
    )
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"PNG images must be non-empty, got {image.shape}.")
  return Image.fromarray(np.ascontiguousarray(image))


def encode_png(image: ArrayLike, compression: int = 6) -> bytes:
  """Encodes an 8-bit grayscale or RGB image as PNG bytes (with Pillow).

  Args:
    image: uint8 ``(H, W)`` or ``(H, W, 1)`` (grayscale) or ``(H, W, 3)``
      (RGB).
    compression: zlib level, 0 to 9.

  Returns:
    The PNG file contents: bit depth 8, color type 0 (grayscale) or 2
    (RGB), not interlaced.

  Raises:
    ValueError: if the image is not uint8, has another shape, or is empty.
  """
  buffer = io.BytesIO()
  _pil_image(image).save(buffer, format="PNG", compress_level=compression)
  return buffer.getvalue()


def write_png(path: str | os.PathLike[str], image: ArrayLike) -> None:
  """Writes an 8-bit grayscale or RGB image to a PNG file (with Pillow).

  Args:
    path: the file to write (overwritten).
    image: uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``.

  Raises:
    ValueError: as :func:`encode_png`.

  Examples:
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "ramp.png")
    >>> write_png(path, np.arange(256, dtype=np.uint8).reshape(16, 16))
  """
  _pil_image(image).save(path, format="PNG")


def _check_images(name: str, images: np.ndarray) -> None:
  if images.ndim != 4 or images.shape[3] not in (1, 3):
    raise ValueError(
      f"{name} must be (b, H, W, C) images with C in {{1, 3}}, got shape"
      f" {images.shape}."
    )
  if not np.all(np.isfinite(images)):
    raise ValueError(f"{name} contains NaN or infinite values.")


def _to_uint8(images: np.ndarray) -> np.ndarray:
  """``[0, 1]`` floats to uint8, values outside clipped."""
  return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def image_grid(
  truth_images: ArrayLike,
  recovered_images: ArrayLike,
  *,
  exact: ArrayLike | None = None,
  max_columns: int = 16,
  min_tile: int = 64,
  scale: int | None = None,
  pad: int = 6,
  background: int = 255,
  mark_color: tuple[int, int, int] = (255, 0, 0),
) -> np.ndarray:
  """Ground truth above reconstruction, tile by tile (Figure 1 of SPEAR).

  Sample ``i`` sits in row pair ``i // columns`` and column ``i % columns``
  with ``columns = min(b, max_columns)``; in each pair the upper row shows
  the truth, the lower the reconstruction. Images are upscaled by the
  integer nearest-neighbour factor ``scale`` (default ``ceil(min_tile /
  max(H, W))``), so a tile is ``(H * scale, W * scale)``. With ``th, tw``
  the tile size, the top-left pixel of a tile is at

  * ``x = pad + column * (tw + pad)``,
  * ``y = pad + pair * (2 * th + 4 * pad) + row * (th + pad)``, row 0 for
    the truth and 1 for the reconstruction,

  so ``pad`` pixels of ``background`` separate the tiles and ``3 * pad``
  separate the row pairs; the grid is ``pad + pairs * (2 * th + 4 * pad) -
  2 * pad`` high and ``pad + columns * (tw + pad)`` wide. Empty slots of
  the last pair are background.

  Values outside ``[0, 1]`` are clipped (reconstructions of a failed attack
  overshoot; they are still worth seeing), then rounded to 8 bits.

  If ``exact`` is given, every reconstruction whose flag is false is
  framed in ``mark_color``: a ring ``max(1, pad // 3)`` pixels wide in the
  padding just outside its tile, so the image itself stays untouched.

  Args:
    truth_images: ``(b, H, W, C)`` true images in ``[0, 1]``, ``C`` 1 or 3.
    recovered_images: the reconstructions, same shape, matched to the truth
      (e.g. ``recovered[scores["matched_row"]]``).
    exact: optional ``(b,)`` booleans; false marks a reconstruction.
    max_columns: most samples per row pair.
    min_tile: the default ``scale`` makes tiles at least this many pixels
      along their longer side.
    scale: the upscaling factor, overriding ``min_tile``.
    pad: background pixels between tiles and around the grid.
    background: gray level of the padding, 0 to 255.
    mark_color: RGB of the frame of a reconstruction that is not exact.

  Returns:
    uint8 ``(height, width)`` for grayscale images without ``exact``,
    ``(height, width, 3)`` otherwise (RGB, grayscale replicated).

  Raises:
    ValueError: for images that are not ``(b, H, W, C)`` with ``C`` in {1,
      3}, mismatched shapes, an empty batch, NaN or infinite values, an
      ``exact`` that is not ``(b,)``, or non-positive ``max_columns``,
      ``min_tile`` or ``scale``, a negative ``pad``, or ``pad == 0`` with
      ``exact``.

  Examples:
    >>> import numpy as np
    >>> truth = np.random.default_rng(0).random((3, 8, 8, 1))
    >>> image_grid(truth, truth).shape
    (146, 216)
  """
  truth = np.asarray(truth_images, np.float64)
  recovered = np.asarray(recovered_images, np.float64)
  _check_images("truth_images", truth)
  _check_images("recovered_images", recovered)
  if truth.shape != recovered.shape:
    raise ValueError(
      f"truth_images {truth.shape} and recovered_images {recovered.shape}"
      " must have the same shape."
    )
  b, h, w, c = truth.shape
  if b == 0:
    raise ValueError("image_grid needs at least one image.")
  if max_columns < 1 or min_tile < 1 or (scale is not None and scale < 1):
    raise ValueError(
      "max_columns, min_tile and scale must be positive, got"
      f" {max_columns}, {min_tile} and {scale}."
    )
  if pad < 0:
    raise ValueError(f"pad must be non-negative, got {pad}.")
  if exact is not None:
    exact = np.asarray(exact, bool)
    if exact.shape != (b,):
      raise ValueError(f"exact must have shape ({b},), got {exact.shape}.")
    if pad == 0:
      raise ValueError("marking tiles needs pad >= 1.")
  if scale is None:
    scale = math.ceil(min_tile / max(h, w))
  th, tw = h * scale, w * scale
  columns = min(b, max_columns)
  pairs = math.ceil(b / columns)
  channels = 3 if (c == 3 or exact is not None) else 1
  grid = np.full(
    (
      pad + pairs * (2 * th + 4 * pad) - 2 * pad,
      pad + columns * (tw + pad),
      channels,
    ),
    background,
    np.uint8,
  )
  tiles = np.stack([_to_uint8(truth), _to_uint8(recovered)], axis=1)
  tiles = tiles.repeat(scale, axis=2).repeat(scale, axis=3)
  if channels == 3 and c == 1:
    tiles = np.broadcast_to(tiles, tiles.shape[:4] + (3,))
  mark = max(1, pad // 3)
  for i in range(b):
    pair, column = divmod(i, columns)
    x = pad + column * (tw + pad)
    for row in (0, 1):
      y = pad + pair * (2 * th + 4 * pad) + row * (th + pad)
      if row == 1 and exact is not None and not exact[i]:
        grid[y - mark : y + th + mark, x - mark : x + tw + mark] = mark_color
      grid[y : y + th, x : x + tw] = tiles[i, row]
  return grid[:, :, 0] if channels == 1 else grid


def save_image_grid(
  path: str | os.PathLike[str],
  truth_images: ArrayLike,
  recovered_images: ArrayLike,
  **kwargs,
) -> None:
  """Writes :func:`image_grid` of the images (same keywords) as a PNG.

  Args:
    path: the PNG file to write.
    truth_images: as :func:`image_grid`.
    recovered_images: as :func:`image_grid`.
    **kwargs: passed to :func:`image_grid`.
  """
  write_png(path, image_grid(truth_images, recovered_images, **kwargs))


def colormap(values: ArrayLike | float) -> np.ndarray:
  """Viridis-like colors: linear interpolation of five viridis samples.

  Args:
    values: numbers in ``[0, 1]`` (clipped), any shape.

  Returns:
    uint8 RGB colors, shape ``values.shape + (3,)``; 0 is dark purple, 1 is
    yellow, and the luminance increases monotonically in between.
  """
  values = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
  anchors = np.linspace(0.0, 1.0, len(_VIRIDIS_5))
  rgb = np.stack(
    [np.interp(values, anchors, _VIRIDIS_5[:, k]) for k in range(3)], axis=-1
  )
  return np.rint(rgb).astype(np.uint8)


def error_heatmap(
  recovered_bxn: ArrayLike,
  truth_bxn: ArrayLike,
  *,
  vmax: float | None = None,
  log_floor: float | None = None,
  row_height: int = 8,
  column_width: int = 1,
) -> np.ndarray:
  r"""``|recovered - truth|`` as a heatmap, one row per sample.

  Entry ``(i, j)`` is ``e = |recovered[i, j] - truth[i, j]|`` colored by
  :func:`colormap` of ``e / vmax`` (clipped to ``[0, 1]``), or, with
  ``log_floor`` (errors of exact recovery span many decades), of

  .. math:: \frac{\log_{10} \max(e, f) - \log_{10} f}
     {\log_{10} \max(v, f) - \log_{10} f}

  with ``f = log_floor`` and ``v = vmax``. ``vmax`` defaults to the
  largest error; if it is 0 (or at most ``log_floor``) every entry gets
  the lowest color.

  Args:
    recovered_bxn: reconstructions, flat rows, matched to the truth (e.g.
      ``recovered[scores["matched_row"]]``).
    truth_bxn: the true inputs, same shape.
    vmax: the error shown in the top color.
    log_floor: if given, a logarithmic scale from this error up.
    row_height: pixels per sample.
    column_width: pixels per feature.

  Returns:
    uint8 RGB ``(b * row_height, n * column_width, 3)``.

  Raises:
    ValueError: for shapes that are not the same ``(b, n)``, an empty
      array, NaN or infinite values, or non-positive ``row_height``,
      ``column_width``, ``vmax`` or ``log_floor``.

  Examples:
    >>> import numpy as np
    >>> error_heatmap(np.zeros((2, 5)), np.ones((2, 5))).shape
    (16, 5, 3)
  """
  rec = np.asarray(recovered_bxn, np.float64)
  true = np.asarray(truth_bxn, np.float64)
  if rec.ndim != 2 or rec.shape != true.shape or rec.size == 0:
    raise ValueError(
      "recovered_bxn and truth_bxn must be the same non-empty (b, n), got"
      f" {rec.shape} and {true.shape}."
    )
  if row_height < 1 or column_width < 1:
    raise ValueError(
      f"row_height and column_width must be positive, got {row_height} and"
      f" {column_width}."
    )
  for name, value in (("vmax", vmax), ("log_floor", log_floor)):
    if value is not None and not value > 0:
      raise ValueError(f"{name} must be positive, got {value}.")
  error = np.abs(rec - true)
  if not np.all(np.isfinite(error)):
    raise ValueError("the inputs contain NaN or infinite values.")
  top = float(error.max()) if vmax is None else float(vmax)
  if log_floor is None:
    values = error / top if top > 0 else np.zeros_like(error)
  else:
    span = math.log10(max(top, log_floor)) - math.log10(log_floor)
    logs = np.log10(np.maximum(error, log_floor)) - math.log10(log_floor)
    values = logs / span if span > 0 else np.zeros_like(error)
  colors = colormap(values)
  return colors.repeat(row_height, axis=0).repeat(column_width, axis=1)


def save_error_heatmap(
  path: str | os.PathLike[str],
  recovered_bxn: ArrayLike,
  truth_bxn: ArrayLike,
  **kwargs,
) -> None:
  """Writes :func:`error_heatmap` (same keywords) as a PNG.

  Args:
    path: the PNG file to write.
    recovered_bxn: as :func:`error_heatmap`.
    truth_bxn: as :func:`error_heatmap`.
    **kwargs: passed to :func:`error_heatmap`.
  """
  write_png(path, error_heatmap(recovered_bxn, truth_bxn, **kwargs))
