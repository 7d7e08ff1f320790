"""Backbone training configs: ``safetriage train --config configs/train.py:VARIANT[,key=value]``.

Variants:
- ``vox-256``: upstream TPSMM's VoxCeleb recipe (vox-256.yaml) on a local folder of clips
  (set ``data.folder``); needs torchvision's VGG-19 weights file (``train.perceptual_weights``).
- ``synthetic-256``: the same recipe on the procedural synthetic faces (no download).
- ``small``: a narrow model on 64 px synthetic faces that trains on a CPU in minutes.
Overrides are dotted paths: ``configs/train.py:small,train.batch_size=8,model.num_tps=5``.
"""

import dataclasses

import ml_collections

from safetriage_jax.config_loader import (TRAIN_LIMITS, apply_overrides, check_limits,
                                           split_config_arg)
from safetriage_jax.models.config import PRESETS, TPSMMConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dataclasses.asdict(PRESETS["vox-256"])
    c.data = dict(
        builder="synthetic",          # "synthetic" | "folder"
        data_dir="~/tensorflow_datasets",
        folder="",                    # the clips, for builder="folder"
        size=256,
        max_frames=300,               # folder builder: frames kept per clip
        synthetic=dict(train_identities=200, test_identities=20, clips_per_identity=4,
                       frames_per_clip=48, asymmetric_fraction=0.25, seed=0),
        id_sampling=True,
        num_repeats=75,
        horizontal_flip=True,
        time_flip=True,
        jitter=dict(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1),
        worker_count=8,
    )
    c.train = dict(
        batch_size=28,                # global, over all devices and hosts
        num_epochs=100,
        num_steps=0,                  # > 0 overrides num_epochs
        epoch_milestones=(70, 90),
        lr=2.0e-4,
        weight_decay=1.0e-4,
        max_grad_norm=10.0,
        scales=(1.0, 0.5, 0.25, 0.125),
        dropout_epoch=35,
        dropout_maxp=0.3,
        dropout_startp=0.1,
        dropout_inc_epoch=10,
        bg_start=10,
        transform=dict(sigma_affine=0.05, sigma_tps=0.005, points_tps=5),
        loss_weights=dict(perceptual=(10.0,) * 5, equivariance=10.0, warp=10.0, bg=10.0),
        perceptual_weights="~/.cache/torch/hub/checkpoints/vgg19-dcbb9e9d.pth",  # or "random"
        precision="float32",          # "float32" | "bfloat16" (mixed: float32 master weights)
        remat="none",                 # "none" | "conv_outputs" | "blocks" (models/policy.py)
        warp_implementation=None,     # grid-sample backend of every warp (None: the default)
        micro_batches=1,              # > 1: gradient accumulated over that many batch slices
        seed=0,
    )
    c.log = dict(every_steps=50, sample_every_steps=1000, checkpoint_every_steps=1000,
                 keep_checkpoints=3)
    c.eval = dict(num_clips=16, batch_size=16)
    return c


def get_config(arg: str = "vox-256") -> ml_collections.ConfigDict:
    variant, overrides = split_config_arg(arg, "vox-256")
    c = base_config()
    if variant == "vox-256":
        c.data.builder = "folder"
        c.data.synthetic = {}
    elif variant == "synthetic-256":
        pass
    elif variant == "small":
        c.model = dataclasses.asdict(TPSMMConfig(
            image_size=64, num_tps=4, generator_block_expansion=16, generator_max_features=64,
            dense_block_expansion=16, dense_max_features=64, dense_num_blocks=3,
            id_bottle_size=16, pose_bottle_size=16))
        c.data.size = 64
        c.data.synthetic = dict(train_identities=24, test_identities=4, clips_per_identity=2,
                                frames_per_clip=24, asymmetric_fraction=0.25, seed=0)
        c.data.num_repeats = 4
        c.data.worker_count = 0
        c.train.batch_size = 8
        c.train.num_epochs = 20
        c.train.epoch_milestones = (15,)
        c.train.dropout_epoch, c.train.dropout_inc_epoch, c.train.bg_start = 8, 4, 2
        c.train.scales = (1.0, 0.5)
        c.train.perceptual_weights = "random"
        c.log = dict(every_steps=10, sample_every_steps=100, checkpoint_every_steps=50,
                     keep_checkpoints=2)
        c.eval = dict(num_clips=4, batch_size=8)
    else:
        raise ValueError(f"Unknown variant {variant!r}; use vox-256, synthetic-256 or small.")
    apply_overrides(c, overrides)
    check(c)
    return c


def check(c):
    """Raises ValueError for settings that contradict each other or cannot train."""
    check_limits(c, TRAIN_LIMITS)
    if c.data.size != c.model.image_size:
        raise ValueError(f"data.size ({c.data.size}) and model.image_size ({c.model.image_size}) "
                         "must agree: the model is trained on frames of data.size pixels.")
    if c.train.num_steps < 0 or (c.train.num_steps == 0 and c.train.num_epochs < 1):
        raise ValueError("Training needs at least one step: set train.num_steps >= 1 or "
                         f"train.num_epochs >= 1 (got {c.train.num_steps} and "
                         f"{c.train.num_epochs}).")
    if c.train.batch_size < 1:
        raise ValueError(f"train.batch_size must be at least 1 (got {c.train.batch_size}).")
    if c.train.micro_batches < 1 or c.train.batch_size % c.train.micro_batches:
        raise ValueError(f"train.micro_batches ({c.train.micro_batches}) must be at least 1 and "
                         f"divide train.batch_size ({c.train.batch_size}).")
    TPSMMConfig.from_dict(dict(c.model))  # types and architecture constraints
