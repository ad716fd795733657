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

#: Public names -> their module, imported on first use (PEP 562): importing the package, or
#: its torch-free `selector.methods`, does not import torch.
_LAZY = {
    "ACCEPTED": "selector.decision",
    "AcceptAll": "selector.baselines",
    "BatchSelector": "selector.batch_selector",
    "ContributionScore": "selector.score",
    "Decision": "selector.decision",
    "DynamicPercentileThreshold": "selector.thresholds",
    "FieldThreshold": "selector.baselines",
    "FixedThreshold": "selector.thresholds",
    "FlatGradient": "selector.flat_gradient",
    "GradientCache": "selector.gradient_cache",
    "GradientLike": "selector.flat_gradient",
    "INVALID_EMPTY_BATCH": "selector.decision",
    "INVALID_EMPTY_CACHE": "selector.decision",
    "INVALID_MISSING_FIELD": "selector.decision",
    "INVALID_NAN_CANDIDATE_GRAD": "selector.decision",
    "INVALID_NAN_FIELD": "selector.decision",
    "INVALID_NAN_REAL_GRAD": "selector.decision",
    "INVALID_NAN_SCORE": "selector.decision",
    "INVALID_REASONS": "selector.decision",
    "LinearKeepFraction": "selector.thresholds",
    "LookaheadResult": "selector.lookahead",
    "ParameterLayout": "selector.flat_gradient",
    "REASONS": "selector.decision",
    "REJECTED_SCORE": "selector.decision",
    "RandomAcceptance": "selector.baselines",
    "RareClassMinAcceptRate": "selector.thresholds",
    "SelectionPolicy": "selector.thresholds",
    "build_selection_policy": "selector.build",
    "build_selector": "selector.build",
    "contribution_score": "selector.score",
    "cosine": "selector.score",
    "exact_lookahead_gain": "selector.lookahead",
    "gradient_norm": "selector.flat_gradient",
    "is_invalid": "selector.decision",
    "parameter_gradients": "selector.flat_gradient",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'selector' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
