"""spear_jax: exact gradient inversion of batches (SPEAR, SPEAR++) in JAX.

References:
  Dimitrov, Baader, Mueller, Vechev. SPEAR: Exact Gradient Inversion of
  Batches in Federated Learning. NeurIPS 2024.
  https://arxiv.org/abs/2403.03945
"""

from spear_jax._attack import default_max_proposals as default_max_proposals
from spear_jax._attack import invert as invert
from spear_jax._attack import structure_floor as structure_floor
from spear_jax._certificate import relu_certificate as relu_certificate
from spear_jax._client import MLP as MLP
from spear_jax._client import ClientUpdate as ClientUpdate
from spear_jax._client import client_update as client_update
from spear_jax._client import init_mlp as init_mlp
from spear_jax._client import layer_gradient as layer_gradient
from spear_jax._client import layer_parameters as layer_parameters
from spear_jax._client import paper_layout as paper_layout
from spear_jax._config import AttackConfig as AttackConfig
from spear_jax._config import LearnerConfig as LearnerConfig
from spear_jax._dictionary import complete_last_column as complete_last_column
from spear_jax._dictionary import estimate_found_rows as estimate_found_rows
from spear_jax._dictionary import learn_directions as learn_directions
from spear_jax._dictionary import (
  learn_directions_constrained as learn_directions_constrained,
)
from spear_jax._dictionary import (
  make_dictionary_learner as make_dictionary_learner,
)
from spear_jax._dictionary import round_direction as round_direction
from spear_jax._dictionary import round_with_pattern as round_with_pattern
from spear_jax._data import ImageSet as ImageSet
from spear_jax._data import load_bundled as load_bundled
from spear_jax._data import DATASET_NAMES as DATASET_NAMES
from spear_jax._data import TFDS_NAMES as TFDS_NAMES
from spear_jax._data import LazyArray as LazyArray
from spear_jax._data import denormalize as denormalize
from spear_jax._data import load_dataset as load_dataset
from spear_jax._data import load_tfds as load_tfds
from spear_jax._data import normalize as normalize
from spear_jax._data import sample_batch as sample_batch
from spear_jax._metrics import aggregate_trials as aggregate_trials
from spear_jax._metrics import denormalize_images as denormalize_images
from spear_jax._metrics import hungarian as hungarian
from spear_jax._metrics import match_and_score as match_and_score
from spear_jax._metrics import mse as mse
from spear_jax._metrics import psnr as psnr
from spear_jax._metrics import score_reconstruction as score_reconstruction
from spear_jax._metrics import ssim as ssim
from spear_jax._pictures import error_heatmap as error_heatmap
from spear_jax._pictures import image_grid as image_grid
from spear_jax._pictures import save_error_heatmap as save_error_heatmap
from spear_jax._pictures import save_image_grid as save_image_grid
from spear_jax._pictures import write_png as write_png
from spear_jax._linalg import Tolerances as Tolerances
from spear_jax._linalg import factorize as factorize
from spear_jax._linalg import null_vector as null_vector
from spear_jax._linalg import polish_direction as polish_direction
from spear_jax._linalg import split_mixture as split_mixture
from spear_jax._linalg import resolve_tolerances as resolve_tolerances
from spear_jax._proposals import propose_block as propose_block
from spear_jax._proposals import propose_direction as propose_direction
from spear_jax._sampling import sample_rows as sample_rows
from spear_jax._selection import recover_batch as recover_batch
from spear_jax._selection import select_independent as select_independent
from spear_jax._types import InversionResult as InversionResult
from spear_jax._types import InversionStats as InversionStats

__version__ = "0.1.0"

__all__ = [
  "AttackConfig",
  "ClientUpdate",
  "DATASET_NAMES",
  "ImageSet",
  "InversionResult",
  "InversionStats",
  "LazyArray",
  "LearnerConfig",
  "MLP",
  "TFDS_NAMES",
  "Tolerances",
  "aggregate_trials",
  "client_update",
  "complete_last_column",
  "default_max_proposals",
  "denormalize",
  "denormalize_images",
  "error_heatmap",
  "estimate_found_rows",
  "factorize",
  "hungarian",
  "image_grid",
  "init_mlp",
  "invert",
  "layer_gradient",
  "layer_parameters",
  "learn_directions",
  "learn_directions_constrained",
  "load_bundled",
  "load_dataset",
  "load_tfds",
  "make_dictionary_learner",
  "match_and_score",
  "mse",
  "normalize",
  "null_vector",
  "paper_layout",
  "polish_direction",
  "split_mixture",
  "propose_block",
  "propose_direction",
  "psnr",
  "recover_batch",
  "relu_certificate",
  "resolve_tolerances",
  "round_direction",
  "round_with_pattern",
  "sample_batch",
  "sample_rows",
  "save_error_heatmap",
  "save_image_grid",
  "score_reconstruction",
  "select_independent",
  "ssim",
  "structure_floor",
  "write_png",
]
