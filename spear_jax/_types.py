"""Array aliases, the notation glossary and the result types of the attack.

Notation (the SPEAR paper's, used in every signature and docstring):

* ``m``: output width of the attacked linear layer (number of neurons).
* ``n``: input width of the attacked layer (e.g. 3072 for 32x32x3 images).
* ``b``: batch size, the number of private inputs; also the rank of the
  weight gradient.
* ``M``: number of alive rows, neurons whose gradient row is not identically
  zero over the batch (``M <= m``).
* ``k``: number of sampled rows of a submatrix, ``k = b - 1``.
* ``N``: number of proposal directions in one sampled block.
* ``P``: capacity of the candidate pool.
* ``W`` (``m x n``) and ``beta`` (``m``): the layer's weight and bias.
* ``X`` (``n x b``): the private batch, samples as columns. The library
  returns ``X^T`` (``b x n``), one sample per row.
* ``D = dL/dZ`` (``m x b``): gradient of the loss at the pre-activations.
* ``weight_grad = D X^T`` (``m x n``) and ``bias_grad = D 1`` (``m``).
* ``L`` (``m x b``, orthonormal columns) and ``R`` (``b x n``): the low-rank
  factorisation ``weight_grad = L R``; ``D = L Q`` and ``X^T = Q^-1 R`` for
  an unknown invertible ``Q`` (``b x b``).
"""

from typing import NamedTuple

import jax
from jaxtyping import Array
from jaxtyping import Bool
from jaxtyping import Float
from jaxtyping import Int
import numpy as np

PRNGKeyArray = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
  "Array",
  "ArrayLike",
  "Bool",
  "Float",
  "Int",
  "InversionResult",
  "InversionStats",
  "PRNGKeyArray",
  "PhaseTime",
]


class PhaseTime(NamedTuple):
  """Time and memory of one phase of an inversion.

  Attributes:
    phase: ``"prepare"`` (validation and factorisation), a strategy stage
      (SPEAR's ``"block"``; SPEAR++'s ``"search"``, ``"pattern"``,
      ``"complete"``), ``"absorb"``, ``"select"`` or ``"finalize"``.
    seconds: wall time spent in it, compilation included.
    compile_seconds: the part of ``seconds`` JAX spent tracing, lowering
      and compiling (or reading the persistent compilation cache).
    calls: how often it ran.
    rss_rise_bytes: how much the process's peak resident memory rose
      while it ran (0 where ``/proc`` is not available).
  """

  phase: str
  seconds: float
  compile_seconds: float
  calls: int
  rss_rise_bytes: int


class InversionStats(NamedTuple):
  """Bookkeeping of one inversion.

  Attributes:
    proposals: number of sampled submatrices (proposal directions) drawn.
    candidates: number of distinct directions that passed the sparsity filter.
    blocks: number of sampled blocks of proposals.
    seconds: wall time of the whole inversion.
    rank: the number of samples recovered: the numerical rank of the
      gradient, plus one when the bias gradient shows an all-zero input
      (the batch size, unless inputs are linearly dependent).
    alive_rows: number of neurons whose gradient row is not identically zero.
    threshold: final sparsity threshold, as a count of zeros over alive rows.
    tau: the threshold as a fraction of alive rows.
    stop_reason: ``"certified"``, ``"recovered"`` (no weight given to
      certify), ``"not_identifiable"`` (every sample passed the ReLU
      certificate, but near-twins leave some inputs undetermined: see
      ``InversionResult.identifiable``), ``"max_proposals"``,
      ``"time_budget"``, ``"interrupted"`` or ``"not_certified"`` (``b = 1``
      whose only sample fails the certificate). With ``dependent > 0`` a
      certified run stops as ``"not_identifiable"``.
    check: how samples were verified (``"relu"``, ``"drift"``, ``"noise"``
      or ``"none"``).
    noise_std: the noise level the noise-aware attack assumed (0 if none).
    timings: where the time and memory went, one :class:`PhaseTime` per
      phase (empty for the noise-aware attack).
    dependent: the given ``batch_size`` minus ``rank``: inputs that are
      linear combinations of the others (exact duplicates, most often).
      The result still has ``batch_size`` rows; the last ``dependent`` are
      a guess (see :func:`spear_jax.invert`), never verified.
  """

  proposals: int
  candidates: int
  blocks: int
  seconds: float
  rank: int
  alive_rows: int
  threshold: int
  tau: float
  stop_reason: str
  check: str = "none"
  noise_std: float = 0.0
  timings: tuple[PhaseTime, ...] = ()
  dependent: int = 0


class InversionResult(NamedTuple):
  """What :func:`spear_jax.invert` recovered.

  Attributes:
    inputs: the recovered batch ``X^T``, one sample per row, in an arbitrary
      order (the gradient does not reveal the order).
    grad_z: the recovered ``D = dL/dZ``, column ``i`` belonging to
      ``inputs[i]``.
    verified: per sample, whether the ReLU certificate holds (requires the
      layer's ``weight`` and ``bias``; all ``False`` without them).
    success: whether ``b`` independent directions were found and, when the
      layer's weights were given, every sample is verified.
    directions: the recovered ``Q`` (``b x b``), ``grad_z = L Q``.
    sparsity: number of zeros of each column of ``grad_z`` over alive rows.
    candidates: every distinct direction found (rows); pass them as
      ``initial_candidates`` to resume an interrupted run.
    stats: an :class:`InversionStats`.
    identifiable: per sample, whether the layer's gradient determines its
      input at all (:func:`spear_jax.attack.identifiable_inputs`): a
      near-twin whose zero set contains another sample's lets an input
      slide along a line of exact, certificate-passing solutions. Such a
      sample is never ``verified``. ``None`` where not assessed (the
      noise-aware attack).
  """

  inputs: Float[Array, "b n"]
  grad_z: Float[Array, "m b"]
  verified: Bool[Array, " b"]
  success: bool
  directions: Float[Array, "b b"]
  sparsity: Int[Array, " b"]
  candidates: Float[np.ndarray, "P b"]
  stats: InversionStats
  identifiable: np.ndarray | None = None
