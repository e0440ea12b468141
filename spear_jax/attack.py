"""The attack: :func:`invert`, its settings, results and search strategies.

``invert`` is prepare (:func:`prepare_problem`), one loop (a
:class:`Strategy` step, :func:`absorb` into the :class:`CandidatePool`,
:func:`select`, budgets, logs and checkpoints) and finalize. SPEAR's
sampler (:func:`spear_sampler`) and SPEAR++'s dictionary learner
(:func:`spearpp_learner`) are the two built-in strategies; the kernels
below are the stages they are made of, for writing new ones.

After the inputs: :func:`recover_labels` reads each sample's label off the
classifier's update. For comparison: :func:`gradient_matching`, the
approximate optimization attack of "Inverting Gradients".
"""

from spear_jax._attack import METHODS as METHODS
from spear_jax._attack import SearchState as SearchState
from spear_jax._attack import default_max_proposals as default_max_proposals
from spear_jax._attack import invert as invert
from spear_jax._attack import make_strategy as make_strategy
from spear_jax._baseline import BaselineConfig as BaselineConfig
from spear_jax._baseline import BaselineResult as BaselineResult
from spear_jax._baseline import gradient_matching as gradient_matching
from spear_jax._certificate import drift_certificate as drift_certificate
from spear_jax._certificate import identifiable_inputs as identifiable_inputs
from spear_jax._certificate import relu_certificate as relu_certificate
from spear_jax._config import AttackConfig as AttackConfig
from spear_jax._config import LearnerConfig as LearnerConfig
from spear_jax._dictionary import complete_last_column as complete_last_column
from spear_jax._dictionary import learn_directions as learn_directions
from spear_jax._dictionary import (
  make_dictionary_learner as make_dictionary_learner,
)
from spear_jax._dictionary import relu_guided_direction as relu_guided_direction
from spear_jax._dictionary import round_direction as round_direction
from spear_jax._dictionary import round_with_pattern as round_with_pattern
from spear_jax._dictionary import sample_last_column as sample_last_column
from spear_jax._distributed import attack_devices as attack_devices
from spear_jax._labels import LabelResult as LabelResult
from spear_jax._labels import label_accuracy as label_accuracy
from spear_jax._labels import recover_labels as recover_labels
from spear_jax._linalg import Tolerances as Tolerances
from spear_jax._linalg import factorize as factorize
from spear_jax._linalg import polish_direction as polish_direction
from spear_jax._linalg import split_mixture as split_mixture
from spear_jax._linalg import split_span as split_span
from spear_jax._linalg import twin_span as twin_span
from spear_jax._peel import peel_span as peel_span
from spear_jax._pool import CandidatePool as CandidatePool
from spear_jax._pool import absorb as absorb
from spear_jax._pool import empty_pool as empty_pool
from spear_jax._problem import HiddenFit as HiddenFit
from spear_jax._problem import Problem as Problem
from spear_jax._problem import hidden_span_rows as hidden_span_rows
from spear_jax._problem import next_layer_residuals as next_layer_residuals
from spear_jax._problem import prepare_problem as prepare_problem
from spear_jax._problem import structure_floor as structure_floor
from spear_jax._proposals import propose_direction as propose_direction
from spear_jax._proposals import spear_sampler as spear_sampler
from spear_jax._selection import Reconstruction as Reconstruction
from spear_jax._selection import Selection as Selection
from spear_jax._selection import coupled_flags as coupled_flags
from spear_jax._selection import empty_selection as empty_selection
from spear_jax._selection import reconstruct as reconstruct
from spear_jax._selection import select as select
from spear_jax._spearpp import LearnerRoundState as LearnerRoundState
from spear_jax._spearpp import spearpp_learner as spearpp_learner
from spear_jax._strategy import StepOutput as StepOutput
from spear_jax._strategy import Strategy as Strategy
from spear_jax._types import InversionResult as InversionResult
from spear_jax._types import InversionStats as InversionStats
from spear_jax._types import PhaseTime as PhaseTime

__all__ = [
  "METHODS",
  "AttackConfig",
  "BaselineConfig",
  "BaselineResult",
  "CandidatePool",
  "HiddenFit",
  "InversionResult",
  "InversionStats",
  "LabelResult",
  "LearnerConfig",
  "LearnerRoundState",
  "PhaseTime",
  "Problem",
  "Reconstruction",
  "SearchState",
  "Selection",
  "StepOutput",
  "Strategy",
  "Tolerances",
  "absorb",
  "attack_devices",
  "complete_last_column",
  "coupled_flags",
  "default_max_proposals",
  "drift_certificate",
  "empty_pool",
  "empty_selection",
  "factorize",
  "gradient_matching",
  "hidden_span_rows",
  "identifiable_inputs",
  "invert",
  "label_accuracy",
  "learn_directions",
  "make_dictionary_learner",
  "make_strategy",
  "next_layer_residuals",
  "peel_span",
  "polish_direction",
  "prepare_problem",
  "propose_direction",
  "reconstruct",
  "recover_labels",
  "relu_certificate",
  "relu_guided_direction",
  "round_direction",
  "round_with_pattern",
  "sample_last_column",
  "select",
  "spear_sampler",
  "spearpp_learner",
  "split_mixture",
  "split_span",
  "structure_floor",
  "twin_span",
]
