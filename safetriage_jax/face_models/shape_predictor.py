"""dlib's 68-point shape predictor (Kazemi & Sullivan's cascade of regression trees) in JAX.

The model file (``shape_predictor_68_face_landmarks.dat`` of ``face-recognition-models``) is
parsed with numpy into stacked arrays, and the whole cascade runs as one jitted function,
batched over faces, with the semantics of dlib's C++ (dlib/image_processing/shape_predictor.h):

- Shapes live in box-normalised coordinates: (0, 0) is the box's top-left pixel and (1, 1)
  its bottom-right one (dlib's rectangles include their right and bottom edges).
- Each of the L cascade levels reads P feature pixels. Pixel p sits at ``delta_p`` from its
  anchor landmark, an offset given in the mean (initial) shape; it is moved into the current
  shape by the similarity transform (least squares, Umeyama) from the mean shape to the current
  one, mapped to image pixels and rounded (``floor(v + 0.5)``). Its value is the grey level
  ``(r + g + b) // 3`` there, 0 outside the image.
- Each of the T trees of a level is complete, of depth D: at a node, go left when
  ``pixel[i] - pixel[j] > threshold``; the leaf's vector (68 x 2) is added to the shape.
- The final shape is mapped to the box and rounded like the feature pixels: dlib returns
  integer points.
"""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax.deid.faces import dlib_rectangles  # the box rule dlib's predictor gets too
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.face_models import dlib_format

MODEL_FILE = "shape_predictor_68_face_landmarks.dat"


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (device_arrays' cache)
class ShapePredictor:
    """The predictor's arrays. L levels, T trees a level, S = 2**D - 1 splits and K = 2**D
    leaves a tree, P feature pixels a level, N landmarks."""

    initial_shape_N2: np.ndarray  # float32, the mean shape, box-normalised
    anchors_LP: np.ndarray  # int32, the landmark each feature pixel hangs from
    deltas_LP2: np.ndarray  # float32, its offset from that landmark in the mean shape
    split_pixels_LTS2: np.ndarray  # int32, the two feature pixels each split compares
    thresholds_LTS: np.ndarray  # float32
    leaves_LTKN2: np.ndarray  # float32, the shape change each leaf adds

    @property
    def depth(self):
        return int(np.log2(self.leaves_LTKN2.shape[2]))


class _Ints:
    """A cursor over a file's integers."""

    def __init__(self, ints_I):
        self.ints_I, self.at = ints_I, 0

    def take(self, count):
        if self.at + count > len(self.ints_I):
            raise SafeTriageError("ends early")
        self.at += count
        return self.ints_I[self.at - count:self.at]

    def one(self):
        return int(self.take(1)[0])

    def floats(self, count):
        pairs_C2 = self.take(2 * count).reshape(count, 2)
        return dlib_format.floats_from_ints(pairs_C2[:, 0], pairs_C2[:, 1]).astype(np.float32)


def default_model_path():
    from safetriage_jax.deid.faces import _models_dir  # the one place that finds the models
    return _models_dir() / MODEL_FILE


@functools.lru_cache(maxsize=2)
def load_shape_predictor(path=None):
    """Parses a dlib shape predictor file (default: the 68-point model). ~5 s on one core."""
    path = pathlib.Path(path) if path is not None else default_model_path()
    if not path.is_file():
        raise SafeTriageError(f"Shape predictor {path} does not exist; reinstall "
                              "`face-recognition-models==0.3.0`.")
    try:
        with open(path, "rb") as f:
            version = dlib_format.read_int(f)
            if version != 1:
                raise SafeTriageError(f"unknown shape_predictor version {version}")
            return _parse(_Ints(dlib_format.read_ints(f)))
    except (SafeTriageError, OSError) as err:
        raise SafeTriageError(f"Could not read the shape predictor {path}: {err}") from None


def _parse(ints):
    """The predictor from its integers: initial shape, forests, anchors, deltas (dlib's order)."""
    rows, columns = abs(ints.one()), abs(ints.one())
    initial_N2 = ints.floats(rows * columns).reshape(-1, 2)
    num_values = initial_N2.size
    splits, leaves = [], []
    for _ in range(ints.one()):  # cascade levels
        level_splits, level_leaves = [], []
        for _ in range(ints.one()):  # trees
            num_splits = ints.one()
            level_splits.append(ints.take(4 * num_splits).reshape(num_splits, 4))
            num_leaves = ints.one()
            if num_leaves != num_splits + 1 or num_leaves & (num_leaves - 1):
                raise SafeTriageError(f"a tree with {num_splits} splits and {num_leaves} leaves "
                                      "(only complete trees are supported)")
            block_KV = ints.take(num_leaves * (2 + 2 * num_values)).reshape(num_leaves, -1)
            if np.any(np.abs(block_KV[:, :2]) != (num_values, 1)):
                raise SafeTriageError("a leaf whose size is not the shape's")
            level_leaves.append(block_KV[:, 2:])
        splits.append(level_splits)
        leaves.append(level_leaves)
    anchors = [ints.take(ints.one()) for _ in range(ints.one())]
    deltas = [ints.floats(2 * ints.one()).reshape(-1, 2) for _ in range(ints.one())]
    if ints.at != len(ints.ints_I):
        raise SafeTriageError("unexpected data after the model")
    try:
        splits_LTS4, leaf_ints_LTKV = np.array(splits), np.array(leaves)
        anchors_LP, deltas_LP2 = np.array(anchors), np.array(deltas)
    except ValueError:
        raise SafeTriageError("levels or trees of different sizes (not supported)") from None
    if not (len(splits_LTS4) == len(anchors_LP) == len(deltas_LP2) and splits_LTS4.size):
        raise SafeTriageError("as many levels of trees, anchors and deltas are needed")
    indices = (anchors_LP, len(initial_N2)), (splits_LTS4[..., :2], anchors_LP.shape[1])
    if any(index.min() < 0 or index.max() >= limit for index, limit in indices):
        raise SafeTriageError("an index out of range")
    leaves_LTKN2 = dlib_format.floats_from_ints(leaf_ints_LTKV[..., 0::2],
                                                leaf_ints_LTKV[..., 1::2]).astype(np.float32)
    return ShapePredictor(
        initial_shape_N2=initial_N2,
        anchors_LP=anchors_LP.astype(np.int32),
        deltas_LP2=deltas_LP2,
        split_pixels_LTS2=splits_LTS4[..., :2].astype(np.int32),
        thresholds_LTS=dlib_format.floats_from_ints(splits_LTS4[..., 2],
                                                    splits_LTS4[..., 3]).astype(np.float32),
        leaves_LTKN2=leaves_LTKN2.reshape(*leaves_LTKN2.shape[:3], -1, 2))


def grey(images_BHW3):
    """dlib's grey level of RGB pixels: (r + g + b) // 3; grey images pass through."""
    if images_BHW3.ndim == 3:
        return images_BHW3.astype(jnp.int32)
    return jnp.sum(images_BHW3.astype(jnp.int32), -1) // 3


def _to_pixels(offset, scale, u):
    """``offset + floor(scale * u + 0.5)`` exactly as dlib computes it in double precision, in
    int32 arithmetic: a box-normalised float32 coordinate -> a pixel index.

    Float32 rounds ``scale * u`` and now and then moves a read across a pixel boundary (one of
    22 driving-video faces); the cascade is chaotic (another pixel, another leaf), so every
    read must match. With
    ``u = m * 2**-shift`` (m a 24-bit integer, split into 12-bit halves ``hi * 4096 + lo``)
    every product below fits in int32. Exact for integer ``scale`` < 4096 and |u| < 2**11.
    """
    fraction, exponent = jnp.frexp(u)
    mantissa = (fraction * 2.0 ** 24).astype(jnp.int32)  # u = mantissa * 2**-shift, exactly
    shift = jnp.clip(24 - exponent, 13, 36)
    high, low = mantissa >> 12, mantissa & 0xFFF  # mantissa = high * 4096 + low, low >= 0
    # floor((scale * mantissa + 2**(shift - 1)) / 2**shift), one power of two at a time
    total = scale * high + (1 << (shift - 13)) + ((scale * low) >> 12)
    rounded = jnp.where(24 - exponent > 36, 0, total >> (shift - 12))  # |scale * u| < 1/2
    return offset + rounded


def _split_weights(weights_N2, parts=4, bits=12):
    """float64 weights -> (parts, N, 2) float32 pieces of ``bits`` significant bits each (their
    sum is the weight to ~2**-48): a piece times a 12-bit float32 is exact in float32."""
    pieces, rest = [], np.asarray(weights_N2, np.float64)
    for _ in range(parts):
        fraction, exponent = np.frexp(rest)
        piece = np.ldexp(np.round(fraction * 2.0 ** bits), exponent - bits)
        pieces.append(piece)
        rest = rest - piece
    return np.stack(pieces).astype(np.float32)


def _halves(x):
    """x = high + low exactly, each with at most 12 significant bits (bit mask, no rounding)."""
    high = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.int32) & ~0xFFF, jnp.float32)
    return high, x - high


def _two_sum(a, b):
    """a + b = total + error exactly (Knuth), additions only: no fused multiply-add can touch it."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def _exact_dot(x_BK, pieces_JK):
    """sum_k x_k * w_k to ~2**-44 relative, in float32: exact products of 12-bit halves of x
    and the weights' pieces, summed pairwise in double-float (hi + lo) arithmetic."""
    high_BK, low_BK = _halves(x_BK)
    terms_BM = jnp.concatenate([high_BK[:, None] * pieces_JK, low_BK[:, None] * pieces_JK],
                               1).reshape(x_BK.shape[0], -1)
    hi_BM, lo_BM = terms_BM, jnp.zeros_like(terms_BM)
    while hi_BM.shape[1] > 1:
        if hi_BM.shape[1] % 2:
            hi_BM, lo_BM = (jnp.pad(v, ((0, 0), (0, 1))) for v in (hi_BM, lo_BM))
        total, error = _two_sum(hi_BM[:, 0::2], hi_BM[:, 1::2])
        error = error + (lo_BM[:, 0::2] + lo_BM[:, 1::2])
        hi_BM = total + error
        lo_BM = error - (hi_BM - total)
    return (hi_BM + lo_BM)[:, 0]


def similarity_weights(initial_N2):
    """Pieces (see _split_weights) of the weights that give the similarity's (a, b) as linear
    functions of the target shape: with c = initial - its mean, a = sum(to . c) / sum(|c|^2),
    b = sum(to x c) / sum(|c|^2) (Umeyama's least squares written out for 2-D, no SVD)."""
    centred_N2 = initial_N2.astype(np.float64) - initial_N2.astype(np.float64).mean(0)
    norm = (centred_N2 ** 2).sum()
    a_N2 = centred_N2 / norm
    b_N2 = np.stack([-centred_N2[:, 1], centred_N2[:, 0]], -1) / norm
    return _split_weights(a_N2).reshape(4, -1), _split_weights(b_N2).reshape(4, -1)


def _similarity(weights_a_JK, weights_b_JK, to_BN2):
    """The 2x2 part [[a, -b], [b, a]] of the least-squares similarity from the mean shape to
    each of ``to_BN2``, rounded to float32 from (nearly) the exact value, as dlib rounds its
    double-precision one: float32 sums are off by an ulp or two, which moves a feature pixel
    across a pixel boundary now and then."""
    to_BK = to_BN2.reshape(to_BN2.shape[0], -1)
    return _exact_dot(to_BK, weights_a_JK), _exact_dot(to_BK, weights_b_JK)


def _level(params, grey_BHW, rects_B4, level, shape_BN2):
    """One cascade level: read its feature pixels around ``shape_BN2``, run its trees."""
    batch, height, width = grey_BHW.shape
    a_B, b_B = _similarity(params["weights_a_JK"], params["weights_b_JK"], shape_BN2)
    deltas_P2 = params["deltas_LP2"][level]
    anchor_BP2 = shape_BN2[:, params["anchors_LP"][level]]
    # dlib rounds each product before adding: keep a fused multiply-add (GPUs) from merging them
    products = jax.lax.optimization_barrier(
        [a_B[:, None] * deltas_P2[:, 0], b_B[:, None] * deltas_P2[:, 1],
         b_B[:, None] * deltas_P2[:, 0], a_B[:, None] * deltas_P2[:, 1]])
    u_BP = products[0] - products[1] + anchor_BP2[..., 0]
    v_BP = products[2] + products[3] + anchor_BP2[..., 1]
    left, top, right, bottom = (rects_B4[:, i, None] for i in range(4))
    column_BP = _to_pixels(left, right - left, u_BP)
    row_BP = _to_pixels(top, bottom - top, v_BP)
    inside_BP = (column_BP >= 0) & (column_BP < width) & (row_BP >= 0) & (row_BP < height)
    flat_BP = jnp.where(inside_BP, row_BP * width + column_BP, 0)
    pixels_BP = jnp.where(inside_BP, jnp.take_along_axis(grey_BHW.reshape(batch, -1), flat_BP, 1),
                          0).astype(jnp.float32)

    splits_TS2, thresholds_TS = params["split_pixels_LTS2"][level], params["thresholds_LTS"][level]
    num_trees, num_splits = thresholds_TS.shape
    first_T = jnp.arange(num_trees) * num_splits  # each tree's nodes in the flattened arrays
    node_BT = jnp.zeros((batch, num_trees), jnp.int32)
    for _ in range(params["depth"]):
        flat_BT = first_T + node_BT
        pair_BT2 = splits_TS2.reshape(-1, 2)[flat_BT]
        compared_BT2 = jnp.take_along_axis(pixels_BP, pair_BT2.reshape(batch, -1), 1).reshape(
            pair_BT2.shape)
        threshold_BT = thresholds_TS.reshape(-1)[flat_BT]
        go_left_BT = compared_BT2[..., 0] - compared_BT2[..., 1] > threshold_BT
        node_BT = 2 * node_BT + jnp.where(go_left_BT, 1, 2)
    leaves_TKN2 = params["leaves_LTKN2"][level]
    num_leaves = leaves_TKN2.shape[1]
    leaf_BT = jnp.arange(num_trees) * num_leaves + node_BT - num_splits
    changes_TBN2 = leaves_TKN2.reshape(num_trees * num_leaves, -1, 2)[leaf_BT.T]
    # Tree by tree, in order, as dlib adds them: float sums depend on the order (see _to_pixels).
    shape_BN2, _ = jax.lax.scan(lambda shape, change: (shape + change, None), shape_BN2,
                                changes_TBN2, unroll=10)
    return shape_BN2


@functools.partial(jax.jit, static_argnames="depth")
def cascade(arrays, grey_BHW, rects_B4, depth):
    """On the device: (B, N, 2) box-normalised shapes of the faces in dlib rectangles
    (``dlib_rectangles``) of int32 grey images (``grey``); ``arrays`` from ``device_arrays``,
    ``depth`` the trees' (``ShapePredictor.depth``). Map them with ``to_image``."""
    params = dict(arrays, depth=depth)
    initial_N2 = arrays["initial_N2"]
    shape_BN2 = jnp.broadcast_to(initial_N2, (grey_BHW.shape[0], *initial_N2.shape))
    shape_BN2 = jax.lax.fori_loop(
        0, arrays["anchors_LP"].shape[0],
        lambda level, shape: _level(params, grey_BHW, rects_B4, level, shape), shape_BN2)
    return shape_BN2


@functools.lru_cache(maxsize=2)
def device_arrays(predictor):
    """The predictor's arrays on the default device (about 70 MB for the 68-point model)."""
    weights_a_JK, weights_b_JK = similarity_weights(predictor.initial_shape_N2)
    arrays = {"initial_N2": predictor.initial_shape_N2,
              "weights_a_JK": weights_a_JK, "weights_b_JK": weights_b_JK,
              "anchors_LP": predictor.anchors_LP, "deltas_LP2": predictor.deltas_LP2,
              "split_pixels_LTS2": predictor.split_pixels_LTS2,
              "thresholds_LTS": predictor.thresholds_LTS, "leaves_LTKN2": predictor.leaves_LTKN2}
    return jax.device_put(arrays)


def landmarks_batch(images, boxes_B4, predictor=None, subpixel=False):
    """Landmarks (B, N, 2) of the face in each box, as dlib's predictor gives them.

    ``images``: (B, H, W, 3) RGB or (B, H, W) grey uint8, or a list of such images of any sizes
    (zero-padded to one size, which changes nothing: dlib reads 0 outside an image).
    ``boxes_B4``: float [x0, y0, x1, y1], as ``FaceModels.landmarks`` takes them.
    Points are dlib's integers unless ``subpixel`` (the unrounded positions).
    """
    predictor = predictor or load_shape_predictor()
    images = _stack(images)
    rects_B4 = dlib_rectangles(boxes_B4)
    if len(rects_B4) != len(images):
        raise SafeTriageError(f"{len(images)} images but {len(rects_B4)} boxes; give one box per "
                              "image.")
    shape_BN2 = cascade(device_arrays(predictor), grey(jnp.asarray(images)),
                        jnp.asarray(rects_B4), predictor.depth)
    return to_image(np.asarray(shape_BN2), rects_B4, subpixel)


def to_image(shape_BN2, rects_B4, subpixel=False):
    """Box-normalised shapes -> image points, in float64 as dlib maps them, rounded unless
    ``subpixel``."""
    left, top, right, bottom = (rects_B4[:, i, None].astype(np.float64) for i in range(4))
    points_BN2 = np.stack([left + (right - left) * shape_BN2[..., 0],
                           top + (bottom - top) * shape_BN2[..., 1]], -1)
    return points_BN2 if subpixel else np.floor(points_BN2 + 0.5)


def _stack(images):
    """One (B, H, W[, 3]) array: a list of images zero-padded at the bottom and right."""
    if isinstance(images, np.ndarray):
        return images
    height = max(image.shape[0] for image in images)
    width = max(image.shape[1] for image in images)
    out = np.zeros((len(images), height, width, *images[0].shape[2:]), np.uint8)
    for i, image in enumerate(images):
        out[i, :image.shape[0], :image.shape[1]] = image
    return out
