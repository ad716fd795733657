"""The first-order BSGAL score against the exact look-ahead, and the selector on a stream with
corrupted candidate batches, on a small MLP over separable Gaussian blobs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from selector import (
    ACCEPTED,
    BatchSelector,
    FixedThreshold,
    GradientCache,
    build_selector,
    contribution_score,
    exact_lookahead_gain,
    parameter_gradients,
)

DIM, CLASSES = 16, 4


class Blobs:
    """Four Gaussian blobs in 16-D: linearly separable, with corruptions of candidate batches."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(CLASSES, DIM, generator=self.generator) * 2.5

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, CLASSES, (n,), generator=self.generator)
        return self.centers[y] + torch.randn(n, DIM, generator=self.generator), y

    def flip(self, y: torch.Tensor, fraction: float) -> torch.Tensor:
        """Move a fraction of the labels to another (wrong) class."""
        chosen = torch.rand(y.shape, generator=self.generator) < fraction
        wrong = (y + torch.randint(1, CLASSES, y.shape, generator=self.generator)) % CLASSES
        return torch.where(chosen, wrong, y)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """Replace the inputs by heavy noise (labels kept): objects that do not look like it."""
        return torch.randn(x.shape, generator=self.generator) * 6.0


def trained_mlp(data: Blobs, steps: int = 20) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):  # part-way trained: real and candidate gradients both informative
        x, y = data.sample(32)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def test_lookahead_restores_weights_and_buffers_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()  # BatchNorm running statistics change on every forward
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = exact_lookahead_gain(model.parameters(), lambda: F.cross_entropy(model(x), y),
                                  lambda: F.cross_entropy(model(x * 0.5), y), lr=0.1,
                                  buffers=model.buffers())
    assert result.real_loss_after != result.real_loss_before  # the step did move the weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    def broken_real_loss() -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        exact_lookahead_gain(model.parameters(), lambda: F.cross_entropy(model(x), y),
                             broken_real_loss, lr=0.1, buffers=model.buffers())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_first_order_score_sign_agrees_with_exact_lookahead():
    data = Blobs(seed=1)
    model = trained_mlp(data)
    params = list(model.parameters())
    x_real, y_real = data.sample(256)

    def real_loss() -> torch.Tensor:
        return F.cross_entropy(model(x_real), y_real)

    # Cache = exactly ∇L_real (momentum 0), so the dot score is the paper's first-order term / α.
    cache = GradientCache(params, momentum=0.0)
    cache.update(parameter_gradients(real_loss(), params))
    # The reference's cache instead: momentum 0.1 over small real batches (an estimate of ∇L_real).
    running_cache = GradientCache(params, momentum=0.1)
    for _ in range(10):
        x, y = data.sample(16)
        running_cache.update(parameter_gradients(F.cross_entropy(model(x), y), params))
    lr = 1e-3
    first_order, exact, cosines = [], [], []
    fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
    for i in range(60):
        x, y = data.sample(16)
        y = data.flip(y, fractions[i % len(fractions)])
        if i % 6 == 5:
            x = data.noise(x)

        def candidate_loss(x=x, y=y) -> torch.Tensor:
            return F.cross_entropy(model(x), y)

        g_gen = parameter_gradients(candidate_loss(), params)
        first_order.append(lr * contribution_score(cache, g_gen, "dot").value)
        cosines.append(contribution_score(running_cache, g_gen, "cosine").value)
        exact.append(exact_lookahead_gain(params, candidate_loss, real_loss, lr=lr).gain)

    agreement = sum((a > 0) == (b > 0) for a, b in zip(first_order, exact)) / len(exact)
    rho = spearmanr(first_order, exact).correlation
    running_agreement = sum((a > 0) == (b > 0) for a, b in zip(cosines, exact)) / len(exact)
    running_rho = spearmanr(cosines, exact).correlation
    print(f"\nexact cache, lr·dot vs exact look-ahead: sign agreement {agreement:.1%} of "
          f"{len(exact)} batches, Spearman {rho:.4f}; momentum-0.1 cache, cosine vs exact: "
          f"sign agreement {running_agreement:.1%}, Spearman {running_rho:.3f}")
    assert min(exact) < 0 < max(exact)  # both helpful and harmful batches were present
    assert agreement >= 0.9
    assert rho >= 0.9
    assert running_agreement >= 0.9


def test_corrupted_candidates_score_lower_and_are_rejected_far_more_often():
    data = Blobs(seed=2)
    model = trained_mlp(data)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05)
    selector = build_selector(params)  # the reference: momentum 0.1, cosine, accept ≥ −0.05
    kinds = ("clean", "flipped", "noisy")
    scores: dict[str, list[float]] = {k: [] for k in kinds}
    rejected: dict[str, int] = {k: 0 for k in kinds}
    for step in range(240):
        x_real, y_real = data.sample(16)
        real_grad = parameter_gradients(F.cross_entropy(model(x_real), y_real), params)
        assert selector.update_cache(real_grad, step=step) is None
        kind = kinds[step % 3]
        x_gen, y_gen = data.sample(16)
        if kind == "flipped":
            y_gen = data.flip(y_gen, 1.0)
        elif kind == "noisy":
            x_gen = data.noise(x_gen)
        candidate_grad = parameter_gradients(F.cross_entropy(model(x_gen), y_gen), params)
        decision = selector.decide(step=step, num_generated=16, candidate_grad=candidate_grad)
        scores[kind].append(decision.score)
        rejected[kind] += decision.reason != ACCEPTED
        # Faithful step 4: train with the pasted batch only if accepted.
        if decision.accepted:
            x_real, y_real = torch.cat([x_real, x_gen]), torch.cat([y_real, y_gen])
        optimizer.zero_grad()
        F.cross_entropy(model(x_real), y_real).backward()
        optimizer.step()

    rates = {k: rejected[k] / len(scores[k]) for k in kinds}
    means = {k: sum(scores[k]) / len(scores[k]) for k in kinds}
    print("\nrejection rate: " + ", ".join(f"{k} {rates[k]:.1%}" for k in kinds)
          + "; mean cosine: " + ", ".join(f"{k} {means[k]:+.3f}" for k in kinds))
    assert means["clean"] > means["flipped"] and means["clean"] > means["noisy"]
    assert rates["clean"] <= 0.1
    assert rates["flipped"] >= 0.8
    assert rates["noisy"] >= 0.6


def test_lookahead_selector_uses_the_exact_gain():
    data = Blobs(seed=3)
    model = trained_mlp(data)
    params = list(model.parameters())
    x_real, y_real = data.sample(128)
    x, y = data.sample(16)
    selector = BatchSelector(FixedThreshold(0.0, name="lookahead"), method="lookahead")
    decisions = []
    for labels in (y, data.flip(y, 1.0)):
        gain = exact_lookahead_gain(params, lambda labels=labels: F.cross_entropy(model(x), labels),
                                    lambda: F.cross_entropy(model(x_real), y_real), lr=0.01).gain
        decisions.append(selector.decide(step=0, num_generated=16, score=gain))
    assert decisions[0].accepted and decisions[0].score > 0
    assert not decisions[1].accepted and decisions[1].score < 0
