"""Scores of a reconstruction and pictures of it.

Reconstructions come back in an arbitrary order: :func:`match_and_score`
and :func:`score_reconstruction` match them to the originals (an optimal
assignment) before scoring (relative error, exactness, MSE, PSNR, SSIM on
de-normalized images). :func:`save_image_grid` and
:func:`save_error_heatmap` draw them.
"""

from spear_jax._metrics import aggregate_trials as aggregate_trials
from spear_jax._metrics import denormalize_images as denormalize_images
from spear_jax._metrics import hungarian as hungarian
from spear_jax._metrics import identifiable_samples as identifiable_samples
from spear_jax._metrics import independent_samples as independent_samples
from spear_jax._metrics import match_and_score as match_and_score
from spear_jax._metrics import mse as mse
from spear_jax._metrics import near_duplicates as near_duplicates
from spear_jax._metrics import psnr as psnr
from spear_jax._metrics import score_reconstruction as score_reconstruction
from spear_jax._metrics import ssim as ssim
from spear_jax._pictures import error_heatmap as error_heatmap
from spear_jax._pictures import image_grid as image_grid
from spear_jax._pictures import save_error_heatmap as save_error_heatmap
from spear_jax._pictures import save_image_grid as save_image_grid

__all__ = [
  "aggregate_trials",
  "denormalize_images",
  "error_heatmap",
  "hungarian",
  "identifiable_samples",
  "image_grid",
  "independent_samples",
  "match_and_score",
  "mse",
  "near_duplicates",
  "psnr",
  "save_error_heatmap",
  "save_image_grid",
  "score_reconstruction",
  "ssim",
]
