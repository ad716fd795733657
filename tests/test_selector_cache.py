"""GradientCache and the flat-gradient helpers: update rules against hand-computed values,
per-parameter vs flat input, invalid input, storage dtype, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selector import (
    INVALID_NAN_REAL_GRAD,
    FlatGradient,
    GradientCache,
    ParameterLayout,
    gradient_norm,
    parameter_gradients,
)
from tests.conftest import make_params


def per_param(flat: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(flat[:2]), torch.tensor(flat[2:]).reshape(2, 1)]


G1 = [1.0, 2.0, 3.0, 4.0]
G2 = [-2.0, 0.0, 2.0, 4.0]
G3 = [3.0, 3.0, 3.0, 3.0]


def test_momentum_update_matches_hand_computed_values():
    cache = GradientCache(make_params(), mode="momentum", momentum=0.1)
    assert cache.update(torch.tensor(G1)) is None
    # c1 = 0.1·0 + 0.9·g1
    torch.testing.assert_close(cache.buffer, torch.tensor([0.9, 1.8, 2.7, 3.6]))
    assert cache.update(torch.tensor(G2)) is None
    # c2 = 0.1·c1 + 0.9·g2
    torch.testing.assert_close(cache.buffer, torch.tensor([-1.71, 0.18, 2.07, 3.96]))
    assert cache.num_updates == 2


def test_momentum_is_the_weight_kept_on_the_old_cache():
    cache = GradientCache(make_params(), mode="momentum", momentum=0.75)
    cache.update(torch.tensor(G1))
    cache.update(torch.tensor(G2))
    # c1 = 0.25·g1; c2 = 0.75·c1 + 0.25·g2
    expected = 0.75 * 0.25 * torch.tensor(G1) + 0.25 * torch.tensor(G2)
    torch.testing.assert_close(cache.buffer, expected)


def test_average_update_is_the_running_mean():
    cache = GradientCache(make_params(), mode="average")
    cache.update(torch.tensor(G1))
    torch.testing.assert_close(cache.buffer, torch.tensor(G1))
    cache.update(torch.tensor(G2))
    torch.testing.assert_close(cache.buffer, torch.tensor([-0.5, 1.0, 2.5, 4.0]))
    cache.update(torch.tensor(G3))
    torch.testing.assert_close(cache.buffer, torch.tensor([2 / 3, 5 / 3, 8 / 3, 11 / 3]))


@pytest.mark.parametrize("mode", ["momentum", "average"])
def test_per_parameter_gradients_update_like_flat_ones(mode):
    flat_cache = GradientCache(make_params(), mode=mode)
    list_cache = GradientCache(make_params(), mode=mode)
    for g in (G1, G2, G3):
        flat_cache.update(torch.tensor(g))
        list_cache.update(per_param(g))
    torch.testing.assert_close(list_cache.buffer, flat_cache.buffer)
    assert list_cache.dot(per_param(G2)) == pytest.approx(flat_cache.dot(torch.tensor(G2)))


def test_parameter_without_gradient_counts_as_zeros():
    cache = GradientCache(make_params(), mode="momentum", momentum=0.1)
    cache.update(torch.tensor(G1))
    cache.update([torch.tensor(G2[:2]), None])
    torch.testing.assert_close(cache.buffer, torch.tensor([-1.71, 0.18, 0.27, 0.36]))


def test_buffer_is_preallocated_and_updated_in_place():
    cache = GradientCache(make_params())
    pointer = cache.buffer.data_ptr()
    for g in (G1, G2, G3):
        cache.update(torch.tensor(g))
        cache.update(per_param(g))
    assert cache.buffer.data_ptr() == pointer


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("as_list", [False, True])
def test_non_finite_real_gradient_leaves_cache_untouched(bad, as_list):
    cache = GradientCache(make_params(), mode="average")
    cache.update(torch.tensor(G1))
    before = cache.buffer.clone()
    poisoned = [1.0, 2.0, 3.0, bad]
    reason = cache.update(per_param(poisoned) if as_list else torch.tensor(poisoned))
    assert reason == INVALID_NAN_REAL_GRAD
    assert torch.equal(cache.buffer, before)
    assert cache.num_updates == 1
    # The running mean continues as if the bad gradient never came.
    cache.update(torch.tensor(G2))
    torch.testing.assert_close(cache.buffer, torch.tensor([-0.5, 1.0, 2.5, 4.0]))


def test_bfloat16_storage_halves_memory_and_tracks_float32():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(1000)), nn.Parameter(torch.zeros(50, 20))]
    fp32 = GradientCache(params, dtype=torch.float32)
    bf16 = GradientCache(params, dtype="bfloat16")
    assert bf16.buffer.dtype == torch.bfloat16
    assert bf16.nbytes() * 2 == fp32.nbytes() == 2000 * 4
    for _ in range(5):
        g = torch.randn(2000)
        fp32.update(g)
        bf16.update(g)
    torch.testing.assert_close(bf16.buffer.float(), fp32.buffer, rtol=1e-2, atol=1e-2)
    assert bf16.norm() == pytest.approx(fp32.norm(), rel=1e-2)
    g = torch.randn(2000)
    assert bf16.dot(g) == pytest.approx(fp32.dot(g), rel=2e-2)


def test_norm_and_dot():
    cache = GradientCache(make_params(), mode="average")
    assert cache.norm() == 0.0
    cache.update(torch.tensor([3.0, 0.0, 4.0, 0.0]))
    assert cache.norm() == pytest.approx(5.0)
    assert cache.dot(torch.tensor(G1)) == pytest.approx(3.0 + 12.0)
    assert cache.dot([None, torch.tensor([[1.0], [1.0]])]) == pytest.approx(4.0)


def test_state_round_trip_through_weights_only_load(tmp_path):
    cache = GradientCache(make_params(), mode="average", dtype=torch.bfloat16)
    cache.update(torch.tensor(G1))
    cache.update(torch.tensor(G2))
    torch.save(cache.state_dict(), tmp_path / "cache.pt")
    state = torch.load(tmp_path / "cache.pt", weights_only=True)

    restored = GradientCache(make_params(), mode="average", dtype=torch.bfloat16)
    restored.load_state_dict(state)
    assert torch.equal(restored.buffer, cache.buffer)
    assert restored.num_updates == 2
    # Both continue identically: the update count (the average's weight) came back too.
    cache.update(torch.tensor(G3))
    restored.update(torch.tensor(G3))
    assert torch.equal(restored.buffer, cache.buffer)
    assert restored.norm() == cache.norm()


def test_state_is_checked_against_the_model_and_settings():
    cache = GradientCache(make_params(), mode="average")
    cache.update(torch.tensor(G1))
    other_model = GradientCache([nn.Parameter(torch.zeros(4))], mode="average")
    with pytest.raises(ValueError, match="parameter list or model changed"):
        other_model.load_state_dict(cache.state_dict())
    other_mode = GradientCache(make_params(), mode="momentum")
    with pytest.raises(ValueError, match="mode='average'"):
        other_mode.load_state_dict(cache.state_dict())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'ema'"):
        GradientCache(make_params(), mode="ema")
    with pytest.raises(ValueError, match="momentum=1.0"):
        GradientCache(make_params(), momentum=1.0)
    with pytest.raises(ValueError, match="'float16'"):
        GradientCache(make_params(), dtype="float16")
    with pytest.raises(ValueError, match="'nccl_magic'"):
        GradientCache(make_params(), sync="nccl_magic")
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(ValueError, match="does not require grad"):
        GradientCache([frozen])
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="listed twice"):
        GradientCache([p, p])
    cache = GradientCache(make_params())
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        cache.update(torch.zeros(5))
    with pytest.raises(ValueError, match=r"gradient 1 has shape \(2,\)"):
        cache.update([torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match="3 entries"):
        cache.update([torch.zeros(2), None, None])


# -- flat-gradient helpers ---------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head_a = nn.Linear(4, 1)
        self.head_b = nn.Linear(4, 1)  # unused by loss_a

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return self.head_a(h), self.head_b(h)


def autograd_flat(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads)])


def test_flat_gradient_matches_autograd_and_reuses_its_buffer():
    torch.manual_seed(0)
    model = TwoHeads()
    params = list(model.parameters())
    flat = FlatGradient(params)
    a, b = model(torch.randn(5, 3))
    loss_a, loss_b = a.pow(2).mean(), b.abs().mean()
    expected_a, expected_b = autograd_flat(loss_a, params), autograd_flat(loss_b, params)
    offsets = flat.layout.offsets  # body: [0, 4), head_a: [4, 6), head_b: [6, 8)

    got_a = flat.compute(loss_a, retain_graph=True)  # same graph, two calls
    torch.testing.assert_close(got_a, expected_a)
    assert torch.count_nonzero(got_a[offsets[4]:offsets[6]]) == 0  # head_b unused → zeros
    assert torch.count_nonzero(got_a[offsets[2]:offsets[4]]) > 0
    pointer = got_a.data_ptr()

    got_b = flat.compute(loss_b)
    assert got_b.data_ptr() == pointer  # the same buffer, overwritten
    torch.testing.assert_close(got_b, expected_b)
    assert torch.count_nonzero(got_b[offsets[2]:offsets[4]]) == 0  # head_a now unused → zeros
    assert model.body.weight.grad is None  # param.grad untouched


def test_parameter_gradients_of_a_constant_loss_are_zero():
    params = make_params()
    grads = parameter_gradients(torch.tensor(0.0), params)
    assert grads == [None, None]
    assert gradient_norm(grads) == 0.0
    flat = FlatGradient(params)
    flat.buffer.fill_(7.0)
    assert torch.count_nonzero(flat.compute(torch.tensor(0.0))) == 0
    with pytest.raises(ValueError, match="scalar"):
        parameter_gradients(torch.zeros(2, requires_grad=True) * 2, params)


def test_layout_offsets_and_views():
    layout = ParameterLayout(make_params())
    assert layout.numel == 4 and layout.offsets == [0, 2, 4]
    views = layout.shaped_views(torch.arange(4.0))
    assert views[1].shape == (2, 1) and views[1][1, 0] == 3.0
