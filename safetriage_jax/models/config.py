"""TPSMM model hyper-parameters: one frozen dataclass, built from a ConfigDict or upstream YAML."""

import dataclasses
import json
import math

import yaml

from safetriage_jax.config_loader import load_python_config, locate_config
from safetriage_jax.errors import SafeTriageError


@dataclasses.dataclass(frozen=True)
class TPSMMConfig:
    """Every knob of the five TPSMM networks; names follow upstream's ``model_params``."""

    image_size: int = 256
    num_tps: int = 10
    num_channels: int = 3
    bg: bool = True
    multi_mask: bool = True
    # The ResNet-18 encoders of KPDetector and BGMotionPredictor: first-stage channels (each
    # later stage doubles them). Upstream uses torchvision's 64; narrower ones train faster.
    encoder_width: int = 64
    # InpaintingNetwork ("generator_params").
    generator_block_expansion: int = 64
    generator_max_features: int = 512
    num_down_blocks: int = 3
    # DenseMotionNetwork ("dense_motion_params").
    dense_block_expansion: int = 64
    dense_max_features: int = 1024
    dense_num_blocks: int = 5
    scale_factor: float = 0.25
    kp_variance: float = 0.01
    # AVDNetwork ("avd_network_params").
    id_bottle_size: int = 128
    pose_bottle_size: int = 128
    # How to run (precision, remat, the warp backend) is not here: see models.policy.Policy.

    def __post_init__(self):
        _check_types(self)
        for name, (low, high) in MODEL_LIMITS.items():
            if not low <= getattr(self, name) <= high:
                raise SafeTriageError(f"The model config's {name} must be from {low} to {high} "
                                      f"(got {getattr(self, name)}).")
        levels = math.log2(1 / self.scale_factor) if 0 < self.scale_factor <= 1 else -1
        if levels != int(levels):
            raise SafeTriageError(
                f"scale_factor must be 1, 1/2, 1/4, ... (got {self.scale_factor}): the dense-motion "
                "network up-samples its output by powers of two.")
        if self.multi_mask and self.num_down_blocks != 3:
            raise SafeTriageError(
                "multi_mask=True needs num_down_blocks=3: the dense-motion network makes four "
                f"occlusion masks, one per generator level (got num_down_blocks={self.num_down_blocks}).")
        if self.image_size % (2 ** self.num_down_blocks) or self.image_size % round(1 / self.scale_factor):
            raise SafeTriageError(
                f"image_size {self.image_size} must be divisible by 2**num_down_blocks and by "
                "1/scale_factor.")
        dense_size = round(self.image_size * self.scale_factor)
        if dense_size % (2 ** self.dense_num_blocks):
            raise SafeTriageError(
                f"The dense-motion hourglass runs at {dense_size}px (image_size x scale_factor), "
                f"which {self.dense_num_blocks} halvings (dense_num_blocks) do not divide evenly; "
                "choose an image_size that is a multiple of "
                f"{round(2 ** self.dense_num_blocks / self.scale_factor)}.")

    @property
    def num_keypoints(self) -> int:
        """Keypoints per image: five control points per TPS transform."""
        return self.num_tps * 5

    def to_json(self) -> str:
        """The architecture as JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values) -> "TPSMMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SafeTriageError(f"Unknown model config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**dict(values))


# Sizes a model may have (beyond them a run only ends in an out-of-memory crash).
MODEL_LIMITS = {"image_size": (32, 4096), "num_tps": (1, 64), "num_channels": (1, 4),
                "encoder_width": (1, 1024),
                "generator_block_expansion": (1, 4096), "generator_max_features": (1, 8192),
                "num_down_blocks": (1, 6), "dense_block_expansion": (1, 4096),
                "dense_max_features": (1, 8192), "dense_num_blocks": (1, 8),
                "id_bottle_size": (1, 4096), "pose_bottle_size": (1, 4096)}


def _check_types(config):
    """Raises unless every field holds its declared type (an int is also a valid float)."""
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), field.type
        if kind in (bool, "bool"):
            ok = isinstance(value, bool)
        elif kind in (int, "int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:  # float
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            name = getattr(kind, "__name__", str(kind))
            raise SafeTriageError(f"The model config's {field.name} must be {name} (got "
                                  f"{value!r}).")


# The keys of upstream's model_params sections that map to TPSMMConfig (others are typos).
YAML_KEYS = {
    "common_params": {"num_tps", "num_channels", "bg", "multi_mask"},
    "generator_params": {"block_expansion", "max_features", "num_down_blocks"},
    "dense_motion_params": {"block_expansion", "max_features", "num_blocks", "scale_factor",
                            "kp_variance"},
    "avd_network_params": {"id_bottle_size", "pose_bottle_size"},
}


def _check_yaml_keys(path, params):
    unknown_sections = sorted(set(params) - set(YAML_KEYS))
    if unknown_sections:
        raise SafeTriageError(f"{path}: unknown model_params section(s) {unknown_sections}; known "
                              f"sections: {sorted(YAML_KEYS)}.")
    for section, known in YAML_KEYS.items():
        values = params.get(section) or {}
        if not isinstance(values, dict):
            raise SafeTriageError(f"{path}: model_params.{section} must be a mapping of keys.")
        unknown = sorted(set(values) - known)
        if unknown:
            raise SafeTriageError(f"{path}: unknown key(s) {unknown} in model_params.{section}; "
                                  f"known keys: {sorted(known)}.")


def from_upstream_yaml(path, image_size=None) -> TPSMMConfig:
    """Reads upstream TPSMM's YAML (``model_params``); image size from the name (ted-384) or 256."""
    from safetriage_jax.inputs import require_file
    path = require_file(path, "Config file", "Pass an upstream TPSMM YAML (e.g. "
                        "config/vox-256.yaml) or one of configs/*.py.")
    try:
        raw = yaml.safe_load(path.read_text())
        params = raw["model_params"]
        _check_yaml_keys(path, params)
        common = params["common_params"]
        gen = params["generator_params"]
        dense = params["dense_motion_params"]
        avd = params.get("avd_network_params", {})
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise SafeTriageError(f"{path} is not valid YAML{where}: {problem}.") from None
    except (KeyError, TypeError) as err:
        raise SafeTriageError(
            f"{path} is not an upstream TPSMM config: expected model_params with common_params, "
            f"generator_params and dense_motion_params ({type(err).__name__}: {err}).") from None
    if image_size is None:
        digits = path.stem.rsplit("-", 1)[-1]
        image_size = int(digits) if digits.isdigit() else 256
    return TPSMMConfig(
        image_size=image_size,
        num_tps=common["num_tps"],
        num_channels=common.get("num_channels", 3),
        bg=common.get("bg", False),
        multi_mask=common.get("multi_mask", True),
        generator_block_expansion=gen["block_expansion"],
        generator_max_features=gen["max_features"],
        num_down_blocks=gen["num_down_blocks"],
        dense_block_expansion=dense["block_expansion"],
        dense_max_features=dense["max_features"],
        dense_num_blocks=dense["num_blocks"],
        scale_factor=dense.get("scale_factor", 1),
        kp_variance=dense.get("kp_variance", 0.01),
        id_bottle_size=avd.get("id_bottle_size", 64),
        pose_bottle_size=avd.get("pose_bottle_size", 64),
    )


# Upstream's released configurations (config/*.yaml of yoyo-nb/Thin-Plate-Spline-Motion-Model).
PRESETS = {
    "vox-256": TPSMMConfig(),
    "taichi-256": TPSMMConfig(),
    "ted-384": TPSMMConfig(image_size=384),
    "mgif-256": TPSMMConfig(bg=False),
}


def _from_python_config(spec):
    """``path/to/file.py[:arg]`` whose ``get_config(arg)`` returns a ConfigDict with ``model``."""
    cfg = load_python_config(spec)
    if "model" not in cfg:
        raise SafeTriageError(f"{spec}: get_config() must return a ConfigDict with a 'model' field.")
    return TPSMMConfig.from_dict(dict(cfg.model))


def load_model_config(spec, image_size=None) -> TPSMMConfig:
    """A model config from a preset name, upstream YAML, or ``configs/*.py[:variant]``."""
    spec = str(spec)
    if spec in PRESETS:
        return PRESETS[spec]
    if spec.endswith((".yaml", ".yml")):
        return from_upstream_yaml(spec, image_size)
    if spec.partition(":")[0].endswith(".py"):
        return _from_python_config(spec)
    if spec.partition(":")[2] or "/" in spec:  # a path with a variant, but not a .py file
        locate_config(spec.partition(":")[0])
    raise SafeTriageError(f"Unknown config {spec!r}: pass an upstream YAML file, a configs/*.py "
                          f"file (optionally :variant), or one of {', '.join(PRESETS)}.")
