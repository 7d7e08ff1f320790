"""dlib's 68-point shape predictor in JAX against dlib's own C++, on real faces; the dlib
serialization reader on hand-made bytes."""

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SAMPLES
from safetriage_jax.deid.faces import face_models, find_faces, resize
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.face_models import dlib_format, shape_predictor
from safetriage_jax.video import VideoReader, read_image


# ---- dlib's serialization, written here from its documented format -------------------------

def _int(value):
    magnitude = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(magnitude) | (0x80 if value < 0 else 0)]) + magnitude


def _float(value):
    if math.isnan(value):
        return _int(0) + _int(32002)
    if math.isinf(value):
        return _int(0) + _int(32000 if value > 0 else 32001)
    fraction, exponent = math.frexp(value)
    return _int(int(fraction * 2 ** 53)) + _int(exponent - 53)


def test_reader_decodes_every_primitive():
    matrix = np.array([[1.5, -2.25, 3e-7], [0.0, 1e6, -0.1]], np.float32)
    data = (_int(0) + _int(-1) + _int(255) + _int(-70000) + _int(2 ** 62) + _float(-0.375)
            + _float(float("inf")) + _float(float("-inf")) + _float(float("nan"))
            + _int(5) + b"hello" + b"1" + b"0"
            + _int(3) + _int(7) + _int(-8) + _int(9)
            + _int(-2) + _int(-3) + b"".join(_float(float(v)) for v in matrix.ravel())
            + b"".join(_int(v) for v in range(-600, 600, 7)))
    f = io.BytesIO(data)
    assert [dlib_format.read_int(f) for _ in range(5)] == [0, -1, 255, -70000, 2 ** 62]
    assert dlib_format.read_float(f) == -0.375
    assert dlib_format.read_float(f) == math.inf and dlib_format.read_float(f) == -math.inf
    assert math.isnan(dlib_format.read_float(f))
    assert dlib_format.read_str(f) == "hello"
    assert dlib_format.read_bool(f) is True and dlib_format.read_bool(f) is False
    assert dlib_format.read_vector(f, dlib_format.read_int) == [7, -8, 9]
    np.testing.assert_array_equal(dlib_format.read_float_matrix(f), matrix)
    np.testing.assert_array_equal(dlib_format.read_ints(f), np.arange(-600, 600, 7))
    assert f.read() == b""


def test_reader_walks_long_runs_of_integers(rng):
    """The vectorised walk (blocks of 4 KB, walkers that start inside integers) agrees with
    reading one integer at a time, and leaves the file just after the run."""
    values = rng.integers(-2 ** 40, 2 ** 40, 5000) >> rng.integers(0, 41, 5000)
    data = b"".join(_int(int(v)) for v in values) + b"tail"
    f = io.BytesIO(data)
    np.testing.assert_array_equal(dlib_format.read_ints(f, len(values)), values)
    assert f.read() == b"tail"


@pytest.mark.parametrize("data", [_int(300)[:-1], bytes([0x31, 7]), bytes([0x09]) + bytes(9)])
def test_reader_refuses_truncated_or_corrupt_data(data):
    with pytest.raises(SafeTriageError, match="Not a valid dlib file"):
        dlib_format.read_int(io.BytesIO(data))
    with pytest.raises(SafeTriageError, match="Not a valid dlib file"):
        dlib_format.read_float(io.BytesIO(_int(3) + data))
    with pytest.raises(SafeTriageError, match="Not a valid dlib file"):
        dlib_format.read_ints(io.BytesIO(_int(1) + data))


def test_a_truncated_model_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.dat"
    path.write_bytes(shape_predictor.default_model_path().read_bytes()[:100_000])
    with pytest.raises(SafeTriageError, match="Could not read the shape predictor"):
        shape_predictor.load_shape_predictor(path)


# ---- the arithmetic that must match dlib's double precision --------------------------------

def test_pixel_rounding_is_exact(rng):
    """floor(offset + scale * u + 0.5) as dlib computes it in double, ties included."""
    u_N = rng.uniform(-1.5, 2.5, 200_000).astype(np.float32)
    scale_N = rng.integers(1, 4096, 200_000).astype(np.int32)
    u_N[:512] = (np.arange(512) + 0.5) / 512  # exact ties: scale * u = k + 1/2
    scale_N[:512] = 512
    got_N = jax.jit(shape_predictor._to_pixels)(jnp.int32(7), scale_N, u_N)
    want_N = 7 + np.floor(scale_N * u_N.astype(np.float64) + 0.5)
    np.testing.assert_array_equal(np.asarray(got_N), want_N)


def _umeyama_float64(from_N2, to_N2):
    """dlib's find_similarity_transform (SVD, reflection guard) in float64, as a reference."""
    from_N2, to_N2 = from_N2.astype(np.float64), to_N2.astype(np.float64)
    from_c, to_c = from_N2 - from_N2.mean(0), to_N2 - to_N2.mean(0)
    u, d, vt = np.linalg.svd(to_c.T @ from_c / len(from_N2))
    return (u @ vt) * d.sum() / (from_c ** 2).sum(1).mean()


def test_similarity_is_float64_rounded_to_float32(rng):
    predictor = shape_predictor.load_shape_predictor()
    initial_N2 = predictor.initial_shape_N2
    turn = rng.uniform(-0.5, 0.5, 400)
    rotation_B22 = np.stack([np.cos(turn), -np.sin(turn), np.sin(turn), np.cos(turn)], -1)
    to_BN2 = (rng.uniform(0.7, 1.3, (400, 1, 1)) * initial_N2 @ rotation_B22.reshape(-1, 2, 2)
              + rng.normal(0, 0.03, (400, 68, 2))).astype(np.float32)
    a_B, b_B = jax.jit(shape_predictor._similarity)(
        *shape_predictor.similarity_weights(initial_N2), to_BN2)
    want_B22 = np.array([_umeyama_float64(initial_N2, t) for t in to_BN2]).astype(np.float32)
    # plain float32 sums are an ulp or two off in most cases; a near-tie may still round apart
    assert np.mean(np.asarray(a_B) != want_B22[:, 0, 0]) < 0.005
    assert np.mean(np.asarray(b_B) != want_B22[:, 1, 0]) < 0.005
    np.testing.assert_allclose(np.asarray(a_B), want_B22[:, 0, 0], rtol=1.2e-7)
    np.testing.assert_allclose(np.asarray(b_B), want_B22[:, 1, 0], rtol=1.2e-7)


# ---- parity with dlib's C++ on real faces ---------------------------------------------------

def _faces(images):
    """(image, box) for the largest face dlib's detector finds in each image."""
    models = face_models("hog")
    found = [(image, find_faces(models, image)[0]) for image in images]
    return [(image, boxes[0]) for image, boxes in found if len(boxes)]


@pytest.fixture(scope="module")
def cases():
    """Real faces: every 4th frame of the driving video and the source portrait, mirrored,
    scaled, and with boxes moved and resized a little (what a tracker's boxes look like)."""
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        frames = [frame for i, frame in enumerate(reader) if i % 4 == 0]
    source = read_image(SAMPLES / "source.png")
    images = frames + [np.ascontiguousarray(frame[:, ::-1]) for frame in frames[::3]]
    images += [resize(frame, round(frame.shape[1] * s), round(frame.shape[0] * s))
               for frame, s in zip(frames[1::5], (0.6, 1.4) * 5)]
    images += [source, np.ascontiguousarray(source[:, ::-1]), resize(source, 300, 298)]
    faces = _faces(images)
    rng = np.random.default_rng(0)
    for image, box in faces[:len(frames):2]:
        side = box[2] - box[0]
        shift_2 = rng.uniform(-0.06, 0.06, 2) * side
        grow = rng.uniform(-0.08, 0.08) * side / 2
        faces.append((image, box + np.concatenate([shift_2 - grow, shift_2 + grow])))
    return faces


def _dlib_points(faces, grey=False):
    models = face_models("hog")
    return np.array([models.landmarks(np.ascontiguousarray(_grey(image) if grey else image), box)
                     for image, box in faces])


def _grey(image_HW3):
    return image_HW3[..., 1]


def _check_parity(ours_BN2, dlib_BN2):
    error_BN = np.linalg.norm(ours_BN2 - dlib_BN2, axis=-1)
    assert np.median(error_BN) < 0.05
    assert np.mean(error_BN <= 0.5) >= 0.99
    return error_BN


def test_landmarks_match_dlib_on_real_faces(cases):
    ours_BN2 = shape_predictor.landmarks_batch([image for image, _ in cases],
                                               np.array([box for _, box in cases]))
    error_BN = _check_parity(ours_BN2, _dlib_points(cases))
    assert len(cases) >= 70
    assert np.mean(error_BN == 0) >= 0.999  # in fact every point: dlib's arithmetic, exactly


def test_grey_images_match_dlib(cases):
    faces = cases[::4]
    ours_BN2 = shape_predictor.landmarks_batch([_grey(image) for image, _ in faces],
                                               np.array([box for _, box in faces]))
    _check_parity(ours_BN2, _dlib_points(faces, grey=True))


def test_subpixel_points_round_to_dlibs():
    source = read_image(SAMPLES / "source.png")
    (image, box), = _faces([source])
    points_N2 = shape_predictor.landmarks_batch(image[None], box[None], subpixel=True)[0]
    np.testing.assert_array_equal(np.floor(points_N2 + 0.5), _dlib_points([(image, box)])[0])
    assert np.abs(points_N2 - np.round(points_N2)).max() > 0.1  # really sub-pixel


def test_one_box_per_image_is_required():
    with pytest.raises(SafeTriageError, match="one box per image"):
        shape_predictor.landmarks_batch(np.zeros((2, 40, 40, 3), np.uint8), np.zeros((1, 4)))
