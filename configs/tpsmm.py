"""TPSMM model configs: ``--config configs/tpsmm.py:VARIANT[,key=value,...]``.

VARIANT is one of upstream's released settings (vox-256, taichi-256, ted-384, mgif-256) or
``small`` (the reduced widths of the shared parity fixture); overrides change single fields,
e.g. ``configs/tpsmm.py:vox-256,num_tps=5,generator_block_expansion=32``.
"""

import dataclasses

import ml_collections

from safetriage_jax.config_loader import apply_overrides, split_config_arg
from safetriage_jax.models.config import PRESETS, TPSMMConfig

VARIANTS = dict(
    PRESETS,
    small=TPSMMConfig(generator_block_expansion=16, generator_max_features=64,
                      dense_block_expansion=16, dense_max_features=128,
                      id_bottle_size=32, pose_bottle_size=32),
)


def get_config(arg: str = "vox-256") -> ml_collections.ConfigDict:
    variant, overrides = split_config_arg(arg, "vox-256")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    config = ml_collections.ConfigDict()
    config.model = dataclasses.asdict(VARIANTS[variant])
    apply_overrides(config.model, overrides)
    return config
