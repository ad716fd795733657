"""BSGAL batch selection (Zhu et al., ICML 2024), framework-agnostic: depends on torch only.

Paper term → code (read in this order; each module fits on a screen or two):

=================================================  ============================================
contribution φ(g) = L_real(θ) − L_real(θ − α∇ℓ_g)  `lookahead.exact_lookahead_gain` (exact)
first-order φ ≈ α⟨∇L_real, ∇ℓ_g⟩                  `score.contribution_score` (kind="dot")
cosine score (reference default)                   `score.contribution_score` (kind="cosine")
∇ℓ_g, ∇L_real over all trainable parameters        `flat_gradient.FlatGradient`,
                                                   `flat_gradient.parameter_gradients`
gradient cache, momentum (m = 0.1) / average       `gradient_cache.GradientCache`
fixed threshold (accept if score ≥ −0.05)          `thresholds.FixedThreshold`
dynamic threshold (percentile of last N = 1000)    `thresholds.DynamicPercentileThreshold`
linearly ramped keep fraction r                    `thresholds.LinearKeepFraction`
one decision per GPU batch                         `batch_selector.BatchSelector`, `Decision`
baselines: all / random / CLIP-or-mask score       `baselines.AcceptAll`, `RandomAcceptance`,
                                                   `FieldThreshold`
=================================================  ============================================

Beyond the reference: `thresholds.RareClassMinAcceptRate` (a floor on a rare class's acceptance
rate); ``invalid_*`` decisions instead of scoring broken input (`decision`); an ``all_reduce``
cache mode that keeps one cache across workers (`GradientCache`, ``sync``); bfloat16 cache
storage. `build.build_selector` maps the run config's ``selection`` section to these objects.
"""

from __future__ import annotations

from selector.baselines import AcceptAll, FieldThreshold, RandomAcceptance
from selector.batch_selector import BatchSelector
from selector.build import METHODS, build_selection_policy, build_selector
from selector.decision import (
    ACCEPTED,
    INVALID_EMPTY_BATCH,
    INVALID_EMPTY_CACHE,
    INVALID_MISSING_FIELD,
    INVALID_NAN_CANDIDATE_GRAD,
    INVALID_NAN_FIELD,
    INVALID_NAN_REAL_GRAD,
    INVALID_NAN_SCORE,
    INVALID_REASONS,
    REASONS,
    REJECTED_SCORE,
    Decision,
    is_invalid,
)
from selector.flat_gradient import (
    FlatGradient,
    GradientLike,
    ParameterLayout,
    gradient_norm,
    parameter_gradients,
)
from selector.gradient_cache import GradientCache
from selector.lookahead import LookaheadResult, exact_lookahead_gain
from selector.score import ContributionScore, contribution_score, cosine
from selector.thresholds import (
    DynamicPercentileThreshold,
    FixedThreshold,
    LinearKeepFraction,
    RareClassMinAcceptRate,
    SelectionPolicy,
)

__all__ = [
    "ACCEPTED",
    "INVALID_EMPTY_BATCH",
    "INVALID_EMPTY_CACHE",
    "INVALID_MISSING_FIELD",
    "INVALID_NAN_CANDIDATE_GRAD",
    "INVALID_NAN_FIELD",
    "INVALID_NAN_REAL_GRAD",
    "INVALID_NAN_SCORE",
    "INVALID_REASONS",
    "METHODS",
    "REASONS",
    "REJECTED_SCORE",
    "AcceptAll",
    "BatchSelector",
    "ContributionScore",
    "Decision",
    "DynamicPercentileThreshold",
    "FieldThreshold",
    "FixedThreshold",
    "FlatGradient",
    "GradientCache",
    "GradientLike",
    "LinearKeepFraction",
    "LookaheadResult",
    "ParameterLayout",
    "RandomAcceptance",
    "RareClassMinAcceptRate",
    "SelectionPolicy",
    "build_selection_policy",
    "build_selector",
    "contribution_score",
    "cosine",
    "exact_lookahead_gain",
    "gradient_norm",
    "is_invalid",
    "parameter_gradients",
]
