"""``safetriage evaluate-deid``: does a de-identified video hide the person and keep the motion?

Three questions, each asked of the de-identified video and of traditional baselines (blur,
pixelate, mask) applied to the same original:
- privacy: dlib face-embedding distance to the original frame by frame (re-identification rate
  under the same-person threshold 0.6) and a gallery attack (rank of the true person);
- motion utility: 68-landmark displacement tracks (size and roll normalised) against the
  original's, blink (eye opening) and mouth-opening series;
- clinical signal: facial asymmetry indices over time and their agreement with the original's.
"""

import dataclasses
import pathlib

import numpy as np
from tqdm.auto import tqdm

from safetriage_jax import outputs
from safetriage_jax.deid import landmarks
from safetriage_jax.deid.baselines import BASELINES
from safetriage_jax.deid.faces import (DEFAULT_FACE_BACKEND, SAME_PERSON_DISTANCE, FaceTracker,
                                       TrackRun, face_models, find_faces)
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.video import VideoReader, read_image

REGIONS = {"jaw": slice(0, 17), "brows": slice(17, 27), "nose": slice(27, 36),
           "eyes": slice(36, 48), "mouth": slice(48, 68)}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
GALLERY_VIDEO_FRAMES = 30  # a gallery video's mean embedding is taken over this many frames
MIN_SERIES = 2  # frames needed before a correlation is reported


@dataclasses.dataclass
class Analysis:
    """One video's faces: per-frame landmarks (NaN where not detected) and embeddings."""

    frames: dict  # {frame index: (H, W, 3) uint8}: the few frames the report shows
    landmarks_T68x2: np.ndarray
    detected_T: np.ndarray
    embeddings_T128: np.ndarray  # NaN where no embedding could be made


def masked(analysis, boxes_T4):
    """The analysis with its frames' faces blacked out (whole frame where no face was found):
    what a shareable report shows of the original."""
    frames = {t: BASELINES["mask"](frame, boxes_T4[t]) for t, frame in analysis.frames.items()}
    return dataclasses.replace(analysis, frames=frames)


def read_frames(path, stride=1, max_frames=None):
    """Every ``stride``-th frame (at most ``max_frames`` of them) and the video's fps."""
    with VideoReader(path) as reader:
        return list(strided(reader, stride, max_frames)), float(reader.fps)


def strided(frames, stride=1, max_frames=None):
    """Every ``stride``-th frame of an iterable, at most ``max_frames`` of them."""
    kept = 0
    for index, frame in enumerate(frames):
        if index % stride == 0:
            yield frame
            kept += 1
            if max_frames is not None and kept >= max_frames:
                return


class FrameSample:
    """At most ``2 * rows`` frames spread evenly over a stream of unknown length: every
    ``step``-th, the step doubling whenever too many are held."""

    def __init__(self, rows=4):
        self.limit, self.step, self.frames = 2 * rows, 1, {}

    def offer(self, t, frames_by_name):
        if t % self.step:
            return
        self.frames[t] = frames_by_name
        if len(self.frames) > self.limit:
            self.step *= 2
            self.frames = {k: v for k, v in self.frames.items() if k % self.step == 0}

    def of(self, name):
        return {t: frames[name] for t, frames in self.frames.items()}


class Analyser:
    """Tracks and embeds one video's face a chunk of frames at a time, keeping no frames.

    Where no face is detected, an attacker who knows where it is still fits landmarks there
    and embeds them: at the ``fallback_4`` passed with the frame (the original's box, for
    same-size videos) or, with ``own_fallback``, at this video's last detected box.
    ``models``: the face models of the backend (``face_models``; dlib's by default).
    """

    def __init__(self, fps, own_fallback=False, models=None):
        self.models = models or face_models()
        self.run = TrackRun(FaceTracker(self.models), fps)
        self.own_fallback, self.last_box, self.embeddings = own_fallback, None, []

    def add(self, frames, fallbacks=None):
        """Analyses the next frames (``fallbacks``: a box_4 per frame, or None); returns
        their face boxes (None where not detected)."""
        fallbacks = [None] * len(frames) if fallbacks is None else fallbacks
        tracked = self.run.add_chunk(frames)
        boxes, marks, refit = [box for box, _ in tracked], [m for _, m in tracked], []
        for t, (box, fallback_4) in enumerate(zip(boxes, fallbacks)):
            if box is not None:
                self.last_box = box
                continue
            fallback_4 = self.last_box if self.own_fallback else fallback_4
            if fallback_4 is not None and not np.isnan(fallback_4).any():
                refit.append((t, fallback_4))
        if refit:
            refitted = self.models.landmarks_frames([frames[t] for t, _ in refit],
                                                    [box for _, box in refit])
            for (t, _), marks_68x2 in zip(refit, refitted):
                marks[t] = marks_68x2
        embedded = [t for t, m in enumerate(marks) if m is not None]
        embeddings_T128 = np.full((len(frames), 128), np.nan)
        if embedded:
            embeddings_T128[embedded] = self.models.embeddings([frames[t] for t in embedded],
                                                               [marks[t] for t in embedded])
        self.embeddings += list(embeddings_T128)
        return boxes

    def result(self, frames):
        """(Analysis holding ``frames``, FaceTrack)."""
        track = self.run.result()
        embeddings_T128 = np.array(self.embeddings).reshape(-1, 128)
        return Analysis(frames, track.landmarks_T68x2, track.found_T, embeddings_T128), track


def _embed_largest_face(image_HW3, models):
    boxes, _ = find_faces(models, image_HW3)
    if not len(boxes):
        return None
    return models.embedding(image_HW3, models.landmarks(image_HW3, boxes[0]))


def _gallery_video_frames(path):
    """About GALLERY_VIDEO_FRAMES frames spread over the video."""
    with VideoReader(path) as reader:
        count = reader.num_frames
    stride = max(1, (count or 0) // GALLERY_VIDEO_FRAMES)
    return read_frames(path, stride, GALLERY_VIDEO_FRAMES)[0]


def gallery_embeddings(identity_path=None, gallery_dir=None, models=None):
    """({name: mean embedding} of the identity image and of each image/video in
    ``gallery_dir``, notes on files skipped)."""
    entries, notes, models = {}, [], models or face_models()
    if identity_path is not None:
        found = _embed_largest_face(read_image(identity_path), models)
        if found is None:
            raise SafeTriageError(f"No face found in the identity image {identity_path}; pass the "
                                  "portrait the de-identified video was made from.")
        entries["identity"] = found
    if gallery_dir is None:
        return entries, notes
    folder = pathlib.Path(gallery_dir)
    if not folder.is_dir():
        raise SafeTriageError(f"Gallery {folder} is not a directory; pass a folder of face images "
                              "or videos of other people.")
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images = [read_image(path)]
        elif suffix in VIDEO_SUFFIXES:
            images = _gallery_video_frames(path)
        else:
            continue
        found = [e for e in (_embed_largest_face(i, models) for i in images) if e is not None]
        if found:
            entries[f"gallery:{path.name}"] = np.mean(found, 0)
        else:
            notes.append(f"Gallery file {path.name} shows no face; skipped.")
    return entries, notes


def _value(x):
    """A finite float, or None (JSON null) for NaN/inf/None."""
    return float(x) if x is not None and np.isfinite(x) else None


def _mean(values):
    return _value(np.mean(values)) if len(values) else None


def _pearson(x, y):
    if len(x) < MIN_SERIES or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return _value(np.corrcoef(x, y)[0, 1])


def _concordance(x, y):
    """Lin's concordance correlation: agreement in level and scale, not only in shape."""
    if len(x) < MIN_SERIES:
        return None
    denominator = np.var(x) + np.var(y) + (np.mean(x) - np.mean(y)) ** 2
    if denominator == 0:
        return None
    return _value(2 * np.mean((x - np.mean(x)) * (y - np.mean(y))) / denominator)


def privacy(original, method, gallery):
    """Embedding distances to the original frame by frame, and the gallery attack.

    Shares are over the original's face frames; a frame without an embedding counts as not
    re-identified. Ranks: 1 + the number of gallery entries strictly closer than "original".
    """
    face_T = original.detected_T & np.isfinite(original.embeddings_T128[:, 0])
    distance_T = np.linalg.norm(method.embeddings_T128 - original.embeddings_T128, axis=-1)
    embedded_T = face_T & np.isfinite(distance_T)
    names = list(gallery)
    gallery_G128 = np.stack([gallery[n] for n in names])
    distances_FG = np.linalg.norm(method.embeddings_T128[embedded_T, None] - gallery_G128, axis=-1)
    truth_F = distances_FG[:, names.index("original")]
    ranks_F = 1 + np.sum(distances_FG < truth_F[:, None], axis=1)
    count = int(face_T.sum())
    return {
        "detected_share": float(method.detected_T[face_T].mean()),
        "embedded_share": float(embedded_T.sum() / count),
        "mean_distance": _mean(distance_T[embedded_T]),
        "reid_rate": float(np.sum(distance_T[embedded_T] < SAME_PERSON_DISTANCE) / count),
        "top1_rate": float(np.sum(ranks_F == 1) / count),
        "mean_rank": _mean(ranks_F),
        "gallery_size": len(names),
    }, distance_T


def _displacements(points_T68x2):
    """Normalised landmarks minus their median over the frames (static face shape removed)."""
    face_T68x2 = landmarks.normalise(points_T68x2)
    return face_T68x2 - np.median(face_T68x2, axis=0)


def eye_opening(points_T68x2):
    """Mean eye aspect ratio of both eyes (falls during a blink)."""
    return (landmarks.eye_aspect_ratio(points_T68x2, landmarks.EYE_IMAGE_LEFT)
            + landmarks.eye_aspect_ratio(points_T68x2, landmarks.EYE_IMAGE_RIGHT)) / 2


def motion(original, method):
    """Landmark-track agreement on the frames where both videos show a detected face."""
    both_T = original.detected_T & method.detected_T
    result = {"landmark_frames": float(both_T.sum() / original.detected_T.sum()),
              "landmark_correlation": None, "region_correlation": dict.fromkeys(REGIONS),
              "nme": None, "blink_r": None, "mouth_r": None}
    if both_T.sum() < MIN_SERIES:
        return result
    a_T68x2, b_T68x2 = original.landmarks_T68x2[both_T], method.landmarks_T68x2[both_T]
    da_T68x2, db_T68x2 = _displacements(a_T68x2), _displacements(b_T68x2)
    norms_68 = np.sqrt(np.sum(da_T68x2 ** 2, axis=(0, 2)) * np.sum(db_T68x2 ** 2, axis=(0, 2)))
    dots_68 = np.sum(da_T68x2 * db_T68x2, axis=(0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation_68 = np.where(norms_68 > 0, dots_68 / norms_68, np.nan)

    def nanmean(values):
        return _value(np.nanmean(values)) if np.isfinite(values).any() else None
    result.update(
        landmark_correlation=nanmean(correlation_68),
        region_correlation={name: nanmean(correlation_68[s]) for name, s in REGIONS.items()},
        nme=_value(np.linalg.norm(da_T68x2 - db_T68x2, axis=-1).mean()),
        blink_r=_pearson(eye_opening(a_T68x2), eye_opening(b_T68x2)),
        mouth_r=_pearson(landmarks.mouth_opening(a_T68x2), landmarks.mouth_opening(b_T68x2)))
    return result


def asymmetry(original, method):
    """Per asymmetry index, over the frames where both show a face: Pearson r, Lin's
    concordance, mean |difference| and mean offset (method - original)."""
    both_T = original.detected_T & method.detected_T
    a = landmarks.asymmetry(original.landmarks_T68x2)
    b = landmarks.asymmetry(method.landmarks_T68x2)
    out = {}
    for name in landmarks.ASYMMETRY_INDICES:
        usable_T = both_T & np.isfinite(a[name]) & np.isfinite(b[name])
        x, y = a[name][usable_T], b[name][usable_T]
        out[name] = {"pearson_r": _pearson(x, y), "ccc": _concordance(x, y),
                     "mean_abs_diff": _mean(np.abs(x - y)), "mean_offset": _mean(y - x)}
    return out


def series(analysis):
    """Per-frame signals for the plots (NaN where no face was detected)."""
    points_T68x2 = np.where(analysis.detected_T[:, None, None], analysis.landmarks_T68x2, np.nan)
    face_T68x2 = landmarks.normalise(points_T68x2)
    corners_T2 = face_T68x2[:, [landmarks.MOUTH_CORNER_IMAGE_LEFT,
                                landmarks.MOUTH_CORNER_IMAGE_RIGHT], 1]
    if analysis.detected_T.any():
        corners_T2 = corners_T2 - np.nanmedian(corners_T2, axis=0)
    out = {"blink": eye_opening(points_T68x2), "mouth": landmarks.mouth_opening(points_T68x2),
           "mouth_corner_left_dy": corners_T2[:, 0], "mouth_corner_right_dy": corners_T2[:, 1]}
    out.update({f"asymmetry_{k}": v for k, v in landmarks.asymmetry(points_T68x2).items()})
    return out


def _check_arguments(baselines, max_frames, stride):
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise SafeTriageError(f"Unknown baseline(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(BASELINES)}.")
    if stride < 1:
        raise SafeTriageError(f"The stride must be at least 1 (got {stride}).")
    if max_frames is not None and max_frames < 1:
        raise SafeTriageError(f"max_frames must be at least 1 (got {max_frames}).")


def evaluate_deid(original_path, deid_path, report_dir, *, identity_path=None, gallery_dir=None,
                  baselines=("blur", "pixelate", "mask"), max_frames=None, stride=1,
                  overwrite=False, show_original=False, extra_json=None, progress=True,
                  face_backend=DEFAULT_FACE_BACKEND):
    """Evaluates ``deid_path`` against ``original_path`` and the baselines, writes the report
    (metrics.json, report.html, PNG plots) into ``report_dir`` and returns the metrics.

    The report names files, not folders; its frames.png shows the original with the face
    masked unless ``show_original``. ``overwrite`` replaces an earlier report folder;
    ``extra_json`` ({file name: dict}) is written into the folder too. ``face_backend``: whose
    face models track, fit and embed the faces (``faces.FACE_BACKENDS``).

    The returned dict is what metrics.json holds, plus "series": per method, the per-frame
    plot signals as NumPy arrays (metrics.json keeps only the asymmetry ones).
    """
    from safetriage_jax.deid.report import write_report
    baselines = tuple(baselines)
    _check_arguments(baselines, max_frames, stride)
    inputs = (original_path, deid_path, identity_path, gallery_dir)
    outputs.check_output(report_dir, "folder", inputs=inputs, overwrite=overwrite)
    models = face_models(backend=face_backend)
    gallery, notes = gallery_embeddings(identity_path, gallery_dir, models)
    with VideoReader(original_path) as original_reader, VideoReader(deid_path) as deid_reader:
        fps = float(original_reader.fps)
        total = original_reader.num_frames
        total = -(-total // stride) if total else None
        total = min(total, max_frames) if total and max_frames else total or max_frames
        bar = tqdm(total=total, unit="frame", desc="evaluate", disable=not progress)
        with bar:
            original_frames = strided(original_reader, stride, max_frames)
            deid_frames = strided(deid_reader, stride, max_frames)
            original, methods, sample, notes_length = _analyse_streams(
                original_frames, deid_frames, fps, baselines, bar, models)
    notes += notes_length
    original, track = original
    if not original.detected_T.any():
        raise SafeTriageError(f"No face found in the original video {original_path} "
                              f"({len(original.detected_T)} frames searched), so there is "
                              "nothing to compare; check that the right file was passed.")
    methods = {name: analyser.result(sample.of(name))[0] for name, analyser in methods.items()}
    notes = track.notes + notes
    gallery = {"original": np.mean(original.embeddings_T128[original.detected_T], 0), **gallery}
    if len(gallery) < 2:
        notes.append("The gallery holds only the original person, so every rank is 1; pass "
                     "an identity image and/or a gallery folder for a meaningful attack.")
    results, all_series = {}, {"original": series(original)}
    for name, method in methods.items():
        privacy_metrics, distance_T = privacy(original, method, gallery)
        results[name] = {"privacy": privacy_metrics, "motion": motion(original, method),
                         "asymmetry": asymmetry(original, method)}
        all_series[name] = {**series(method), "distance": distance_T}
    metrics = {
        "original": pathlib.Path(original_path).name, "deid": pathlib.Path(deid_path).name,
        "frames": len(original.detected_T),
        "stride": stride, "fps": fps / stride,
        "original_face_frames": int(original.detected_T.sum()),
        "same_person_threshold": SAME_PERSON_DISTANCE, "notes": notes, "gallery": list(gallery),
        "methods": results, "series": all_series,
    }
    shown = original if show_original else masked(original, track.boxes_T4)
    write_report(report_dir, metrics, {"original": shown, **methods}, extra_json=extra_json,
                 overwrite=overwrite, inputs=inputs)
    return metrics


def _paired_chunks(first, second, size):
    """Lists of up to ``size`` (first, second) pairs from two iterators, until either ends;
    then (as the generator's return value) whether each still had a frame left over."""
    chunk = []
    while True:
        a, b = next(first, None), next(second, None)
        if a is None or b is None:
            if chunk:
                yield chunk
            return a is not None, b is not None
        chunk.append((a, b))
        if len(chunk) == size:
            yield chunk
            chunk = []


def _analyse_streams(original_frames, deid_frames, fps, baselines, bar, models):
    """One pass over both videos, a chunk of frames at a time: the original, the
    de-identified video and each baseline (applied to the original frame) are tracked and
    embedded with ``models``.

    Returns ((original Analysis, its FaceTrack), {method: Analyser}, FrameSample, notes)."""
    original = Analyser(fps, models=models)
    methods, sample, count = {}, FrameSample(), 0
    pairs = _paired_chunks(original_frames, deid_frames, getattr(models, "chunk", 1))
    while True:
        try:
            chunk = next(pairs)
        except StopIteration as end:
            left_original, left_deid = end.value
            break
        original_chunk, deid_chunk = [a for a, _ in chunk], [b for _, b in chunk]
        if not methods:
            # The attacker looks where the original's face is when the geometry matches
            # (baselines, paste-back); in a face-crop video, where that video last showed a face.
            same_size = deid_chunk[0].shape == original_chunk[0].shape
            methods = {"deid": Analyser(fps, own_fallback=not same_size, models=models),
                       **{name: Analyser(fps, models=models) for name in baselines}}
        boxes_4 = [np.full(4, np.nan) if box is None else box
                   for box in original.add(original_chunk)]
        shown = {"original": original_chunk, "deid": deid_chunk}
        methods["deid"].add(deid_chunk, boxes_4 if not methods["deid"].own_fallback else None)
        for name in baselines:
            shown[name] = [BASELINES[name](f, b) for f, b in zip(original_chunk, boxes_4)]
            methods[name].add(shown[name], boxes_4)
        for i in range(len(chunk)):
            sample.offer(count + i, {name: frames[i] for name, frames in shown.items()})
        count += len(chunk)
        bar.update(len(chunk))
    if count == 0:
        raise SafeTriageError("The videos hold no frames to compare.")
    rest_original = left_original + sum(1 for _ in original_frames)
    rest_deid = left_deid + sum(1 for _ in deid_frames)
    notes = []
    if rest_original or rest_deid:
        notes.append(f"The videos differ in length ({count + rest_original} original vs "
                     f"{count + rest_deid} de-identified frames read); the first {count} are "
                     "compared.")
    return original.result(sample.of("original")), methods, sample, notes
