"""Build the selection objects from plain settings (the ``selection`` section of a run config).

The only place where configuration names meet classes. Keyword names follow the config keys:

================  ==========================================================================
method            ``bsgal`` | ``accept_all`` | ``random`` | ``field_threshold`` | ``lookahead``
                  | ``none`` (no generated data: nothing to build, returns None)
score             ``cosine`` | ``dot``                                (bsgal)
cache_update      ``momentum`` | ``average``; momentum = m (0.1)     (bsgal)
cache_dtype       ``float32`` | ``bfloat16``                          (bsgal)
cache_sync        ``per_worker`` | ``all_reduce``                     (bsgal)
threshold         ``auto`` (= fixed) | ``fixed`` | ``dynamic`` | ``schedule``  (bsgal)
fixed_threshold   accept when score ≥ it (−0.05)                       (threshold=fixed)
class_thresholds  optional {class_id: threshold}; a batch uses its lowest (threshold=fixed)
keep_fraction     fraction r kept by the dynamic percentile (0.5)      (threshold=dynamic)
keep_fraction_start/_end, total_steps   linear ramp of r               (threshold=schedule)
window            N recent scores for the percentile (1000)
rare_class_ids, rare_min_accept_rate    per-class acceptance floor (optional, any method;
                  None or 0 = off)
random_p, seed    (random; give each worker its own seed, e.g. base seed + rank)
field, field_threshold, field_reduce    (field_threshold)
lookahead_threshold   accept when the exact look-ahead gain ≥ it (0.0)   (lookahead)
================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from selector.baselines import AcceptAll, FieldThreshold, RandomAcceptance
from selector.batch_selector import LOOKAHEAD, BatchSelector
from selector.gradient_cache import GradientCache
from selector.methods import method_names, resolved_threshold
from selector.thresholds import (
    DynamicPercentileThreshold,
    FixedThreshold,
    LinearKeepFraction,
    RareClassMinAcceptRate,
    SelectionPolicy,
)

THRESHOLDS = ("auto", "fixed", "dynamic", "schedule")


def build_selection_policy(*, method: str = "bsgal", threshold: str = "auto",
                           fixed_threshold: float = -0.05,
                           class_thresholds: Mapping[int, float] | None = None,
                           keep_fraction: float = 0.5,
                           keep_fraction_start: float | None = None,
                           keep_fraction_end: float | None = None,
                           total_steps: int | None = None, window: int = 1000,
                           rare_class_ids: Sequence[int] = (),
                           rare_min_accept_rate: float | None = None, random_p: float = 0.5,
                           seed: int = 0, field: str | None = None,
                           field_threshold: float | None = None, field_reduce: str = "mean",
                           lookahead_threshold: float = 0.0) -> SelectionPolicy | None:
    """The policy for ``method`` (None for ``method="none"``). See the module table."""
    if method not in method_names("batch"):
        raise ValueError(f"selection method {method!r} is unknown; use one of "
                         f"{method_names('batch')}")
    policy: SelectionPolicy
    if method == "none":
        return None
    if method == "bsgal":
        threshold = resolved_threshold("batch", threshold)
        if threshold == "fixed":
            policy = FixedThreshold(fixed_threshold, class_thresholds=class_thresholds)
        elif threshold == "dynamic":
            policy = DynamicPercentileThreshold(keep_fraction, window=window)
        elif threshold == "schedule":
            missing = [name for name, value in (("keep_fraction_start", keep_fraction_start),
                                                ("keep_fraction_end", keep_fraction_end),
                                                ("total_steps", total_steps)) if value is None]
            if missing:
                raise ValueError(f"threshold='schedule' needs {', '.join(missing)} (the kept "
                                 "fraction ramps from start to end over total_steps)")
            schedule = LinearKeepFraction(float(keep_fraction_start), float(keep_fraction_end),
                                          int(total_steps))
            policy = DynamicPercentileThreshold(schedule, window=window)
        else:
            raise ValueError(f"threshold {threshold!r} is unknown; use one of {THRESHOLDS}")
    elif method == "accept_all":
        policy = AcceptAll()
    elif method == "random":
        policy = RandomAcceptance(random_p, seed=seed)
    elif method == "field_threshold":
        if field is None or field_threshold is None:
            raise ValueError("method='field_threshold' needs field (e.g. 'clip_score') and "
                             "field_threshold")
        policy = FieldThreshold(field, field_threshold, reduce=field_reduce)
    else:  # lookahead
        policy = FixedThreshold(lookahead_threshold, name=LOOKAHEAD)
    if rare_min_accept_rate:  # a floor of 0 never overrides anything: same as no floor
        if not rare_class_ids:
            raise ValueError("rare_min_accept_rate is set but rare_class_ids is empty: give the "
                             "class ids whose acceptance rate should be protected")
        policy = RareClassMinAcceptRate(policy, rare_class_ids, rare_min_accept_rate)
    return policy


def build_selector(params: Iterable[Tensor], *, method: str = "bsgal", score: str = "cosine",
                   cache_update: str = "momentum", momentum: float = 0.1,
                   cache_dtype: str = "float32", cache_sync: str = "per_worker",
                   cache_device: torch.device | str | None = None,
                   **policy_settings: object) -> BatchSelector | None:
    """The whole selector for ``method`` (None for ``method="none"``).

    ``params`` are the trainable parameters (used only by ``bsgal``, which builds a
    `GradientCache` over them); ``policy_settings`` go to `build_selection_policy`.
    """
    policy = build_selection_policy(method=method, **policy_settings)  # type: ignore[arg-type]
    if policy is None:
        return None
    cache = None
    if method == "bsgal":
        cache = GradientCache(params, mode=cache_update, momentum=momentum, dtype=cache_dtype,
                              device=cache_device, sync=cache_sync)
    # method="lookahead" makes the selector's `uses_lookahead` flag true.
    return BatchSelector(policy, cache=cache, score_kind=score, method=method)
