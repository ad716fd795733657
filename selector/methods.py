"""The selection methods by name: what each one does, in one table that everything reads.

A method is described, not implemented, here (plain Python, no torch: the config validates
names with it and ``bsgal --help`` stays fast). The config (`pipeline.config`), the trainer's
factory (`trainer.factory`), the pool source (`pipeline.run.pool_source`) and the rescorer
(`trainer.rescore`) all read these descriptions instead of lists of names of their own.

Instance granularity (one decision per candidate, `selector.instance_selector`):

==============  ======  ==============  ==========  =========================================
method          gated   signal          decision    what it is
==============  ======  ==============  ==========  =========================================
composite       yes     contribution    threshold   the default: gates, then BSGAL per class
bsgal           no      contribution    threshold   BSGAL cosine against the class's cache
quality_gate    yes     –               accept      the gates alone
loss            no      loss            threshold   minus the detector's own loss
gated_loss      yes     loss            threshold   gates, then minus the loss
accept_all      no      –               accept      X-Paste style: everything
random          no      –               random      each with probability random_p
none            –       –               none        real data only
==============  ======  ==============  ==========  =========================================

- *gated*: the candidate passes ``selection.quality_gates`` first (``rejected_quality``).
- *signal*: the per-candidate score the trainer computes (`trainer.instance_signals`:
  ``contribution`` needs the class gradient caches; ``loss`` needs no gradient).
- *decision*: ``threshold`` (the per-class threshold on the signal), ``accept``, ``random``,
  ``none``.

Batch granularity (one decision per step's pasted batch, `selector.build`): ``bsgal``,
``accept_all``, ``random``, ``field_threshold``, ``lookahead``, ``none``.

A new instance method is one `register_method` call in this module (every process of a run
imports it; a call made elsewhere reaches only the process that made it, e.g. a test), and,
if its signal is new, one signal in `trainer.instance_signals`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

GRANULARITIES = ("batch", "instance")
#: What ``selection.threshold: auto`` means at each granularity: the paper's fixed threshold
#: per batch; per candidate, the threshold the selection benchmarks show best (README,
#: Results: the per-class percentile gained more than the calibrated one wherever the
#: generator fails, benchmarks/results/threshold_sweep.md).
AUTO_THRESHOLD = {"batch": "fixed", "instance": "dynamic"}
DECISIONS = ("threshold", "accept", "random", "none")


@dataclass(frozen=True)
class SelectionMethod:
    """What one selection method does (module docstring).

    Attributes:
        name: the ``selection.method`` value.
        granularity: ``"batch"`` or ``"instance"``.
        gated: candidates pass the quality gates before anything else (instance level).
        signal: the name of the per-candidate score (instance level), or None.
        decision: ``"threshold"``, ``"accept"``, ``"random"`` or ``"none"``.
        summary: one line for help texts and errors.
    """

    name: str
    granularity: str
    gated: bool = False
    signal: str | None = None
    decision: str = "threshold"
    summary: str = ""

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if self.decision not in DECISIONS:
            raise ValueError(f"decision {self.decision!r} is not one of {DECISIONS}")
        if self.granularity == "instance" and self.decision == "threshold" and not self.signal:
            raise ValueError(f"method {self.name!r} thresholds a score: name its signal")

    @property
    def trains_on_generated(self) -> bool:
        """False for ``none`` (real data only)."""
        return self.decision != "none"

    @property
    def thresholded(self) -> bool:
        return self.decision == "threshold"


def resolved_threshold(granularity: str, threshold: str, *, calibratable: bool = True) -> str:
    """``selection.threshold`` with ``auto`` replaced by what it means at ``granularity``;
    ``calibratable``: the method can score real instances as it scores candidates (the
    contribution over the box head); where it cannot, instance-level ``auto`` is the per-class
    percentile (``dynamic``)."""
    if threshold != "auto":
        return threshold
    if granularity == "instance" and not calibratable:
        return "dynamic"
    return AUTO_THRESHOLD[granularity]


def calibratable(method: "SelectionMethod", score_parameters: str) -> bool:
    """Whether ``method`` can score real instances as it scores candidates (the calibrated
    threshold's reference): the contribution signal over the box head."""
    return method.signal == "contribution" and score_parameters == "heads"


_METHODS: dict[tuple[str, str], SelectionMethod] = {}


def register_method(method: SelectionMethod) -> SelectionMethod:
    """Add ``method`` to the table (a name may be registered once per granularity)."""
    key = (method.granularity, method.name)
    if key in _METHODS and _METHODS[key] != method:
        raise ValueError(f"{method.granularity}-level method {method.name!r} is registered "
                         "already")
    _METHODS[key] = method
    return method


def unregister_method(granularity: str, name: str) -> None:
    """Remove a registered method (tests that register their own)."""
    _METHODS.pop((granularity, name), None)


def method_names(granularity: str) -> tuple[str, ...]:
    """The registered methods of ``granularity``, in registration order."""
    return tuple(name for g, name in _METHODS if g == granularity)


def selection_method(granularity: str, name: str) -> SelectionMethod:
    """The description of ``name`` at ``granularity``; ValueError naming the valid ones and the
    closest match otherwise."""
    found = _METHODS.get((granularity, name))
    if found is not None:
        return found
    names = method_names(granularity)
    close = difflib.get_close_matches(str(name), names, n=1)
    other = [g for g in GRANULARITIES if (g, name) in _METHODS]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if other:
        article = "an" if other[0] == "instance" else "a"
        hint += (f" ({name!r} is {article} {other[0]}-level method: set "
                 f"selection.granularity={other[0]})")
    raise ValueError(f"{name!r} is not a {granularity}-level method; use one of "
                     f"{names}{hint}")


for _method in (
    SelectionMethod("composite", "instance", gated=True, signal="contribution",
                    summary="quality gates, then the BSGAL contribution per class"),
    SelectionMethod("bsgal", "instance", signal="contribution",
                    summary="BSGAL contribution cosine against the candidate's class cache"),
    SelectionMethod("quality_gate", "instance", gated=True, decision="accept",
                    summary="the quality gates alone"),
    SelectionMethod("loss", "instance", signal="loss",
                    summary="minus the detector's own loss on the candidate"),
    SelectionMethod("gated_loss", "instance", gated=True, signal="loss",
                    summary="quality gates, then minus the detector's own loss"),
    SelectionMethod("accept_all", "instance", decision="accept",
                    summary="every candidate (X-Paste style)"),
    SelectionMethod("random", "instance", decision="random",
                    summary="each candidate with probability random_p"),
    SelectionMethod("none", "instance", decision="none", summary="real data only"),
    SelectionMethod("bsgal", "batch", signal="contribution",
                    summary="the paper: one BSGAL cosine per pasted batch"),
    SelectionMethod("accept_all", "batch", decision="accept", summary="every batch"),
    SelectionMethod("random", "batch", decision="random",
                    summary="each batch with probability random_p"),
    SelectionMethod("field_threshold", "batch", signal="field",
                    summary="a candidate field (e.g. clip_score) against a threshold"),
    SelectionMethod("lookahead", "batch", signal="lookahead",
                    summary="the exact look-ahead gain (one SGD step, loss change on real data)"),
    SelectionMethod("none", "batch", decision="none", summary="real data only"),
):
    register_method(_method)
del _method
