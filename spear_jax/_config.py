"""Static configuration of the attack, closed over by the jitted kernels."""

import dataclasses

__all__ = ["CERTIFICATES", "AttackConfig", "LearnerConfig"]

CERTIFICATES = ("relu", "drift")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """Settings of SPEAR++'s dictionary-learning search and rounding.

  Attributes:
    objective: ``"l1"`` (mean ``|L_j q|``), ``"logcosh"`` (its smooth
      surrogate ``mu log cosh(L_j q / mu)``) or ``"l4"`` (maximise
      ``sum (L_j q)^4``, MSP-style), all over alive rows, ``q`` on the unit
      sphere.
    restarts: parallel restarts per round; ``None`` means ``2 b``.
    steps: optimiser steps per restart (``lax.scan``).
    learning_rate: peak learning rate of the default RAdam (cosine decay).
    logcosh_mu: smoothing scale of ``"logcosh"`` relative to ``1/sqrt(M)``.
    rounding_tries: kernels tried per rounded restart: the ``b - 1`` rows
      with the smallest ``|L_j q| / ||L_j||``, then random ``(b-1)``-subsets
      of the ``rounding_pool`` smallest.
    rounding_pool: size of that pool of small rows; ``None`` means ``2 b``.
    guided_proposals: columns proposed per round through the layer's ReLU
      from random input guesses (:func:`spear_jax.attack.relu_guided_direction`:
      kernels of the rows deepest on a guess's inactive side, sampled like
      the rounding), beside the l1 search; ``None`` means ``b``, ``0``
      none. They find the columns of alike inputs (faces, low contrast)
      whose l1 end points are mixtures of twins. Needs the layer's weight.
    max_rounds: rounds of (search, rounding) before giving up (64: a
      faces batch at b = 100 needed more than 32 after its first stall).
    patience: give up earlier after this many rounds without a new column.
    targeted_fraction: fraction of restarts initialised from rows of ``L``
      on which every column found so far vanishes (deflation towards the
      missing columns); the rest start from random points of the sphere.
      Used while no column is selected, or with ``constrained=False``.
    constrained: once columns are selected, search with
      :func:`spear_jax.learn_directions_constrained` (deflated restarts,
      each followed by the full search; both end points are rounded)
      instead of from fresh starts only.
    subspace_fraction: with ``constrained``, the layer's ``weight`` and
      ``bias`` given and columns selected, this fraction of the restarts
      searches the orthogonal complement of the found samples' estimated
      rows of ``Q^{-1}`` (:func:`spear_jax.estimate_found_rows`), where
      only the missing columns live; the others are restricted to the zero
      set of one random selected column and kept orthogonal to it (the
      only kind without ``weight`` and ``bias``).
    focus_missing: when at most this many columns are missing, every
      restart searches the missing-column subspace (if it is available).
    pivot_twins: a pivot restart also projects out up to this many found
      near-twins of its pivot (found columns whose zero sets overlap the
      pivot's with Jaccard index above ``twin_jaccard``): on the pivot's
      zero set their differences are otherwise the sparsest directions,
      and restarts re-find them instead of missing columns, in the share
      ``pivot_twin_fraction`` of pivot restarts. ``0`` projects out the
      pivot only (the default before stop 22).
    pivot_twin_fraction: the share of pivot restarts that project out the
      pivot's near-twins; the others project out the pivot only. Each kind
      finds columns the other misses (varied set, stop 23: twins in every
      pivot restart stalled a faces batch at b = 100 at 83 columns that
      the pivot alone solves in 124 s, and the pivot alone stalled a crops
      batch at b = 150 at 44 columns that the twins solve in 107 s; half
      of each stalled the faces batch at 20). So when the search stalls
      (``patience``) it runs on with ``1 - pivot_twin_fraction`` before it
      gives up.
    twin_jaccard: the zero-set overlap above which a found column counts
      as a near-twin of the pivot.
    row_estimate_steps: Adam steps of the row estimate (soft Chebyshev
      centre of each found sample's ReLU-pattern cell).
    row_estimate_temperature: soft-min temperature of that estimate, in
      units of the normalised margins.
    row_estimate_learning_rate: peak Adam learning rate of that estimate,
      relative to the row's scale (cosine decay).
    tau_relative: SPEAR++'s cap on ``AttackConfig.tau_relative``'s default:
      a candidate is selected with at least ``min(this, SPEAR's default)``
      times the median zero count of the ``b`` sparsest candidates
      (SPEAR's default,
      ``min_hit_ratio^(1/(b-1))`` = 0.93 at b = 100, is a sampling
      argument and drops true columns with a few percent fewer zeros,
      which the search does find; mixtures of two columns have about half
      the zeros and the mixture test removes them anyway). At small ``b``
      SPEAR's default is the lower one (0.46 at b = 10) and is kept: with
      0.8 a sample with few zeros at m = 200, b = 10 was shut out.
    pattern_rounding: with the layer's ``weight`` and ``bias`` and at most
      ``pattern_max_missing`` columns missing, search end points that the
      plain rounding could not snap are rounded again through the ReLU
      pattern of the missing samples (:func:`spear_jax.round_with_pattern`).
    pattern_max_missing: the largest number of missing columns for that
      rounding (its cost grows with it; the complement is padded to it).
    pattern_temperature: logistic scale of the pattern fit, in units of
      the RMS of the bias.
    pattern_label_margin: fraction of the typical zero count labelled
      inactive in the pattern fit.
    pattern_tries: under the drift certificate, random ``(b-1)``-subsets
      of the ``4b`` deepest rows whose kernels pattern rounding also tries
      per pass (a few of those rows are not zeros after local steps); not
      used with an exact pattern.
    drift_midpoint: under the drift certificate, read the ReLU pattern
      (row estimates, pattern rounding, fill) at the midpoint of the
      server's and the client's last weights, the update's sign read off
      the found columns; ``False``: at the server's weights.
    split_mixtures: split sparse mixtures of near-twin columns (what
      near-twin samples' columns round to) into their columns instead of
      only discarding them: spans of any dimension up to 48 by peeling
      (:func:`spear_jax.attack.peel_span`), and those of at most
      ``split_max_dim`` also by anchor rows.
    split_max_dim: the largest span of near-twin columns also split by
      anchor rows (two-column mixtures split exactly; from three on the
      split samples anchors, see :func:`spear_jax.attack.split_span`).
  """

  objective: str = "l1"
  restarts: int | None = None
  steps: int = 600
  learning_rate: float = 0.5
  logcosh_mu: float = 0.1
  rounding_tries: int = 10
  rounding_pool: int | None = None
  guided_proposals: int | None = None
  max_rounds: int = 64
  patience: int = 4
  targeted_fraction: float = 0.5
  constrained: bool = True
  subspace_fraction: float = 0.5
  focus_missing: int = 10
  pivot_twins: int = 7
  pivot_twin_fraction: float = 1.0
  twin_jaccard: float = 0.6
  row_estimate_steps: int = 400
  row_estimate_temperature: float = 1e-3
  row_estimate_learning_rate: float = 0.1
  tau_relative: float = 0.8
  pattern_rounding: bool = True
  pattern_max_missing: int = 16
  pattern_temperature: float = 5.0
  pattern_label_margin: float = 0.4
  pattern_tries: int = 8
  drift_midpoint: bool = True
  split_mixtures: bool = True
  split_max_dim: int = 6

  def __post_init__(self):
    if self.objective not in ("l1", "logcosh", "l4"):
      raise ValueError(
        f"Unknown objective {self.objective!r}; use 'l1', 'logcosh' or 'l4'."
      )
    if self.steps < 1 or self.rounding_tries < 1 or self.max_rounds < 1:
      raise ValueError("steps, rounding_tries and max_rounds must be >= 1.")
    if self.restarts is not None and self.restarts < 1:
      raise ValueError("restarts must be positive.")
    if self.guided_proposals is not None and self.guided_proposals < 0:
      raise ValueError("guided_proposals must be >= 0.")
    if not 0.0 <= self.targeted_fraction <= 1.0:
      raise ValueError("targeted_fraction must lie in [0, 1].")
    if not 0.0 <= self.subspace_fraction <= 1.0:
      raise ValueError("subspace_fraction must lie in [0, 1].")
    if self.pivot_twins < 0 or not 0.0 < self.twin_jaccard <= 1.0:
      raise ValueError("pivot_twins must be >= 0 and twin_jaccard in (0, 1].")
    if not 0.0 <= self.pivot_twin_fraction <= 1.0:
      raise ValueError("pivot_twin_fraction must lie in [0, 1].")
    if self.focus_missing < 0 or self.row_estimate_steps < 1:
      raise ValueError(
        "focus_missing must be >= 0 and row_estimate_steps >= 1."
      )
    if not 0.0 < self.tau_relative <= 1.0:
      raise ValueError("tau_relative must lie in (0, 1].")
    if self.row_estimate_temperature <= 0:
      raise ValueError("row_estimate_temperature must be positive.")
    if self.pattern_max_missing < 1 or self.pattern_temperature <= 0:
      raise ValueError(
        "pattern_max_missing must be >= 1 and pattern_temperature positive."
      )
    if not 0.0 < self.pattern_label_margin < 1.0:
      raise ValueError("pattern_label_margin must lie in (0, 1).")
    if self.pattern_tries < 0:
      raise ValueError("pattern_tries must be >= 0.")
    if self.split_max_dim < 2:
      raise ValueError("split_max_dim must be >= 2.")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Python-level settings of SPEAR.

  Tolerances default to ``None`` and are resolved from the dtype of the
  gradient (see :func:`spear_jax.resolve_tolerances`).

  Attributes:
    block_size: proposals sampled per jitted call (``N``); the paper
      evaluates ``10^4`` in parallel.
    chunk_size: proposals processed together inside a block; small chunks
      keep the ``b x b`` eliminations in cache on CPUs.
    max_candidates_per_block: at most this many filter-passing proposals of a
      block are polished and merged into the pool (a uniformly random subset
      of them, so frequent directions cannot crowd out rare ones).
    max_proposals: sampling budget; ``None`` means unlimited.
    time_budget_s: wall-time budget in seconds; ``None`` means unlimited.
    tau: sparsity threshold as a fraction of alive rows. ``None`` (default)
      adapts it to the data: ``tau_relative`` times the median zero count of
      the ``b`` sparsest distinct candidates found so far, and never below
      the structure floor ``(b - 1) + max(3, 0.02 M)``.
    tau_relative: the fraction of the typical zero count used by the
      adaptive rule; ``None`` resolves it to ``min_hit_ratio^(1/(b-1))``
      for SPEAR and to the smaller of that and ``learner.tau_relative`` for
      SPEAR++.
    min_hit_ratio: a column whose zero fraction is ``r`` times the typical
      one is sampled ``r^(b-1)`` times as often; the adaptive threshold only
      gives up on columns that would be sampled less than ``min_hit_ratio``
      times as often as a typical one (0.1 for b = 4, 0.63 for b = 16, 0.69
      for b = 20), because finding those is out of reach anyway.
    rank_rtol: relative singular-value cutoff for the numerical rank.
    screen_tol: zero tolerance used while screening proposals.
    zero_tol: zero tolerance after polishing a candidate.
    dedup_tol: two unit directions are the same if ``|<u, v>| >= 1 - tol``.
    independence_tol: a direction is independent of a selection if its
      residual after projecting out the selection has at least this norm.
    certificate_tol: relative slack of the ReLU certificate.
    leverage_tol: a candidate is a mixture of columns when a row of its zero
      set has leverage at least ``1 - leverage_tol``.
    pool_capacity: maximum number of distinct candidates kept.
    swap_rounds: rounds of the second (swap) stage of the greedy selection.
    log_every_s: progress is logged at most this often (seconds).
    num_devices: how many local devices share each block (``None``: all of
      the default backend's). On a multi-core CPU host, expose the cores as
      devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
      before JAX starts (the scripts do this).
    across_processes: with several JAX processes
      (``jax.distributed.initialize``), split every attack's proposal
      blocks and restarts over the devices of all of them (each process
      its own share; all end with the same result). ``False`` keeps each
      process's attack on its own devices, for independent attacks such as
      a sweep that splits its trials over processes.
    certificate: which ReLU check certifies a sample when the layer's
      weight and bias are given: ``"relu"`` (the update is a gradient at
      the server's weights: FedSGD, DP-SGD without noise) or ``"drift"``
      (a FedAvg update from several local steps:
      :func:`spear_jax.attack.drift_certificate`).
    factorization: how ``weight_grad = L R`` is computed: ``"svd"`` (full
      SVD), ``"sketch"`` (randomized range finder with an accuracy check,
      falling back to the SVD; never forms an ``m x n`` factor) or
      ``"auto"`` (the sketch from ``2^21`` entries on: m >= 1000 at
      n = 3072, ImageNet-size inputs).
    drift_max_woken: the drift certificate's largest share of
      server-inactive neurons with a nonzero ``D`` entry.
    drift_min_association: the drift certificate's smallest Youden's J
      between ``D``'s support and the server's active set.
    endgame_patience: SPEAR (``method="spear"``) hands the search for its
      missing columns to SPEAR++'s deflated l1 search once no new column
      has come for this many times the expected wait for the next one
      (:mod:`spear_jax._endgame`); ``None`` keeps pure sampling (the
      paper's algorithm, for comparisons of the sampler itself).
    stall_sampling_max: SPEAR++ (``method="spearpp"``) whose search stops
      samples ``endgame_patience 2^(b-1) / missing`` proposals as SPEAR
      does, when that is at most this many (b <= 22 with one column
      missing for ``2^24`` and the default patience, about a minute on a
      2-core CPU); ``None`` (or ``endgame_patience=None``) stops at once.
    peel_patience: with the hidden span (``invert``'s
      ``next_weight_grad``), the search stops after this many steps
      (SPEAR++ rounds, SPEAR blocks) without a new selected column, takes
      out the found samples whose inputs the span fixes (their
      ``d x^T`` leave the gradient) and searches the rest as a smaller
      batch; ``None`` never peels.
    learner: settings of SPEAR++ (``method="spearpp"``, and SPEAR's
      endgame).
  """

  block_size: int = 8192
  chunk_size: int = 64
  max_candidates_per_block: int = 256
  max_proposals: int | None = None
  time_budget_s: float | None = None
  tau: float | None = None
  tau_relative: float | None = None
  min_hit_ratio: float = 1e-3
  rank_rtol: float | None = None
  screen_tol: float | None = None
  zero_tol: float | None = None
  dedup_tol: float | None = None
  independence_tol: float | None = None
  certificate_tol: float | None = None
  leverage_tol: float | None = None
  pool_capacity: int = 512
  swap_rounds: int = 2
  log_every_s: float = 5.0
  num_devices: int | None = None
  across_processes: bool = True
  certificate: str = "relu"
  factorization: str = "auto"
  drift_max_woken: float = 0.5
  drift_min_association: float = 0.3
  endgame_patience: float | None = 8.0
  stall_sampling_max: int | None = 2**24
  peel_patience: int | None = 2
  learner: LearnerConfig = LearnerConfig()

  def __post_init__(self):
    if self.block_size < 1 or self.chunk_size < 1:
      raise ValueError("block_size and chunk_size must be positive.")
    if self.block_size % self.chunk_size:
      raise ValueError(
        f"block_size ({self.block_size}) must be a multiple of chunk_size "
        f"({self.chunk_size})."
      )
    if self.tau is not None and not 0.0 < self.tau < 1.0:
      raise ValueError(f"tau must lie in (0, 1), got {self.tau}.")
    if self.max_proposals is not None and self.max_proposals < 1:
      raise ValueError("max_proposals must be positive.")
    if self.time_budget_s is not None and self.time_budget_s <= 0:
      raise ValueError("time_budget_s must be positive.")
    if self.certificate not in CERTIFICATES:
      raise ValueError(
        f"Unknown certificate {self.certificate!r}; use one of {CERTIFICATES}."
      )
    if self.factorization not in ("auto", "svd", "sketch"):
      raise ValueError(
        f"factorization must be auto, svd or sketch, not "
        f"{self.factorization!r}."
      )
    if not 0.0 <= self.drift_max_woken <= 1.0:
      raise ValueError("drift_max_woken must lie in [0, 1].")
    if not -1.0 <= self.drift_min_association <= 1.0:
      raise ValueError("drift_min_association must lie in [-1, 1].")
    if self.endgame_patience is not None and not self.endgame_patience > 0:
      raise ValueError("endgame_patience must be positive or None.")
    if self.stall_sampling_max is not None and self.stall_sampling_max < 1:
      raise ValueError("stall_sampling_max must be positive or None.")
    if self.peel_patience is not None and self.peel_patience < 1:
      raise ValueError("peel_patience must be positive or None.")
