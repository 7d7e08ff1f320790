"""Prompt-generator training configs: ``safetriage train-prompt --config configs/prompt.py:VARIANT``.

Variants:
- ``vox-256``: a 64 px prompt generator for a 256 px backbone (default ``models/vox``, e.g.
  ported from upstream's vox.pth.tar); needs torchvision's VGG-19 weights file.
- ``small``: a small generator for a ``configs/train.py:small`` backbone (64 px) that trains on a
  CPU in minutes; set ``backbone=runs/small/model``.
Overrides are dotted paths, as for ``configs/train.py``: ``configs/prompt.py:small,backbone=DIR``.
"""

import dataclasses

import ml_collections

from safetriage_jax.config_loader import (TRAIN_LIMITS, apply_overrides, check_limits,
                                           split_config_arg)
from safetriage_jax.models.prompt import PromptConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.backbone = "models/vox"  # the frozen TPSMM model directory
    c.prompt = dataclasses.asdict(PromptConfig())
    c.data = dict(
        clip_frames=24,               # motion drawn per example; two frames of it are used
        asymmetry=(0.3, 1.0),         # one-sided droop strength of the simulated patients
        blink_rate=(0.2, 1.0),        # fewer blinks than the backbone's training faces
        jitter=dict(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.05),
        worker_count=8,
    )
    c.train = dict(
        batch_size=16,                # global, over all devices and hosts
        num_steps=20000,
        lr=2.0e-4,
        warmup_steps=500,
        max_grad_norm=1.0,
        scales=(1.0, 0.5, 0.25, 0.125),
        loss_weights=dict(perceptual=(10.0,) * 5, l1=10.0, keypoints=10.0, denoising=1.0),
        perceptual_weights="~/.cache/torch/hub/checkpoints/vgg19-dcbb9e9d.pth",  # or "random"
        warp_implementation=None,     # grid-sample backend of the backbone's warps
        seed=0,
    )
    c.log = dict(every_steps=50, sample_every_steps=1000, checkpoint_every_steps=1000,
                 keep_checkpoints=3)
    return c


def get_config(arg: str = "vox-256") -> ml_collections.ConfigDict:
    variant, overrides = split_config_arg(arg, "vox-256")
    c = base_config()
    if variant == "vox-256":
        pass
    elif variant == "small":
        c.backbone = "runs/small/model"
        c.prompt = dataclasses.asdict(PromptConfig(resolution=32, widths=(16, 32, 64)))
        c.data.worker_count = 0
        c.train.batch_size = 8
        c.train.num_steps = 200
        c.train.warmup_steps = 20
        c.train.scales = (1.0, 0.5)
        c.train.perceptual_weights = "random"
        c.log = dict(every_steps=10, sample_every_steps=100, checkpoint_every_steps=100,
                     keep_checkpoints=2)
    else:
        raise ValueError(f"Unknown variant {variant!r}; use vox-256 or small.")
    apply_overrides(c, overrides)
    check(c)
    return c


def check(c):
    """Raises ValueError for settings that cannot train (no steps, no batch, sizes too large)."""
    check_limits(c, TRAIN_LIMITS)
    if c.train.num_steps < 1:
        raise ValueError(f"train.num_steps must be at least 1 (got {c.train.num_steps}): no "
                         "steps would leave an untrained prompt generator.")
    if c.train.batch_size < 1:
        raise ValueError(f"train.batch_size must be at least 1 (got {c.train.batch_size}).")
