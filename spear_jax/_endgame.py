"""Each method's endgame: the other one finds the columns it cannot.

SPEAR's sampler finds a column of ``D`` with ``z`` zeros among ``M`` alive
rows with probability about ``(z / M)^(b-1)`` per proposal, so a run's time
is set by the column with the fewest zeros. On real data that column can
be 17 times rarer than the median one (8x8 digits, b = 20, m = 400: 146
zeros where the median is 168, ``C(146, 19) / C(375, 19) = 7.7e-9``, about
130 million proposals in expectation for that column alone), and the
sampler spends its whole budget on it. SPEAR++'s deflated
l1 search does not care how rare a column is to sample. The reverse also
happens: at small ``b`` the search can stall on columns that sampling
finds in a few thousand proposals.

:func:`with_endgame` wraps SPEAR's sampler: it samples while new columns
keep arriving at the rate the samples so far predict, and once the current
fruitless streak is ``patience`` times longer than the expected wait for
the next column, it runs the learner's rounds on the same pool and
selection (deflating what the sampler found). When the learner stops
(stalled or its round limit) sampling resumes, so the run's own budget
still decides when to give up. :func:`with_sampling_fallback` wraps
SPEAR++: when its search stops, it samples for a bounded number of
proposals where that is affordable (small ``b``).
"""

from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np

from spear_jax._pool import CandidatePool
from spear_jax._problem import Problem
from spear_jax._selection import Selection
from spear_jax._strategy import StepOutput
from spear_jax._strategy import Strategy

__all__ = [
  "EndgameState",
  "FallbackState",
  "expected_wait",
  "with_endgame",
  "with_sampling_fallback",
]


class EndgameState(NamedTuple):
  """The wrapped sampler's and learner's states and the streak bookkeeping.

  Attributes:
    sampler: the sampler's state.
    learner: the learner's state once it started, else ``None``.
    key: the key the learner starts from.
    proposals: proposals sampled so far.
    since: proposals sampled since the selection last grew.
    found: columns selected when the selection last grew.
    mode: ``"sample"``, ``"search"`` (the learner's rounds) or ``"done"``
      (the learner stopped; sampling only).
  """

  sampler: Any
  learner: Any
  key: Any
  proposals: int = 0
  since: int = 0
  found: int = 0
  mode: str = "sample"


def expected_wait(b: int, found: int, proposals: int) -> float:
  """Expected proposals until the next new column (coupon collector).

  With every column hit with probability ``p`` per proposal, the ``k``
  columns found so far took ``(H_b - H_{b-k}) / p`` proposals in
  expectation and the next one takes ``1 / ((b - k) p)``. ``p`` is read off
  the run (``k >= 1``), or taken from SPEAR's half-zeros model ``2^-(b-1)``
  before the first column. A full selection that does not certify waits
  for one replacement column (``remaining = 1``).

  Args:
    b: the batch size (columns of ``D``).
    found: columns found so far, ``0 <= found <= b``.
    proposals: proposals it took to find them.

  Returns:
    The expected number of proposals until the next column.
  """
  remaining = max(b - found, 1)
  if found == 0 or proposals <= 0:
    return 2.0 ** (b - 1) / remaining
  spent = sum(1.0 / (b - j) for j in range(found))
  return proposals / spent / remaining


def with_endgame(
  sampler: Strategy, learner: Strategy, patience: float
) -> Strategy:
  """SPEAR's sampler with the learner's search for its slowest columns.

  Args:
    sampler: SPEAR's strategy (:func:`spear_jax.attack.spear_sampler`).
    learner: SPEAR++'s (:func:`spear_jax.attack.spearpp_learner`).
    patience: the learner takes over once the sampler's fruitless streak
      exceeds ``patience`` times :func:`expected_wait` (for waits that are
      exponential, ``exp(-patience)`` of a healthy run's columns).

  Returns:
    A :class:`Strategy` named like the sampler.
  """

  def init(key, problem: Problem) -> EndgameState:
    # The sampler draws what it drew alone; the learner a key of its own.
    learner_key = jax.random.fold_in(key, 1)
    return EndgameState(sampler.init(key, problem), None, learner_key)

  def step(
    state: EndgameState,
    problem: Problem,
    pool: CandidatePool,
    selection: Selection,
  ) -> StepOutput:
    found = int(selection.chosen.shape[0])
    if found > state.found:
      state = state._replace(since=0, found=found)
    if state.mode == "sample" and state.since > patience * expected_wait(
      problem.b, found, state.proposals - state.since
    ):
      logging.info(
        "SPEAR: %d of %d columns, no new one in %d proposals; "
        "searching for the rest",
        found,
        problem.b,
        state.since,
      )
      state = state._replace(
        mode="search", learner=learner.init(state.key, problem)
      )
    if state.mode == "search":
      out = learner.step(state.learner, problem, pool, selection)
      mode = "search" if out.stop_reason is None else "done"
      return out._replace(
        state=state._replace(learner=out.state, mode=mode), stop_reason=None
      )
    out = sampler.step(state.sampler, problem, pool, selection)
    return out._replace(
      state=state._replace(
        sampler=out.state,
        proposals=state.proposals + out.proposals,
        since=state.since + out.proposals,
      )
    )

  return Strategy(
    sampler.name,
    init,
    step,
    split_mixtures=max(sampler.split_mixtures, learner.split_mixtures),
    search=sampler.search,
  )


class FallbackState(NamedTuple):
  """SPEAR++'s state and, while it samples, the sampler's.

  Attributes:
    learner: the learner's state.
    sampler: the sampler's state while sampling, else ``None``.
    key: the key the sampler and each restarted learner start from.
    left: proposals the sampler may still draw.
    found: columns selected when sampling started.
    reason: the learner's stop reason, the run's if sampling finds nothing.
  """

  learner: Any
  sampler: Any
  key: Any
  left: int = 0
  found: int = 0
  reason: str | None = None


def with_sampling_fallback(
  learner: Strategy, sampler: Strategy, patience: float, max_proposals: int
) -> Strategy:
  """SPEAR++ that samples for its last columns when its search stops.

  At small ``b`` sampling is cheap and blind to what stops the search.
  After the learner stops, the sampler draws ``patience`` times
  :func:`expected_wait`'s half-zeros model for the missing columns,
  ``patience 2^(b-1) / missing`` proposals, if that is at most
  ``max_proposals`` (b <= 22 with one column missing for the default
  ``2^24``). When the selection grows meanwhile, a fresh learner takes
  over again (its completion stages read one missing column, or a missing
  twin pair, off the pattern: a twin found by sampling leaves the other
  to them); the run stops with the learner's reason once an allowance
  passes without a new column, or certifies. Each hand-back needs a new
  column, so this ends.

  Args:
    learner: SPEAR++'s strategy.
    sampler: SPEAR's.
    patience: the allowance in units of the expected wait.
    max_proposals: the largest allowance that is sampled at all.

  Returns:
    A :class:`Strategy` named like the learner.
  """

  def init(key, problem: Problem) -> FallbackState:
    # The learner draws what it drew alone; the sampler a key of its own.
    return FallbackState(
      learner.init(key, problem), None, jax.random.fold_in(key, 1)
    )

  def search(state, problem, pool, selection):
    out = learner.step(state.learner, problem, pool, selection)
    state = state._replace(learner=out.state)
    found = int(selection.chosen.shape[0])
    allowance = patience * expected_wait(problem.b, found, 0)
    if out.stop_reason is None or allowance > max_proposals:
      return out._replace(state=state)
    logging.info(
      "SPEAR++ %s at %d of %d columns; sampling %d proposals",
      out.stop_reason,
      found,
      problem.b,
      allowance,
    )
    key, sampler_key = jax.random.split(state.key)
    state = state._replace(
      sampler=sampler.init(sampler_key, problem),
      key=key,
      left=int(allowance),
      found=found,
      reason=out.stop_reason,
    )
    return out._replace(state=state, stop_reason=None)

  def step(
    state: FallbackState,
    problem: Problem,
    pool: CandidatePool,
    selection: Selection,
  ) -> StepOutput:
    if state.sampler is not None and selection.chosen.shape[0] > state.found:
      key, learner_key = jax.random.split(state.key)
      state = state._replace(
        learner=learner.init(learner_key, problem), sampler=None, key=key
      )
    if state.sampler is None:
      return search(state, problem, pool, selection)
    if state.left <= 0:
      return StepOutput(
        np.zeros((0, problem.b), problem.dtype), state, stop_reason=state.reason
      )
    out = sampler.step(state.sampler, problem, pool, selection)
    left = state.left - out.proposals
    return out._replace(state=state._replace(sampler=out.state, left=left))

  return Strategy(
    learner.name,
    init,
    step,
    split_mixtures=learner.split_mixtures,
    search=learner.search,
  )
