"""dlib's face embedding in JAX against dlib's C++: the model file reader, the network on dlib's
own chips, the chip alignment and the whole descriptor, on real faces of the shared samples."""

import io
import itertools

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLES
from safetriage_jax.deid.faces import SAME_PERSON_DISTANCE, _models_dir, face_models, find_faces
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.face_models import dlib_dnn, face_chip, face_embedding
from safetriage_jax.face_models.dlib_format import (read_bool, read_float, read_float_matrix,
                                                    read_int, read_str, read_vector)
from safetriage_jax.video import VideoReader, read_image


def _resize(image_HW3, factor):
    height, width = image_HW3.shape[:2]
    size = (round(width * factor), round(height * factor))
    return np.asarray(Image.fromarray(image_HW3).resize(size, Image.BILINEAR))


@pytest.fixture(scope="module")
def faces():
    """Real faces: three frames of the driving video, one flipped and two rescaled (0.6x: a
    small face, also pasted into a black frame of the source's size; 1.6x: a chip read through
    dlib's pyramid), and the source portrait (another person, also through the pyramid).
    Each: (image, dlib's 68 landmarks, dlib's chip, dlib's descriptor)."""
    import dlib
    models = face_models("hog")
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        frames = [frame for index, frame in zip(range(121), reader) if index % 60 == 0]
    source = read_image(SAMPLES / "source.png")
    small = _resize(frames[1], 0.6)
    canvas = np.zeros_like(source)  # the small face in a frame of the source's size
    canvas[50:50 + small.shape[0], 100:100 + small.shape[1]] = small
    images = frames + [frames[0][:, ::-1], small, _resize(frames[2], 1.6), canvas, source]
    out = []
    for image in map(np.ascontiguousarray, images):  # dlib's bindings want contiguous arrays
        boxes, _ = find_faces(models, image)
        marks_68x2 = models.landmarks(image, boxes[0])
        shape = dlib.full_object_detection(
            models._rectangle(boxes[0]),
            dlib.points([dlib.point(round(x), round(y)) for x, y in marks_68x2]))
        chip = dlib.get_face_chip(image, shape, face_chip.CHIP_SIZE, face_chip.CHIP_PADDING)
        out.append((image, marks_68x2, chip, models.embedding(image, marks_68x2)))
    return out


def test_reads_dlib_serialization_primitives():
    # Integers: a control byte (size, 0x80 = negative) and little-endian bytes; floats as
    # mantissa * 2**exponent; strings and vectors length-prefixed; bools as '0'/'1'.
    stream = io.BytesIO(b"\x01\x05" b"\x81\x05" b"\x02\x34\x12" b"\x01\x03\x81\x02"
                        b"\x01\x00\x02\x00\x7d" b"\x01\x03abc" b"1" b"0"
                        b"\x81\x02\x81\x01" b"\x01\x01\x01\x00" b"\x01\x03\x81\x01"
                        b"\x01\x02\x01\x07\x01\x09")
    assert [read_int(stream), read_int(stream), read_int(stream)] == [5, -5, 0x1234]
    assert read_float(stream) == 0.75
    assert read_float(stream) == np.inf  # exponent 32000 marks infinity
    assert read_str(stream) == "abc"
    assert (read_bool(stream), read_bool(stream)) == (True, False)
    np.testing.assert_array_equal(read_float_matrix(stream), [[1.0], [1.5]])
    assert read_vector(stream, read_int) == [7, 9]
    with pytest.raises(SafeTriageError, match="ends inside"):
        read_int(io.BytesIO(b"\x02\x01"))
    with pytest.raises(SafeTriageError, match="bool"):
        read_bool(io.BytesIO(b"x"))


def _dlib_int(value):
    """dlib's integer encoding (the writer side of read_int), for hand-made records."""
    data = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(data) | (0x80 if value < 0 else 0)]) + data


def _dlib_float(value):
    numerator, denominator = float(value).as_integer_ratio()
    return _dlib_int(numerator) + _dlib_int(-(denominator.bit_length() - 1))


def _dlib_str(text):
    return _dlib_int(len(text)) + text.encode()


def _dlib_tensor(values, shape):
    return (_dlib_int(2) + b"".join(map(_dlib_int, shape))
            + np.asarray(values, "<f4").tobytes())


def _dlib_alias(shape):
    return _dlib_int(1) + b"".join(map(_dlib_int, shape))


def test_folds_batch_norm_records_like_dlib(rng):
    # A bn_con2 record read as an affine layer: dlib folds it to gamma / sqrt(var + eps) and
    # beta - scale * mean (affine_'s constructor from bn_).
    gamma, beta, mean = rng.normal(size=(3, 4)).astype(np.float32)
    var, eps = rng.uniform(0.5, 2.0, 4).astype(np.float32), 1e-5
    record = (_dlib_str("bn_con2") + _dlib_tensor(np.concatenate([gamma, beta]), (8, 1, 1, 1))
              + _dlib_alias((1, 4, 1, 1)) + _dlib_alias((1, 4, 1, 1))
              + _dlib_tensor([], (0, 0, 0, 0)) + _dlib_tensor([], (0, 0, 0, 0))
              + _dlib_tensor(mean, (1, 4, 1, 1)) + _dlib_tensor(var, (1, 4, 1, 1))
              + _dlib_int(1000) + _dlib_float(100.0) + b"".join(map(_dlib_float, [1, 1, 1, 0]))
              + _dlib_float(eps))
    stream = io.BytesIO(record)
    affine = dlib_dnn.read_affine(stream)
    assert stream.read() == b""  # the whole record, no more
    scale = gamma / np.sqrt(var + np.float32(eps))
    np.testing.assert_allclose(affine["scale"], scale, rtol=1e-6)
    np.testing.assert_allclose(affine["shift"], beta - scale * mean, rtol=1e-5, atol=1e-6)
    # A newer con_ record (con_6: use_bias, use_relu flags) without bias: filters (out, in,
    # rows, cols), zero bias.
    weight = rng.normal(size=(2, 3, 1, 1)).astype(np.float32)
    con = (_dlib_str("con_6") + _dlib_tensor(weight.ravel(), (6, 1, 1, 1))
           + b"".join(map(_dlib_int, [2, 1, 1, 1, 1, 0, 0])) + _dlib_alias((2, 3, 1, 1))
           + _dlib_alias((1, 2, 1, 1)) + b"".join(map(_dlib_float, [1, 1, 1, 0])) + b"00")
    record = dlib_dnn.read_con(io.BytesIO(con))
    np.testing.assert_array_equal(record["weight_OIHW"], weight)
    np.testing.assert_array_equal(record["bias"], np.zeros(2))
    with pytest.raises(SafeTriageError, match="fused relu"):
        dlib_dnn.read_con(io.BytesIO(con[:-1] + b"1"))


def test_parses_the_model_into_the_flax_module():
    params = face_embedding.read_params(_models_dir() / face_embedding.MODEL_FILE)
    expected = jax.eval_shape(face_embedding.FaceResNet().init, jax.random.PRNGKey(0),
                              np.zeros((1, 150, 150, 3), np.uint8))["params"]
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
    assert shapes(params) == shapes(expected)
    assert sum(name.startswith("level") for name in params) == 14  # 29 convolutions in all
    np.testing.assert_allclose(params["input"]["mean_rgb"], face_embedding.DLIB_MEAN_RGB,
                               rtol=1e-6)
    with open(_models_dir() / "shape_predictor_5_face_landmarks.dat", "rb") as f:
        with pytest.raises(SafeTriageError):  # another kind of file
            dlib_dnn.read_network(f, ["con"], dlib_dnn.read_input_rgb_image_sized,
                                  dlib_dnn.read_loss_metric)


def test_network_matches_dlib_on_dlib_chips(faces):
    models = face_models("hog")
    chips_B = np.stack([chip for _, _, chip, _ in faces])
    reference_B128 = np.stack([models._embed.compute_face_descriptor(chip) for chip in chips_B])
    ours_B128 = np.asarray(face_embedding.embed_chips(face_embedding.load_params(), chips_B))
    distance_B = np.linalg.norm(ours_B128 - reference_B128, axis=1)
    print("network-only distances to dlib:", distance_B)
    assert distance_B.max() < 1e-5  # float32 in both; seen: < 1e-6


def test_chips_match_dlib_get_face_chip(faces):
    levels = []
    for image, marks_68x2, reference, _ in faces:
        height, width = image.shape[:2]
        levels.append(face_chip.chip_plan(marks_68x2, height, width)["level"])
        ours = np.asarray(face_chip.extract_chips(image[None], marks_68x2[None]))[0]
        difference = ours.astype(int) - reference.astype(int)
        # float32 bilinear vs dlib's double, both truncated: a value can fall one level apart.
        assert np.abs(difference).max() <= 1
        assert np.mean(difference != 0) < 1e-3, np.mean(difference != 0)
    assert set(levels) >= {0, 1}  # direct reads and reads through dlib's pyramid


def test_descriptors_match_dlib_end_to_end(faces):
    by_shape = {}  # batches of same-size images; the source-size one mixes pyramid levels
    for face in faces:
        by_shape.setdefault(face[0].shape, []).append(face)
    ours, reference = [], []
    for batch in by_shape.values():
        images_BHW3, marks_B68x2 = np.stack([f[0] for f in batch]), np.stack([f[1] for f in batch])
        ours.append(np.asarray(face_embedding.embed_batch(images_BHW3, marks_B68x2)))
        reference.append(np.stack([f[3] for f in batch]))
    height, width = faces[-1][0].shape[:2]
    assert len({face_chip.chip_plan(marks, height, width)["level"]
                for _, marks, _, _ in by_shape[faces[-1][0].shape]}) == 2
    ours_B128, reference_B128 = np.concatenate(ours), np.concatenate(reference)
    distance_B = np.linalg.norm(ours_B128 - reference_B128, axis=1)
    print("end-to-end distances to dlib:", distance_B)
    assert distance_B.max() < 1e-3
    pairs = list(itertools.combinations(range(len(ours_B128)), 2))
    same = lambda d: [np.linalg.norm(d[i] - d[j]) < SAME_PERSON_DISTANCE for i, j in pairs]
    assert same(ours_B128) == same(reference_B128)
    assert not all(same(reference_B128)) and any(same(reference_B128))  # both kinds of pair


def test_five_point_landmarks_match_dlib(faces):
    import dlib
    predictor = dlib.shape_predictor(str(_models_dir() / "shape_predictor_5_face_landmarks.dat"))
    model = face_models("hog")._embed
    for image, marks_68x2, _, _ in (faces[0], faces[-1]):
        x0, y0 = marks_68x2.min(0).astype(int)
        x1, y1 = marks_68x2.max(0).astype(int)
        shape = predictor(image, dlib.rectangle(x0, y0, x1, y1))
        marks_5x2 = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
        reference = np.array(model.compute_face_descriptor(image, shape))
        ours = np.asarray(face_embedding.embed_batch(image[None], marks_5x2[None]))[0]
        assert np.linalg.norm(ours - reference) < 1e-3


def test_rejects_missing_landmarks(faces):
    image, marks_68x2, _, _ = faces[0]
    lost = np.stack([marks_68x2, np.full_like(marks_68x2, np.nan)])  # a frame without a face
    with pytest.raises(ValueError, match="1 with NaN"):
        face_chip.extract_chips(np.stack([image, image]), lost)
    with pytest.raises(ValueError, match="68 .* or 5 landmarks"):
        face_chip.extract_chips(image[None], marks_68x2[None, :10])
