"""Maps upstream PyTorch TPSMM checkpoints (``.pth.tar``) to Flax variables and back.

The Flax modules mirror upstream's module tree, so the mapping is mechanical: a Flax path
``params/kp_detector/fg_encoder/layer2_0/downsample_1/scale`` is the tensor
``checkpoint["kp_detector"]["fg_encoder.layer2.0.downsample.1.weight"]``. Convolution kernels
go OIHW <-> HWIO, linear weights are transposed, BatchNorm running statistics live in
``batch_stats`` and the anti-alias kernel in ``buffers``. Every shape is checked and every
checkpoint tensor must be used (BatchNorm's ``num_batches_tracked`` counters carry no weights
and are written back as 0 on export). :func:`port_vgg19` ports torchvision's VGG-19 weights
for the perceptual loss the same way (``features.28.weight`` <-> ``params/features_28/kernel``).
"""

import pathlib
import re

import numpy as np
from flax import traverse_util

from safetriage_jax import outputs
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models import vgg
from safetriage_jax.models.config import TPSMMConfig
from safetriage_jax.models.tpsmm import SUBMODULES, variable_shapes

OPTIONAL_MODULES = ("avd_network",)  # older/partial checkpoints may lack it
TRAINING_STATE_PREFIXES = ("optimizer", "epoch", "scheduler")
VGG19_FILE_HINT = ("it is the file vgg19-dcbb9e9d.pth that torchvision.models.vgg19(weights="
                   "\"IMAGENET1K_V1\") downloads to ~/.cache/torch/hub/checkpoints/; pass that path "
                   "(perceptual_weights: random exists only for tests and smoke runs).")
_INDEXED = re.compile(r"^(.*)_(\d+)$")
_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias",
               ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var", ("buffers", "kernel"): "weight"}


def torch_key(flax_path):
    """(collection, module, sub, ..., leaf) -> (module, 'sub.0.name.weight')."""
    collection, module, *inner, leaf = flax_path
    parts = []
    for name in inner:
        match = _INDEXED.match(name)
        parts.extend([match.group(1), match.group(2)] if match else [name])
    parts.append(_TORCH_LEAF[(collection, leaf)])
    return module, ".".join(parts)


def to_flax_layout(array, flax_path):
    """Torch layout -> Flax layout for one tensor at ``flax_path``."""
    if flax_path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if flax_path[-1] == "kernel" and array.ndim == 2:
        return array.T
    return array


def to_torch_layout(array, flax_path):
    """Flax layout -> torch layout (inverse of :func:`to_flax_layout`)."""
    if flax_path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if flax_path[-1] == "kernel" and array.ndim == 2:
        return array.T
    return array


def _torch_shape(shape, flax_path):
    """The torch-layout shape of a Flax tensor shape (for error messages; allocates nothing)."""
    return tuple(to_torch_layout(np.broadcast_to(np.float32(0), shape), flax_path).shape)


def _require_torch():
    try:
        import torch
    except ImportError:
        raise SafeTriageError(
            "Reading or writing PyTorch checkpoints needs PyTorch: pip install 'safetriage-jax[torch]'."
        ) from None
    return torch


def _torch_load(path, what, missing_hint, expected):
    """``torch.load(weights_only=True)`` with one-line errors for a missing or unreadable file."""
    torch = _require_torch()
    from safetriage_jax.inputs import require_file
    path = require_file(path, what, missing_hint[:1].upper() + missing_hint[1:])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise SafeTriageError(f"Could not read {path} as a PyTorch checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}). Is the file "
                              f"complete and {expected}?") from None


def _numpy_state(state):
    """state_dict -> {key: numpy array} (floats as float32), a DataParallel ``module.`` stripped."""
    torch = _require_torch()
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
            for k, v in state.items() if torch.is_tensor(v)}


def load_torch_checkpoint(path):
    """Loads a ``.pth.tar`` as {module name: {key: float32 numpy array}} (tensors only)."""
    raw = _torch_load(path, "Checkpoint", "download an upstream TPSMM checkpoint (e.g. "
                      "vox.pth.tar) or pass the right path.", "a torch.save of upstream TPSMM's models")
    if not isinstance(raw, dict):
        raise SafeTriageError(f"{path} holds a {type(raw).__name__}, not upstream TPSMM's dict of "
                              "per-network state_dicts.")
    modules = {}
    for name, state in raw.items():
        if name.startswith(TRAINING_STATE_PREFIXES):
            continue
        if not isinstance(state, dict):
            continue
        if name not in SUBMODULES:
            raise SafeTriageError(
                f"{path} has a network {name!r} that TPSMM does not have (expected "
                f"{', '.join(SUBMODULES)}): is this a TPSMM checkpoint?")
        modules[name] = _numpy_state(state)
    if not modules:
        raise SafeTriageError(f"{path} contains no TPSMM network state_dicts "
                              f"(top-level keys: {sorted(raw)}).")
    return modules


def torch_to_flax(modules, config: TPSMMConfig):
    """Builds Flax variables for ``config`` from upstream state_dicts; strict on keys and shapes."""
    template = traverse_util.flatten_dict(variable_shapes(config))
    needed = sorted({path[1] for path in template})
    for module in needed:
        if module not in modules and module not in OPTIONAL_MODULES:
            raise SafeTriageError(
                f"The checkpoint has no {module!r} network but the config needs one "
                f"(networks present: {sorted(modules)}). For a checkpoint without a background "
                "predictor set common_params.bg: False.")
    flat, used = {}, set()
    for path, shape_dtype in template.items():
        module, key = torch_key(path)
        if module not in modules:
            continue
        if key not in modules[module]:
            raise SafeTriageError(
                f"Checkpoint and config do not match: {module}.{key} is missing from the "
                f"checkpoint (needed for Flax {'/'.join(path)}, shape {shape_dtype.shape}). "
                "Check the config's num_tps, widths and bg/multi_mask settings.")
        value = to_flax_layout(modules[module][key], path)
        if value.shape != shape_dtype.shape:
            raise SafeTriageError(
                f"Checkpoint and config do not match at {module}.{key}: the checkpoint has shape "
                f"{tuple(modules[module][key].shape)} but the config needs "
                f"{_torch_shape(shape_dtype.shape, path)}. Use the "
                "config the checkpoint was trained with.")
        flat[path] = np.asarray(value, dtype=np.float32)
        used.add((module, key))
    unused = sorted(f"{module}.{key}" for module, state in modules.items() for key in state
                    if (module, key) not in used and not key.endswith("num_batches_tracked"))
    if unused:
        raise SafeTriageError(
            f"Checkpoint and config do not match: {len(unused)} checkpoint tensors have no place "
            f"in the model, the first is {unused[0]}. Check num_tps, widths and bg/multi_mask.")
    return traverse_util.unflatten_dict(flat)


def flax_to_torch(variables):
    """Upstream-layout ``{module: state_dict}`` (torch tensors) from Flax variables."""
    torch = _require_torch()
    modules = {}
    for path, value in traverse_util.flatten_dict(variables).items():
        module, key = torch_key(path)
        tensor = torch.from_numpy(np.array(to_torch_layout(np.asarray(value), path), order="C"))  # a writable copy
        modules.setdefault(module, {})[key] = tensor
        if key.endswith("running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            modules[module][counter] = torch.tensor(0, dtype=torch.int64)
    return modules


def port_checkpoint(checkpoint_path, config: TPSMMConfig):
    """Upstream ``.pth.tar`` -> Flax variables for ``config``; NaN or infinite weights rejected."""
    from safetriage_jax.model_dir import check_finite
    variables = torch_to_flax(load_torch_checkpoint(checkpoint_path), config)
    check_finite(variables, f"The weights in {checkpoint_path}")
    return variables


def export_checkpoint(variables, out_path, epoch=0, *, overwrite=False, inputs=()):
    """Writes Flax variables as an upstream ``.pth.tar``, atomically; an existing file is
    replaced (with ``overwrite``) only if it is a torch checkpoint, never an input."""
    torch = _require_torch()
    size = sum(np.asarray(v).nbytes for v in traverse_util.flatten_dict(variables).values())
    with outputs.atomic_file(out_path, "torch", overwrite=overwrite, inputs=inputs,
                             need_bytes=size) as staging:
        payload = dict(flax_to_torch(variables), epoch=epoch)
        payload[outputs.MARK_KEY] = outputs.new_mark()  # upstream's loader ignores it
        with open(staging, "wb") as f:
            torch.save(payload, f)


def port_vgg19(path):
    """torchvision VGG-19 state_dict file (``vgg19-dcbb9e9d.pth``) -> ``{"params": ...}`` for
    :class:`~safetriage_jax.models.vgg.VGG19Features` (``features.{i}`` up to 28; the rest ignored)."""
    raw = _torch_load(path, "VGG-19 weights file", VGG19_FILE_HINT, "torchvision's VGG-19 state_dict")
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise SafeTriageError(f"{path} holds a {type(raw).__name__}, not a VGG-19 state_dict; "
                              f"{VGG19_FILE_HINT}")
    state, flat = _numpy_state(raw), {}
    for flax_path, shape_dtype in traverse_util.flatten_dict(vgg.variable_shapes()).items():
        _, key = torch_key((flax_path[0], "vgg19", *flax_path[1:]))
        needed = _torch_shape(shape_dtype.shape, flax_path)
        got = f"has shape {tuple(state[key].shape)}" if key in state else "is missing"
        if key not in state or state[key].shape != needed:
            raise SafeTriageError(f"{path} is not torchvision's VGG-19 state_dict: {key} {got} but "
                                  f"VGG-19 needs {needed}; {VGG19_FILE_HINT}")
        flat[flax_path] = np.asarray(to_flax_layout(state[key], flax_path), np.float32)
    return traverse_util.unflatten_dict(flat)


def load_weights(checkpoint, config_spec=None, image_size=None):
    """(config, variables) from a model directory, or from an upstream ``.pth.tar`` with the
    model config ``config_spec`` (a preset name, upstream YAML or configs/*.py[:variant]).
    ``image_size`` sets the resolution the model runs at."""
    import dataclasses

    from safetriage_jax import model_dir as ckpt
    from safetriage_jax.models.config import load_model_config
    path = pathlib.Path(checkpoint)
    if path.is_dir():
        config, variables = ckpt.load_model(path)
    elif not config_spec:
        raise SafeTriageError(f"{path} is an upstream checkpoint: it needs the model config it "
                              "was trained with (e.g. config/vox-256.yaml).")
    else:
        config = load_model_config(config_spec, image_size=image_size)
        variables = port_checkpoint(path, config)
    if image_size and image_size != config.image_size:
        config = dataclasses.replace(config, image_size=image_size)
    return config, variables


def port_to_directory(checkpoint_path, config: TPSMMConfig, out_dir, *, safetensors=False,
                      overwrite=False, inputs=()):
    """Ports an upstream checkpoint into a model directory; the output is checked first (never
    an input or a folder holding one; replaced only if it is a model directory)."""
    from safetriage_jax import model_dir as ckpt
    inputs = (checkpoint_path, *inputs)
    size = pathlib.Path(checkpoint_path).stat().st_size if pathlib.Path(checkpoint_path).is_file() else 0
    outputs.check_output(out_dir, "folder", inputs=inputs, overwrite=overwrite, need_bytes=size)
    variables = port_checkpoint(checkpoint_path, config)
    return ckpt.save_model(out_dir, config, variables, safetensors=safetensors,
                           overwrite=overwrite, inputs=inputs)
