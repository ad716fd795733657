"""Class gradient caches that fit LVIS: sketched on each layer's input side, exact on its output.

The exact class cache (`selector.instance_selector.ClassGradientCaches`) holds a full copy of
the scored parameters per class: 76.5 MiB per class on ResNet-50 FPN heads, 89.9 GiB for
LVIS's 1203 classes. Here a class's cache is kept through the rank-one structure of the
gradients it averages (docs/algorithm.md, Sketched class caches). For a linear layer l with
weight W_l (d_out x d_in) and bias, a box's gradient is δ xᵀ (and δ), so class y's exact
cache is C_l = Σ_i w_i δ_i x_iᵀ (a running average of per-step means). Stored instead, per class
and layer, three running means that are linear in C_l (so they follow the exact update rule,
"average" or "momentum", and can be all-reduced):

======  ===============  ======================================================================
name    shape            what it is
======  ===============  ======================================================================
S_l     d_out x r        C_l V_l: the cache seen through the layer's shared input basis V_l
b_l     d_out            Σ w_i δ_i: the exact bias cache, also the mean output error
m_l     d_in             Σ w_i x_i: the mean layer input
======  ===============  ======================================================================

V_l (d_in x r, orthonormal columns) is `InputBasis`: the top principal directions of the
layer's inputs over a set of real boxes, shared by every class (the inputs of a box head are
dominated by a few directions common to all classes; its output errors are class-specific, so
the output side stays exact). A candidate k with factors (x_k, δ_k) scores, per layer::

    ⟨C_l, δ_k x_kᵀ⟩ ≈ δ_kᵀ S_l (V_lᵀ x_k) + (δ_k·b_l)(r̄_l·x_k),   r̄_l = m_l − V_l V_lᵀ m_l
    ⟨bias cache, δ_k⟩ = δ_k·b_l   (exact)

exact inside span(V_l); the part of C_l outside it is replaced by its mean-field value
b_l r̄_lᵀ (exact when the cached boxes share one δ, nearly so within a class). The candidate's
norm ‖g_k‖² = Σ_l ‖δ_k‖²(‖x_k‖² + 1) is exact; the cache's norm
‖C‖² ≈ Σ_l ‖S_l‖² + ‖b_l‖²‖r̄_l‖² + ‖b_l‖² is the same for every candidate of the class, so it
does not change a class's ranking. Memory per class: Σ_l (d_out r + d_out + d_in) numbers
(43,860 on the R50-FPN heads at r = 8: 201 MiB in float32 for 1203 classes).

When the weights have moved, `SketchedClassCaches.reexpress` moves every cache to a refreshed
basis V' in closed form (S' = S VᵀV' + b r̄ᵀV'; b and m unchanged). Torch only; the factors come
from `trainer.head_factors`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selector.decision import INVALID_NAN_REAL_GRAD

UPDATE_MODES = ("average", "momentum")


@dataclass(frozen=True)
class LayerFactors:
    """One linear layer's per-box gradient factors (rows are boxes).

    Attributes:
        name: the layer's name (e.g. ``"box_head.fc6"``).
        x: N x d_in, the layer's input for each box.
        delta: N x d_out, ∂ℓ_i/∂(layer output) for each box.
        has_bias: whether the layer has a bias (its gradient is ``delta``).
    """

    name: str
    x: Tensor
    delta: Tensor
    has_bias: bool = True

    def rows(self, index: Tensor | Sequence[int]) -> "LayerFactors":
        """The factors of the boxes at ``index``."""
        index = torch.as_tensor(index, dtype=torch.int64, device=self.x.device)
        return LayerFactors(self.name, self.x[index], self.delta[index], self.has_bias)

    @property
    def numel(self) -> int:
        """Parameters of the layer (weight and bias)."""
        d_out, d_in = self.delta.shape[1], self.x.shape[1]
        return d_out * d_in + (d_out if self.has_bias else 0)


def top_basis(rows: Tensor, rank: int) -> Tensor:
    """The top-``rank`` right singular vectors (d x r, orthonormal columns, float32) of ``rows``
    (n x d): an uncentred PCA. The n x n Gram route is taken when n < d (fc6's inputs:
    12,544-dimensional)."""
    r = min(rank, *rows.shape)
    data = rows.double()
    if data.shape[0] < data.shape[1]:
        evals, evecs = torch.linalg.eigh(data @ data.T)
        order = torch.argsort(evals, descending=True)[:r]
        lifted = data.T @ evecs[:, order] / evals[order].clamp_min(1e-30).sqrt()
        basis = torch.linalg.qr(lifted)[0]
    else:
        basis = torch.linalg.svd(data, full_matrices=False)[2][:r].T
    # A fixed sign per direction (largest entry positive), so that the same inputs give the
    # same basis whatever the solver returned.
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return (basis * torch.where(signs == 0, 1.0, signs)).float().contiguous()


class InputBasis:
    """The shared input basis of every scored layer (module docstring).

    Args:
        bases: layer name → d_in x r tensor with orthonormal columns.
    """

    def __init__(self, bases: Mapping[str, Tensor]) -> None:
        self.bases = {name: v.float().contiguous() for name, v in bases.items()}

    @classmethod
    def fit(cls, factors: Sequence[LayerFactors], rank: int) -> "InputBasis":
        """The top-``rank`` directions of each layer's inputs over the boxes of ``factors``."""
        if rank < 1:
            raise ValueError(f"sketch rank {rank} must be >= 1")
        return cls({f.name: top_basis(f.x, rank) for f in factors if f.x.shape[0] > 0})

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.bases), "bases": [self.bases[n] for n in self.bases]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "InputBasis":
        return cls(dict(zip(state["names"], state["bases"])))

    def captured(self, factors: Sequence[LayerFactors]) -> float:
        """The share of the inputs' energy inside the basis, Σ‖Vᵀx‖² / Σ‖x‖² (1: nothing lost),
        over the layers and boxes of ``factors``: how well the basis still fits."""
        inside = total = 0.0
        for f in factors:
            v = self.bases.get(f.name)
            if v is None or f.x.shape[0] == 0:
                continue
            x = f.x.to(v.device)
            inside += float(((x @ v) ** 2).sum())
            total += float((x ** 2).sum())
        return inside / total if total > 0 else 1.0


class SketchedClassCaches:
    """A sketched gradient cache per class (module docstring), created when the class first gets
    a real gradient; the same interface as `selector.instance_selector.ClassGradientCaches`.

    Args:
        rank: columns of each layer's input basis.
        mode: ``"average"`` (running mean of the per-step gradients, the class caches' default)
            or ``"momentum"`` (new = m · old + (1 − m) · current).
        momentum: m for ``"momentum"``.
        dtype: storage of S, b, m (``"float32"`` or ``"bfloat16"``); arithmetic is float32.
    """

    def __init__(self, rank: int = 8, *, mode: str = "average", momentum: float = 0.1,
                 dtype: torch.dtype | str = torch.float32) -> None:
        if mode not in UPDATE_MODES:
            raise ValueError(f"class cache update {mode!r} is not one of {UPDATE_MODES}")
        if rank < 1:
            raise ValueError(f"selection.sketch_rank={rank} must be >= 1")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must be in [0, 1)")
        self.rank = int(rank)
        self.mode = mode
        self.momentum = float(momentum)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.basis: InputBasis | None = None
        self.basis_index = -1  # which refresh of the basis is in use (-1: none yet)
        # class id -> layer name -> (S, b, m); class id -> updates folded in; last step
        self.caches: dict[int, dict[str, tuple[Tensor, Tensor, Tensor]]] = {}
        self.count: dict[int, int] = {}
        self.updated_at: dict[int, int] = {}

    # -- the basis -------------------------------------------------------------------------

    def set_basis(self, basis: InputBasis, index: int = 0) -> None:
        """Use ``basis`` (the ``index``-th refresh) from now on; existing caches are re-expressed
        in it."""
        if self.basis is not None and self.caches:
            self.reexpress(basis)
        self.basis = basis
        self.basis_index = int(index)

    @torch.no_grad()
    def reexpress(self, new: InputBasis) -> None:
        """Move every cache to ``new``: S' = S (VᵀV') + b r̄ᵀV' (what the old sketch knows of
        C V'); b and m are unchanged."""
        assert self.basis is not None
        for layers in self.caches.values():
            for name, (s, b, m) in list(layers.items()):
                v, w = self.basis.bases[name], new.bases[name]
                s32, b32, m32 = s.float(), b.float(), m.float()
                r = m32 - v @ (v.T @ m32)
                layers[name] = ((s32 @ (v.T @ w) + torch.outer(b32, r @ w)).to(self.dtype),
                                b, m)
        self.basis = new

    # -- updates and scores ----------------------------------------------------------------

    def clear(self) -> None:
        """Forget every class's cache (the basis is kept)."""
        self.caches, self.count, self.updated_at = {}, {}, {}

    def get(self, class_id: int) -> dict[str, tuple[Tensor, Tensor, Tensor]] | None:
        return self.caches.get(int(class_id))

    def age(self, class_id: int, step: int) -> int | None:
        """Steps since the class's cache was last updated (None: it has none)."""
        last = self.updated_at.get(int(class_id))
        return None if last is None else int(step) - last

    @torch.no_grad()
    def update(self, class_id: int, factors: Sequence[LayerFactors], *, step: int = 0
               ) -> str | None:
        """Fold the mean gradient of ``factors``' boxes (this step's real boxes of the class)
        into the class's cache. Returns None, or ``invalid_nan_real_grad`` when that gradient
        is not finite (the cache is left untouched)."""
        if self.basis is None:
            raise RuntimeError("the sketched caches have no input basis yet (set_basis)")
        new = {}
        for f in factors:
            v = self.basis.bases.get(f.name)
            if v is None or f.x.shape[0] == 0:
                continue
            x, d = f.x.float(), f.delta.float()
            n = x.shape[0]
            new[f.name] = (d.T @ (x @ v) / n, d.mean(0), x.mean(0))
        if not new or not all(bool(torch.isfinite(t).all()) for g in new.values() for t in g):
            return INVALID_NAN_REAL_GRAD
        cid = int(class_id)
        layers = self.caches.get(cid)
        if layers is None:
            layers = self.caches[cid] = {n: tuple(torch.zeros_like(t, dtype=self.dtype)
                                                  for t in g) for n, g in new.items()}
            self.count[cid] = 0
        self.count[cid] += 1
        keep = (1.0 / self.count[cid] if self.mode == "average" or self.count[cid] == 1
                else 1.0 - self.momentum)
        for name, g in new.items():
            old = layers[name]
            layers[name] = tuple((o.float() + (t - o.float()) * keep).to(self.dtype)
                                 for o, t in zip(old, g))
        self.updated_at[cid] = int(step)
        return None

    @torch.no_grad()
    def scores(self, class_id: int, factors: Sequence[LayerFactors]
               ) -> tuple[Tensor, float] | None:
        """(K cosines, the cache's norm) of the candidates in ``factors`` (all of the class)
        against the class's cache; None when it has none. A candidate whose factors are not
        finite scores NaN."""
        layers = self.caches.get(int(class_id))
        if layers is None or self.basis is None:
            return None
        k = factors[0].x.shape[0] if factors else 0
        dot = torch.zeros(k)
        grad_sq = torch.zeros(k)
        cache_sq = 0.0
        for f in factors:
            cached = layers.get(f.name)
            if cached is None:
                continue
            v = self.basis.bases[f.name]
            s, b, m = (t.float() for t in cached)
            x, d = f.x.float(), f.delta.float()
            r = m - v @ (v.T @ m)
            db = d @ b
            dot = dot + ((d @ s) * (x @ v)).sum(1) + db * (x @ r) + db
            grad_sq = grad_sq + (d ** 2).sum(1) * ((x ** 2).sum(1) + 1.0)
            cache_sq += float((s ** 2).sum() + (b @ b) * (r @ r) + b @ b)
        norm = math.sqrt(max(cache_sq, 0.0))
        denominator = torch.sqrt(grad_sq) * norm
        cosine = torch.where(denominator > 0, dot / denominator, torch.zeros_like(dot))
        return cosine, norm

    # -- size and checkpoints --------------------------------------------------------------

    @staticmethod
    def numbers_per_class(layers: Sequence[tuple[int, int]], rank: int) -> int:
        """Numbers stored per class for layers of ``(d_in, d_out)``: Σ (d_out r + d_out + d_in)."""
        return sum(d_out * min(rank, d_in) + d_out + d_in for d_in, d_out in layers)

    @property
    def nbytes(self) -> int:
        """Memory of the caches and the basis (bytes)."""
        caches = sum(t.numel() * t.element_size() for layers in self.caches.values()
                     for g in layers.values() for t in g)
        basis = 0 if self.basis is None else sum(v.numel() * 4 for v in self.basis.bases.values())
        return caches + basis

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints and strings only (loads with ``weights_only=True``)."""
        classes = sorted(self.caches)
        names = sorted({n for layers in self.caches.values() for n in layers})
        return {
            "kind": "sketch", "rank": self.rank, "mode": self.mode,
            "basis": None if self.basis is None else self.basis.state_dict(),
            "basis_index": self.basis_index,
            "class_ids": classes, "names": names,
            "caches": [[list(self.caches[c][n]) for n in names] for c in classes],
            "count": [self.count[c] for c in classes],
            "updated_at": [self.updated_at.get(c, 0) for c in classes],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "sketch":
            raise ValueError("the checkpoint holds exact class caches; this run uses "
                             "selection.cache_sketch=input_basis (they cannot be converted)")
        if int(state["rank"]) != self.rank:
            raise ValueError(f"the checkpoint's caches are sketched at rank {state['rank']}; "
                             f"this run uses selection.sketch_rank={self.rank}")
        self.basis = None if state["basis"] is None else InputBasis.from_state(state["basis"])
        self.basis_index = int(state["basis_index"])
        self.caches = {int(c): {n: tuple(t) for n, t in zip(state["names"], layers)}
                       for c, layers in zip(state["class_ids"], state["caches"])}
        self.count = {int(c): int(n) for c, n in zip(state["class_ids"], state["count"])}
        self.updated_at = {int(c): int(s) for c, s in zip(state["class_ids"],
                                                          state["updated_at"])}
