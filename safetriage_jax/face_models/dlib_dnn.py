"""Reads a network saved by dlib's DNN toolkit (dlib/dnn/core.h, layers.h, input.h, loss.h, 20.0).

dlib serializes a network by its C++ type, outermost first, each layer writing its version and
then its whole sub-network before its own record: so a file holds the loss record, then one
version number per layer from the top down, then the input layer's record, then each layer's
record from the bottom up. Tag and skip layers write only a version, so which is which comes
from the network's type: the caller passes the layer kinds, bottom to top. Parameters come back
as numpy arrays in dlib's layouts (filters (out, in, rows, cols), fc weights (in, out)).
"""

import numpy as np

from safetriage_jax.errors import SafeTriageError
from safetriage_jax.face_models.dlib_format import (read_bool, read_float, read_int, read_str)

STRUCTURAL = ("tag1", "tag2", "skip1")  # layers that only route tensors and write no record


def read_tensor(f) -> np.ndarray:
    """A resizable_tensor: version 2, (samples, k, rows, cols), then little-endian float32s."""
    version = read_int(f)
    if version != 2:
        raise SafeTriageError(f"unknown dlib tensor version {version}")
    shape = tuple(read_int(f) for _ in range(4))
    count = int(np.prod(shape))
    data = f.read(4 * count)
    if len(data) != 4 * count:
        raise SafeTriageError("dlib stream ended inside a tensor")
    return np.frombuffer(data, "<f4").reshape(shape).astype(np.float32)


def read_alias_tensor(f) -> tuple:
    """An alias_tensor: version 1 and a (samples, k, rows, cols) shape; no data."""
    version = read_int(f)
    if version != 1:
        raise SafeTriageError(f"unknown dlib alias_tensor version {version}")
    return tuple(read_int(f) for _ in range(4))


def _expect(name, allowed):
    if name not in allowed:
        raise SafeTriageError(f"unexpected dlib layer record {name!r}; expected one of {allowed}")


def read_con(f):
    name = read_str(f)
    _expect(name, ("con_4", "con_5", "con_6"))
    params = read_tensor(f).ravel()
    num_filters, rows, cols = read_int(f), read_int(f), read_int(f)
    stride = (read_int(f), read_int(f))
    padding = (read_int(f), read_int(f))
    filters_shape, _ = read_alias_tensor(f), read_alias_tensor(f)  # biases: implied by the filters
    for _ in range(4):  # learning-rate and weight-decay multipliers
        read_float(f)
    use_bias = read_bool(f) if name in ("con_5", "con_6") else True
    if name == "con_6" and read_bool(f):  # use_relu: set when dlib fuses a following relu
        raise SafeTriageError("con_ records with a fused relu are not supported")
    if filters_shape[0] != num_filters or filters_shape[2:] != (rows, cols):
        raise SafeTriageError(f"con_ record: filters {filters_shape} for {num_filters} filters of "
                         f"{rows}x{cols}")
    weight = params[:int(np.prod(filters_shape))].reshape(filters_shape)
    bias = params[weight.size:weight.size + num_filters] if use_bias else np.zeros(num_filters,
                                                                                 np.float32)
    return {"kind": "con", "weight_OIHW": weight, "bias": bias, "stride": stride,
            "padding": padding}


def read_affine(f):
    """An affine_ record, or a bn_con2 one, folded into scale and shift as dlib does on load."""
    name = read_str(f)
    _expect(name, ("affine_", "affine_2", "bn_con2"))
    params = read_tensor(f).ravel()
    gamma_shape, _ = read_alias_tensor(f), read_alias_tensor(f)
    channels = int(np.prod(gamma_shape))
    gamma, beta = params[:channels], params[channels:2 * channels]
    if name != "bn_con2":
        read_int(f)  # mode (conv or fc)
        if name == "affine_2" and read_bool(f):
            gamma, beta = np.ones_like(gamma), np.zeros_like(beta)  # a disabled layer
        return {"kind": "affine", "scale": gamma, "shift": beta}
    for _ in range(2):  # batch means and inverse standard deviations (training only)
        read_tensor(f)
    running_mean, running_var = read_tensor(f).ravel(), read_tensor(f).ravel()
    read_int(f), read_float(f)  # num_updates, running_stats_window_size
    for _ in range(4):
        read_float(f)
    eps = np.float32(read_float(f))
    scale = gamma / np.sqrt(running_var + eps)
    return {"kind": "affine", "scale": scale, "shift": beta - scale * running_mean}


def read_relu(f):
    name = read_str(f)
    _expect(name, ("relu_", "relu_2"))
    if name == "relu_2" and read_bool(f):
        raise SafeTriageError("disabled relu layers are not supported")
    return {"kind": "relu"}


def read_add_prev(f):
    _expect(read_str(f), ("add_prev_",))
    return {"kind": "add_prev"}


def _read_pool(f, kind, version):
    _expect(read_str(f), (version,))
    window = (read_int(f), read_int(f))
    stride = (read_int(f), read_int(f))
    padding = (read_int(f), read_int(f))
    return {"kind": kind, "window": window, "stride": stride, "padding": padding}


def read_max_pool(f):
    return _read_pool(f, "max_pool", "max_pool_2")


def read_avg_pool(f):
    """avg_pool_2; a (0, 0) window means the whole image (dlib's avg_pool_everything)."""
    return _read_pool(f, "avg_pool", "avg_pool_2")


def read_fc(f):
    name = read_str(f)
    _expect(name, ("fc_2", "fc_3"))
    num_outputs, num_inputs = read_int(f), read_int(f)
    params = read_tensor(f).ravel()
    read_alias_tensor(f), read_alias_tensor(f)
    has_bias = read_int(f) == 0  # dlib's FC_HAS_BIAS = 0, FC_NO_BIAS = 1
    for _ in range(4):
        read_float(f)
    if name == "fc_3":
        has_bias = read_bool(f) and has_bias
    weight = params[:num_inputs * num_outputs].reshape(num_inputs, num_outputs)
    bias = params[weight.size:weight.size + num_outputs] if has_bias else None
    return {"kind": "fc", "weight_IO": weight, "bias": bias}


def read_input_rgb_image_sized(f):
    _expect(read_str(f), ("input_rgb_image_sized",))
    mean_rgb = np.array([read_float(f) for _ in range(3)], np.float32)
    return {"kind": "input", "mean_rgb": mean_rgb, "size": (read_int(f), read_int(f))}


def read_loss_metric(f):
    name = read_str(f)
    _expect(name, ("loss_metric_", "loss_metric_2"))
    margin, threshold = (read_float(f), read_float(f)) if name == "loss_metric_2" else (0.1, 0.75)
    return {"kind": "loss_metric", "margin": margin, "distance_threshold": threshold}


LAYER_READERS = {"con": read_con, "affine": read_affine, "relu": read_relu,
                 "add_prev": read_add_prev, "max_pool": read_max_pool, "avg_pool": read_avg_pool,
                 "fc": read_fc}


def _skip_add_layer_state(f, bottom):
    """The training state an add_layer writes after its record (flags, cached tensors)."""
    for _ in range(3):
        read_bool(f)
    for _ in range(3):  # x_grad, cached_output, params_grad (grad_final at the bottom)
        read_tensor(f)
    if bottom:
        read_int(f)  # sample expansion factor (version 3 only; checked by the caller)


def read_network(f, kinds_bottom_up, read_input, read_loss):
    """Reads a whole network whose layers, bottom to top, have these kinds (``LAYER_READERS``
    keys or ``STRUCTURAL`` names; the bottom one must be a real layer).

    Returns (loss record, input record, [layer record or {"kind": tag/skip name}] bottom up).
    """
    if read_int(f) != 1:
        raise SafeTriageError("not a dlib add_loss_layer (version 1 expected)")
    loss = read_loss(f)
    versions = [read_int(f) for _ in kinds_bottom_up][::-1]  # written top down
    for kind, version in zip(kinds_bottom_up[1:], versions[1:]):
        expected = 1 if kind in STRUCTURAL else 2
        if version != expected:
            raise SafeTriageError(f"layer {kind}: version {version}, expected {expected}; the file "
                             "does not hold the expected network")
    if versions[0] not in (2, 3):
        raise SafeTriageError(f"bottom layer version {versions[0]}, expected 2 or 3")
    inputs = read_input(f)
    layers = []
    for index, kind in enumerate(kinds_bottom_up):
        if kind in STRUCTURAL:
            layers.append({"kind": kind})
            continue
        record = LAYER_READERS[kind](f)
        _skip_add_layer_state(f, bottom=index == 0 and versions[0] == 3)
        layers.append(record)
    if f.read(1):
        raise SafeTriageError("trailing data after the network: the file holds another network")
    return loss, inputs, layers
