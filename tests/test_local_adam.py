"""LocalAdamW: AdamW at world_size 1; the data-parallel second moment estimated from one
rank's statistics otherwise."""

from __future__ import annotations

import pytest
import torch

import deepreduce as dr


def _run(optimizer_cls, grads, **options):
    param = torch.nn.Parameter(torch.zeros(grads.shape[1]))
    optimizer = optimizer_cls([param], **options)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    return param.detach().clone(), optimizer


def test_world_size_one_is_adamw():
    grads = torch.randn(30, 500, generator=torch.Generator().manual_seed(0)) + 0.3
    options = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours, _ = _run(dr.LocalAdamW, grads, world_size=1, **options)
    theirs, _ = _run(torch.optim.AdamW, grads, **options)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_steps_grow_by_sqrt_w_where_noise_dominates_and_not_where_signal_does():
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(200, 4000, generator=gen)
    signal = torch.full((200, 4000), 0.5) + 0.01 * torch.randn(200, 4000, generator=gen)
    ratios = []
    for grads in (noise, signal):
        one, _ = _run(dr.LocalAdamW, grads, lr=1e-3, weight_decay=0.0, world_size=1)
        four, _ = _run(dr.LocalAdamW, grads, lr=1e-3, weight_decay=0.0, world_size=4)
        ratios.append((four.norm() / one.norm()).item())
    # Pure noise: v / 4 on average, so steps up to sqrt(4) = 2x (less where m**2 happens to be large).
    assert 1.5 < ratios[0] <= 2.0
    assert ratios[1] == pytest.approx(1.0, abs=0.01)


def test_averaged_local_steps_track_data_parallel_adamw_better_than_local_adamw():
    """Two ranks on a noisy quadratic, their updates averaged every step (update mode,
    lossless, H=1): LocalAdamW's trajectory stays closer to data-parallel AdamW's than
    per-rank AdamW's does, at the same learning rate; with the tracked noise estimate
    closer still."""
    gen = torch.Generator().manual_seed(2)
    dim, steps, world = 2000, 300, 2
    target = torch.randn(dim, generator=gen)
    scale = torch.rand(dim, generator=gen) * 2
    draws = torch.randn(steps, world, dim, generator=gen) * 1.5

    def train(mode: str) -> torch.Tensor:
        x = torch.zeros(dim)
        ranks = [torch.nn.Parameter(x.clone()) for _ in range(world)]
        if mode == "dp":
            param = torch.nn.Parameter(x.clone())
            opt = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.0)
        else:
            cls = torch.optim.AdamW if mode == "adamw" else dr.LocalAdamW
            extra = {} if mode == "adamw" else {"world_size": world, "noise": mode}
            opts = [cls([p], lr=1e-2, weight_decay=0.0, **extra) for p in ranks]
        for t in range(steps):
            if mode == "dp":
                param.grad = sum(scale * (param.detach() - target) + draws[t, w] for w in range(world)) / world
                opt.step()
                continue
            start = ranks[0].detach().clone()
            for w, (p, o) in enumerate(zip(ranks, opts)):
                p.grad = scale * (p.detach() - target) + draws[t, w]
                o.step()
            averaged = start + sum(p.detach() - start for p in ranks) / world
            for p in ranks:
                p.data.copy_(averaged)
        return param.detach() if mode == "dp" else ranks[0].detach()

    dp = train("dp")
    gap_local = (train("moments") - dp).norm()
    gap_tracked = (train("tracked") - dp).norm()
    gap_adamw = (train("adamw") - dp).norm()
    assert gap_local < 0.6 * gap_adamw
    assert gap_tracked < 0.6 * gap_local


def test_tracked_noise_at_world_size_one_is_adamw_and_keeps_no_extra_state():
    grads = torch.randn(30, 500, generator=torch.Generator().manual_seed(5)) + 0.3
    ours, optimizer = _run(dr.LocalAdamW, grads, lr=1e-2, world_size=1, noise="tracked")
    theirs, _ = _run(torch.optim.AdamW, grads, lr=1e-2)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert set(next(iter(optimizer.state.values()))) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("options, match", [
    (dict(world_size=0), "world_size"), (dict(world_size=True), "world_size"), (dict(lr=-1.0), "lr"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(noise="m2"), "noise must be one of moments, tracked"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(dr.ConfigError, match=match):
        dr.LocalAdamW([torch.nn.Parameter(torch.zeros(3))], **options)


@pytest.mark.parametrize("noise", ["moments", "tracked"])
def test_state_dict_resumes_bit_for_bit(noise):
    grads = torch.randn(20, 100, generator=torch.Generator().manual_seed(3))
    whole, _ = _run(dr.LocalAdamW, grads, lr=1e-2, world_size=2, noise=noise)
    first, optimizer = _run(dr.LocalAdamW, grads[:10], lr=1e-2, world_size=2, noise=noise)
    param = torch.nn.Parameter(first.clone())
    resumed = dr.LocalAdamW([param], lr=1e-2, world_size=2, noise=noise)
    resumed.load_state_dict(optimizer.state_dict())
    for g in grads[10:]:
        param.grad = g.clone()
        resumed.step()
    assert torch.equal(param.detach(), whole)


def test_a_state_saved_without_the_noise_option_resumes_with_the_optimizers_own():
    grads = torch.randn(5, 100, generator=torch.Generator().manual_seed(6))
    _, saved = _run(dr.LocalAdamW, grads, lr=1e-2, world_size=2)
    state = saved.state_dict()
    for group in state["param_groups"]:
        del group["noise"]
    param = torch.nn.Parameter(torch.zeros(100))
    resumed = dr.LocalAdamW([param], lr=1e-2, world_size=2, noise="tracked")
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["noise"] == "tracked"
    param.grad = grads[0].clone()
    resumed.step()  # the tracked error starts from this step, with its own count for the bias correction
    assert resumed.state[param]["error_steps"] == 1 and resumed.state[param]["step"] == 6


def test_a_resumed_optimizer_keeps_its_own_world_size():
    # A 2-rank run resumed on 4 ranks averages over 4: the group's world_size is not the saved one.
    grads = torch.randn(5, 100, generator=torch.Generator().manual_seed(4))
    _, saved = _run(dr.LocalAdamW, grads, lr=1e-2, world_size=2)
    resumed = dr.LocalAdamW([torch.nn.Parameter(torch.zeros(100))], lr=1e-2, world_size=4)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.param_groups[0]["world_size"] == 4 and resumed.param_groups[0]["lr"] == 1e-2
    assert resumed.state[resumed.param_groups[0]["params"][0]]["step"] == 5
