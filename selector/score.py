"""Contribution score of a generated batch: its gradient compared with the gradient cache.

The paper defines the contribution of generated data g as the drop of the real-data loss after
one gradient step of size α on g:

    φ(g) = L_real(θ) − L_real(θ − α·∇ℓ_g(θ))  ≈  α·⟨∇L_real(θ), ∇ℓ_g(θ)⟩      (first-order Taylor)

so φ > 0 means "training on this batch would lower the loss on real data". BSGAL replaces
∇L_real by the gradient cache c (a running estimate, see `GradientCache`) and scores

- ``"cosine"`` (reference default): ⟨c, g⟩ / (‖c‖·‖g‖), in [−1, 1]; scale-free, so a fixed
  threshold (−0.05) means the same thing all through training;
- ``"dot"``: ⟨c, g⟩, i.e. φ/α with the cache in place of ∇L_real; its scale follows the loss.

Only the sign and the ranking matter for the decision; α (the learning rate) is a positive
factor and is left out. A zero vector on either side scores exactly 0 ("no first-order effect")
instead of dividing by zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from selector.flat_gradient import GradientLike, gradient_norm
from selector.gradient_cache import GradientCache

SCORE_KINDS = ("cosine", "dot")


@dataclass(frozen=True)
class ContributionScore:
    """A scored candidate gradient.

    Attributes:
        value: the score the threshold is applied to (cosine or dot); NaN when not ``finite``.
        dot: ⟨cache, candidate⟩ (NaN when the candidate was not finite; not computed then).
        candidate_norm: ‖candidate gradient‖₂ (non-finite when it had NaN/Inf).
        cache_norm: ‖cache‖₂.
        kind: ``"cosine"`` or ``"dot"``.
    """

    value: float
    dot: float
    candidate_norm: float
    cache_norm: float
    kind: str

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)


def cosine(dot: float, norm_a: float, norm_b: float) -> float:
    """⟨a, b⟩ / (‖a‖‖b‖), defined as 0.0 when either vector is zero."""
    denominator = norm_a * norm_b
    if denominator == 0.0:
        return 0.0
    # Rounding can push |cos| a hair past 1 for (anti-)parallel vectors.
    return max(-1.0, min(1.0, dot / denominator))


def contribution_score(cache: GradientCache, candidate_grad: GradientLike,
                       kind: str = "cosine") -> ContributionScore:
    """Score a candidate (generated-part) gradient against the cache.

    Args:
        cache: the gradient cache (its parameters define the layout).
        candidate_grad: flat (numel,) tensor or one tensor-or-None per parameter.
        kind: ``"cosine"`` (reference default) or ``"dot"``.

    A non-finite candidate (NaN/Inf) gives ``value = NaN`` and ``finite = False``; the caller turns
    that into ``invalid_nan_candidate_grad``. The cache is only read.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"score kind {kind!r} is unknown; use one of {SCORE_KINDS}")
    cache.layout.check(candidate_grad)
    candidate_norm = gradient_norm(candidate_grad)
    cache_norm = cache.norm()
    if not math.isfinite(candidate_norm):
        return ContributionScore(math.nan, math.nan, candidate_norm, cache_norm, kind)
    dot = cache.dot(candidate_grad)
    value = cosine(dot, cache_norm, candidate_norm) if kind == "cosine" else dot
    if not math.isfinite(value):  # e.g. dot overflow between two huge but finite vectors
        value = math.nan
    return ContributionScore(value, dot, candidate_norm, cache_norm, kind)
