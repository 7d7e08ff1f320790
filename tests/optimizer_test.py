"""Optimizer and loss pieces against PyTorch / upstream formulas, on fresh random inputs."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from safetriage_jax.models import geometry
from safetriage_jax.parity import relative_error
from safetriage_jax.train import losses, optimizer

torch = pytest.importorskip("torch")


def test_clip_and_coupled_adam_match_torch(rng):
    """clip_grad_norm_(inf) on two networks + Adam(0.5, 0.999, wd 1e-4) for several steps."""
    shapes = {"kp_detector": (4, 3), "dense_motion_network": (5,), "inpainting_network": (2, 6)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads_seq = [{k: (rng.normal(size=s) * rng.choice([0.5, 30.0])).astype(np.float32)
                  for k, s in shapes.items()} for _ in range(4)]
    cfg = ml_collections.ConfigDict(dict(lr=0.01, epoch_milestones=(2,), max_grad_norm=10.0,
                                         weight_decay=1e-4))
    tx = optimizer.generator_optimizer(cfg, steps_per_epoch=1)
    state, jparams = tx.init(params), params
    for grads in grads_seq:
        updates, state = tx.update(grads, state, jparams)
        jparams = optax.apply_updates(jparams, updates)

    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.Adam(list(tparams.values()), lr=0.01, betas=(0.5, 0.999), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2], gamma=0.1)
    for grads in grads_seq:
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k])
        for k in optimizer.CLIPPED_MODULES:
            torch.nn.utils.clip_grad_norm_([tparams[k]], max_norm=10, norm_type=math.inf)
        opt.step()
        sched.step()  # steps_per_epoch=1: one epoch per step
    for k in shapes:
        assert relative_error(jparams[k], tparams[k].detach().numpy()) < 1e-5, k


def test_tps_dropout_schedule_follows_upstream():
    cfg = ml_collections.ConfigDict(dict(dropout_epoch=35, dropout_maxp=0.3, dropout_startp=0.1,
                                         dropout_inc_epoch=10))
    for epoch in [0, 3, 6, 7, 20, 34, 35, 80]:
        expected = 0.0 if epoch >= 35 else min(epoch / 10 * 0.3 + 0.1, 0.3)
        assert float(optimizer.tps_dropout_p(jnp.int32(epoch), cfg)) == pytest.approx(expected)


def test_random_tps_matches_upstream_formula(rng):
    """Affine part plus one scalar per control point added to x and y (upstream's 'random' TPS)."""
    tps = geometry.random_tps(jax.random.PRNGKey(int(rng.integers(1 << 30))), 3, 0.05, 0.005, 5)
    points = rng.uniform(-1, 1, (3, 7, 2)).astype(np.float32)
    theta, control, weights = (np.asarray(tps[k], np.float64) for k in ("affine", "control", "weights"))
    expected = np.einsum("bij,bpj->bpi", theta[..., :2], points) + theta[:, None, :, 2]
    sq = ((points[:, :, None, :] - control[None, None]) ** 2).sum(-1)
    expected += (sq * np.log(sq + 1e-9) * weights[:, None, :]).sum(-1, keepdims=True)
    assert relative_error(geometry.warp_random_tps(tps, jnp.asarray(points)), expected) < 1e-5
    grid = geometry.random_tps_grid(tps, 4, 6)
    flat = geometry.coordinate_grid(4, 6).reshape(1, -1, 2).repeat(3, 0)
    assert relative_error(grid.reshape(3, -1, 2), geometry.warp_random_tps(tps, flat)) < 1e-6


def test_background_and_warp_losses():
    angle = 0.3
    forward = jnp.array([[[math.cos(angle), -math.sin(angle), 0.1],
                          [math.sin(angle), math.cos(angle), -0.2], [0, 0, 1]]])
    assert float(losses.background(forward, jnp.linalg.inv(forward))) < 1e-6
    assert float(losses.background(forward, forward)) > 0.05
    maps = [jnp.full((1, 8 // 2 ** i, 8 // 2 ** i, 2), float(i)) for i in range(3)]
    assert float(losses.warp(maps, maps[::-1])) == 0.0
    assert float(losses.warp(maps, [m + 1 for m in maps[::-1]])) == pytest.approx(3.0)
