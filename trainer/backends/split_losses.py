"""`SplitLosses`: the loss terms of one forward pass, split by what each sample was matched to.

A detector's losses are sums over sampled anchors (RPN) and sampled RoIs (box head), and over
positive RoIs (mask head). Each sample is put in exactly one group by the ground truth it matched:

``real_foreground``
    a positive anchor/RoI matched to a real instance.
``real_background``
    a negative anchor/RoI whose best-overlapping ground truth is real (or that overlaps none).
``generated``
    a positive anchor/RoI matched to a generated (pasted) instance.
``generated_background``
    a negative anchor/RoI whose best-overlapping ground truth is a generated instance
    (IoU > 0): background that lies on a pasted object.

Every piece keeps the stock normaliser (number of sampled anchors/RoIs, or mask pixels of all
positive RoIs), so the pieces of a term sum to the stock torchvision/detectron2 term.

The *generated part* is the ``generated`` group; the *real part* is the rest (both background
groups included), so ``real + generated`` is the stock loss. Training "without the generated
instances and without treating their regions as background" uses
`SplitLosses.without_generated`: ``real_foreground + real_background`` per term.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

REAL_FOREGROUND = "real_foreground"
REAL_BACKGROUND = "real_background"
GENERATED = "generated"
GENERATED_BACKGROUND = "generated_background"
GROUPS: tuple[str, ...] = (REAL_FOREGROUND, REAL_BACKGROUND, GENERATED, GENERATED_BACKGROUND)
# Integer codes used inside the heads (index into GROUPS).
GROUP_CODE = {name: i for i, name in enumerate(GROUPS)}
REAL_GROUPS: tuple[str, ...] = (REAL_FOREGROUND, REAL_BACKGROUND, GENERATED_BACKGROUND)
CLEAR_GROUPS: tuple[str, ...] = (REAL_FOREGROUND, REAL_BACKGROUND)


@dataclass
class SplitLosses:
    """Scalar loss terms of one forward pass, per group.

    Attributes:
        pieces: ``pieces[group][term]`` is a 0-dim float tensor attached to the graph, for every
            group of :data:`GROUPS` and every term the backend computes (torchvision:
            ``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``,
            ``loss_rpn_box_reg``). A group with no samples has zeros (still attached).
    """

    pieces: dict[str, dict[str, Tensor]]

    @classmethod
    def from_flat(cls, flat: Mapping[str, Tensor]) -> SplitLosses:
        """From ``{"<group>/<term>": tensor}`` as the split heads return them."""
        pieces: dict[str, dict[str, Tensor]] = {g: {} for g in GROUPS}
        for key, value in flat.items():
            group, sep, term = key.partition("/")
            if not sep or group not in pieces:
                raise ValueError(f"loss key {key!r} is not '<group>/<term>' with a group of "
                                 f"{GROUPS}; was the model built with the split heads?")
            pieces[group][term] = value.float()
        return cls(pieces)

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(self.pieces[GROUPS[0]])

    def by_term(self, groups: Iterable[str]) -> dict[str, Tensor]:
        """``{term: sum over groups}``."""
        groups = tuple(groups)
        return {term: torch.stack([self.pieces[g][term] for g in groups]).sum()
                for term in self.terms}

    @property
    def real(self) -> dict[str, Tensor]:
        """The real part: every term over all groups but ``generated``."""
        return self.by_term(REAL_GROUPS)

    @property
    def generated(self) -> dict[str, Tensor]:
        """The generated part: every term over samples matched to generated instances."""
        return dict(self.pieces[GENERATED])

    @property
    def stock(self) -> dict[str, Tensor]:
        """``real + generated`` per term: what the unmodified model returns."""
        return self.by_term(GROUPS)

    def total(self, groups: Iterable[str] = GROUPS, terms: Iterable[str] | None = None) -> Tensor:
        """Sum over ``groups`` and ``terms`` (all terms when None)."""
        terms = self.terms if terms is None else tuple(terms)
        return torch.stack([self.pieces[g][t] for g in groups for t in terms]).sum()

    @property
    def without_generated(self) -> dict[str, Tensor]:
        """Every term without the generated instances and without their regions as background
        (``real_foreground + real_background``)."""
        return self.by_term(CLEAR_GROUPS)
