"""The mask quality checks by name: what each one reads, measures and rejects.

`annotators.quality.QualityCheck` first makes every mask valid (present, NaN-free, the image's
size, not empty) and keeps its largest component; then it runs the checks of this table in
order on the kept mask. A check measures its fields (columns of the candidate row and of the
decision shards, recorded whether it passes or not) and either passes or names what failed; the
row then gets the check's ``invalid_*`` reason and the message in ``error``.

=============  ========================================  ===============  ======================
check          settings (``annotation`` keys)            fields           reason
=============  ========================================  ===============  ======================
area_ratio     min_area_ratio, max_area_ratio            area_ratio       invalid_area_ratio
border_touch   reject_border_touch (on/off), border_px   –                invalid_border_touch
=============  ========================================  ===============  ======================

A new check is one `register_check` call in this module (every process of a run, Ray's stage
actors and train workers included, imports it; a call made elsewhere reaches only the process
that made it): its settings come from the ``annotation`` section's key of that name, else
from its ``options`` mapping, else the default given here; its fields become columns of the
shard schema (`pipeline.storage.shard_schema.shard_schema`) by themselves. Plain numpy: the shard schema reads this
table without loading any model code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from generators.columns import (
    INVALID_AREA_RATIO,
    INVALID_BORDER_TOUCH,
    is_invalid_reason,
)

#: What a check returns for one kept mask (bool H x W): the fields it measured, and None when
#: the mask passes or the message saying why not.
CheckResult = tuple[dict[str, float], str | None]


@dataclass(frozen=True)
class MaskCheck:
    """One mask quality check (module docstring).

    Attributes:
        name: the check's name.
        reason: the ``invalid_*`` status of a mask that fails it.
        run: ``(kept mask, settings) -> (fields, failure message or None)``.
        settings: the keys it reads, with their defaults.
        fields: the fields it measures: column name → numpy dtype name (``"float32"``);
            NaN on rows it did not measure.
        enabled: whether it runs under the given settings (default: always).
    """

    name: str
    reason: str
    run: Callable[[np.ndarray, Mapping[str, Any]], CheckResult]
    settings: Mapping[str, Any] = field(default_factory=dict)
    fields: Mapping[str, str] = field(default_factory=dict)
    enabled: Callable[[Mapping[str, Any]], bool] = lambda settings: True

    def __post_init__(self) -> None:
        if not is_invalid_reason(self.reason):
            raise ValueError(f"check {self.name!r}: reason {self.reason!r} must be invalid_*")


_CHECKS: dict[str, MaskCheck] = {}


def register_check(check: MaskCheck) -> MaskCheck:
    """Add ``check`` to the table (it runs after those registered before it)."""
    _CHECKS[check.name] = check
    return check


def unregister_check(name: str) -> None:
    _CHECKS.pop(name, None)


def mask_checks() -> tuple[MaskCheck, ...]:
    """The registered checks, in the order they run."""
    return tuple(_CHECKS.values())


def check_fields() -> dict[str, str]:
    """Every field the registered checks measure: column name → numpy dtype name."""
    return {name: dtype for c in _CHECKS.values() for name, dtype in c.fields.items()}


def check_settings(section: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of every registered check from an ``annotation`` section: its key of that
    name, else its ``options`` entry, else the check's default."""
    options = section.get("options") or {}
    out: dict[str, Any] = {}
    for check in _CHECKS.values():
        for key, default in check.settings.items():
            out[key] = section[key] if key in section else options.get(key, default)
    return out


def _area_ratio(mask: np.ndarray, s: Mapping[str, Any]) -> CheckResult:
    ratio = float(mask.sum()) / mask.size
    lo, hi = float(s["min_area_ratio"]), float(s["max_area_ratio"])
    if lo <= ratio <= hi:
        return {"area_ratio": ratio}, None
    return {"area_ratio": ratio}, f"mask area ratio {ratio:.3f} is outside [{lo}, {hi}]"


def _border_touch(mask: np.ndarray, s: Mapping[str, Any]) -> CheckResult:
    b = int(s["border_px"])
    if mask[:b].any() or mask[-b:].any() or mask[:, :b].any() or mask[:, -b:].any():
        return {}, f"mask touches the image border ({b} px band)"
    return {}, None


register_check(MaskCheck(
    "area_ratio", INVALID_AREA_RATIO, _area_ratio,
    settings={"min_area_ratio": 0.05, "max_area_ratio": 0.95}, fields={"area_ratio": "float32"}))
register_check(MaskCheck(
    "border_touch", INVALID_BORDER_TOUCH, _border_touch,
    settings={"reject_border_touch": False, "border_px": 1},
    enabled=lambda s: bool(s["reject_border_touch"])))
