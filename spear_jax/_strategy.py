"""The interface of a search strategy: where candidate directions come from.

SPEAR samples ``(b-1)``-row submatrices of ``L`` and proposes their kernels
(:func:`spear_jax.attack.spear_sampler`); SPEAR++ learns sparse directions
by l1 dictionary learning and rounds them
(:func:`spear_jax.attack.spearpp_learner`). Both are a
:class:`Strategy`, a pair of pure functions in the spirit of optax's
``(init, update)``:

* ``init(key, problem) -> state`` builds the strategy's own state;
* ``step(state, problem, pool, selection) -> StepOutput`` returns raw
  candidate directions and the next state, given the current candidate pool
  and selection (which it reads and never changes).

:func:`spear_jax.invert` owns everything else, once for every strategy:
absorbing the directions into the pool, selecting, budgets, logging,
checkpoints and interrupts. A new strategy plugs in as
``invert(..., method=my_strategy)``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from spear_jax._pool import CandidatePool
from spear_jax._problem import Problem
from spear_jax._selection import Selection
from spear_jax._types import PRNGKeyArray

__all__ = ["StepOutput", "Strategy"]


class StepOutput(NamedTuple):
  """What one step of a strategy produced.

  Attributes:
    directions: raw candidate directions, one unit vector per row (they are
      polished and filtered by the driver).
    state: the strategy's next state.
    proposals: how many proposals (sampled submatrices, rounding tries) the
      step cost, for the budget.
    blocks: how many blocks or rounds it completed (bookkeeping).
    stop_reason: set when the strategy has nothing more to offer (for
      example ``"stalled"`` or ``"max_rounds"``).
    pinned: directions read off the layer's ReLU pattern, absorbed without
      the mixture test (see :func:`spear_jax._pool.absorb`): the
      certificate judges them.
    stage: the name the step's time is booked under in
      ``InversionStats.timings`` (SPEAR++: ``"search"``, ``"pattern"``,
      ``"complete"``).
  """

  directions: np.ndarray
  state: Any
  proposals: int = 0
  blocks: int = 0
  stop_reason: str | None = None
  pinned: np.ndarray | None = None
  stage: str = "step"


class Strategy(NamedTuple):
  """A source of candidate directions (see the module docstring).

  Attributes:
    name: a short name for logs.
    init: ``init(key, problem) -> state``.
    step: ``step(state, problem, pool, selection) -> StepOutput``.
    split_mixtures: ``0`` splits no sparse mixture of near-twin columns;
      otherwise the filter splits them into their columns instead of
      discarding them (spans of up to 48 dimensions by peeling), and this
      is the largest span also split by anchor rows.
    search: whether the candidates come from a search rather than uniform
      sampling (it caps the adaptive selection threshold; see
      :func:`spear_jax._selection.threshold`).
  """

  name: str
  init: Callable[[PRNGKeyArray, Problem], Any]
  step: Callable[[Any, Problem, CandidatePool, Selection], StepOutput]
  split_mixtures: int = 0
  search: bool = False
