"""``safetriage evaluate-deid``: does a de-identified video hide the person and keep the motion?

Three questions, each asked of the de-identified video and of traditional baselines (blur,
pixelate, mask) applied to the same original:
- privacy: dlib face-embedding distance to the original frame by frame (re-identification rate
  under the same-person threshold 0.6) and a gallery attack (rank of the true identity);
- motion utility: 68-landmark displacement tracks (size and roll normalised) against the
  original's, blink (eye opening) and mouth-opening series;
- clinical signal: facial asymmetry indices over time and their agreement with the original's.
"""

import dataclasses
import pathlib

import numpy as np
from tqdm.auto import tqdm

from safetriage_jax.deid import landmarks
from safetriage_jax.deid.baselines import BASELINES
from safetriage_jax.deid.faces import SAME_PERSON_DISTANCE, FaceTracker, face_models, find_faces
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.video import VideoReader, read_image

REGIONS = {"jaw": slice(0, 17), "brows": slice(17, 27), "nose": slice(27, 36),
           "eyes": slice(36, 48), "mouth": slice(48, 68)}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
GALLERY_VIDEO_FRAMES = 30


@dataclasses.dataclass
class Analysis:
    """One video's faces: per-frame landmarks (NaN when not detected) and embeddings."""

    frames: list
    landmarks_T68x2: np.ndarray
    detected_T: np.ndarray
    embeddings_TE: np.ndarray  # NaN where no embedding could be made


def read_frames(path, stride=1, max_frames=None):
    """Every ``stride``-th frame (at most ``max_frames``) and the video's fps."""
    if stride < 1:
        raise SafeTriageError(f"--stride must be at least 1 (got {stride}).")
    frames = []
    with VideoReader(path) as reader:
        fps = float(reader.fps)
        for index, frame in enumerate(reader):
            if index % stride == 0:
                frames.append(frame)
                if max_frames and len(frames) >= max_frames:
                    break
    return frames, fps


def analyse(frames, fps, fallback=None, progress=None):
    """Tracks the face and embeds it in every frame. Where it is not detected, an attacker who
    knows where the face is still fits landmarks there and embeds them: ``fallback`` is the
    (T, 4) boxes to use, or "last seen" for this video's own last detected box."""
    models = face_models()
    track = FaceTracker(models).track(frames, fps)
    if isinstance(fallback, str):
        fallback = _forward_fill(track.boxes_T4)
    embeddings = np.full((len(frames), 128), np.nan)
    for t, frame in enumerate(frames):
        marks = track.landmarks_T68x2[t]
        box = None if fallback is None else fallback[t]
        if track.found_T[t] or (box is not None and not np.isnan(box).any()):
            if not track.found_T[t]:
                marks = models.landmarks(frame, box)
            embeddings[t] = models.embedding(frame, marks)
        if progress is not None:
            progress.update(1)
    return Analysis(frames, track.landmarks_T68x2, track.found_T, embeddings), track


def _forward_fill(boxes_T4):
    """Each frame's box, or the last one detected before it (NaN before the first)."""
    filled, last = boxes_T4.copy(), np.full(4, np.nan)
    for t in range(len(filled)):
        if np.isnan(filled[t]).any():
            filled[t] = last
        else:
            last = filled[t]
    return filled


def gallery_embeddings(identity_path=None, gallery_dir=None):
    """{name: mean embedding} of the identity image and of each image/video in ``gallery_dir``;
    and notes on files skipped."""
    models, entries, notes = face_models(), {}, []

    def embed(image):
        boxes, _ = find_faces(models, image)
        return None if not len(boxes) else models.embedding(image, models.landmarks(image, boxes[0]))

    if identity_path is not None:
        found = embed(read_image(identity_path))
        if found is None:
            raise SafeTriageError(f"No face found in the identity image {identity_path}.")
        entries["identity"] = found
    if gallery_dir is not None:
        folder = pathlib.Path(gallery_dir)
        if not folder.is_dir():
            raise SafeTriageError(f"--gallery {folder} is not a directory of face images/videos.")
        for path in sorted(folder.iterdir()):
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                images = [read_image(path)]
            elif suffix in VIDEO_SUFFIXES:
                images = read_frames(path, max_frames=GALLERY_VIDEO_FRAMES)[0]
            else:
                continue
            found = [e for e in map(embed, images) if e is not None]
            if found:
                entries[f"gallery:{path.name}"] = np.mean(found, 0)
            else:
                notes.append(f"Gallery file {path.name} shows no face; skipped.")
    return entries, notes


def privacy(original, method, gallery):
    """Embedding distances to the original, frame by frame, and the gallery attack."""
    face = original.detected_T & ~np.isnan(original.embeddings_TE[:, 0])
    embedded = face & ~np.isnan(method.embeddings_TE[:, 0])
    distance = np.linalg.norm(method.embeddings_TE - original.embeddings_TE, axis=-1)
    names = list(gallery)
    ranks = []
    for t in np.flatnonzero(embedded):
        d = np.array([np.linalg.norm(method.embeddings_TE[t] - gallery[n]) for n in names])
        ranks.append(1 + int(np.sum(d < d[names.index("original")])))
    count = max(int(face.sum()), 1)
    return {
        "detected_share": float(method.detected_T[face].mean()) if face.any() else None,
        "embedded_share": float(embedded.sum() / count),
        "mean_distance": _mean(distance[embedded]),
        "reid_rate": float(np.sum(distance[embedded] < SAME_PERSON_DISTANCE) / count),
        "top1_rate": float(np.sum(np.array(ranks) == 1) / count),
        "mean_rank": _mean(np.array(ranks, float)),
        "gallery_size": len(names),
    }


def _displacements(points_T68x2):
    """Normalised landmarks minus their median over the given frames (static shape removed)."""
    face = landmarks.normalise(points_T68x2)
    return face - np.median(face, axis=0)


def motion(original, method):
    """Landmark-track agreement on frames where both videos show a detected face."""
    both = original.detected_T & method.detected_T
    face_frames = max(int(original.detected_T.sum()), 1)
    result = {"landmark_frames": float(both.sum() / face_frames), "landmark_correlation": None,
              "region_correlation": {name: None for name in REGIONS}, "nme": None,
              "blink_r": None, "mouth_r": None}
    if both.sum() < 3:
        return result
    a, b = original.landmarks_T68x2[both], method.landmarks_T68x2[both]
    da, db = _displacements(a), _displacements(b)
    per_landmark = np.sum(da * db, axis=(0, 2)) / np.sqrt(
        np.sum(da ** 2, axis=(0, 2)) * np.sum(db ** 2, axis=(0, 2)) + 1e-12)
    result.update(
        landmark_correlation=float(per_landmark.mean()),
        region_correlation={name: float(per_landmark[s].mean()) for name, s in REGIONS.items()},
        nme=float(np.linalg.norm(da - db, axis=-1).mean()),
        blink_r=_pearson(_eye_opening(a), _eye_opening(b)),
        mouth_r=_pearson(landmarks.mouth_opening(a), landmarks.mouth_opening(b)))
    return result


def asymmetry(original, method):
    """Per asymmetry index: Pearson r, Lin's concordance, mean |difference| and mean offset."""
    both = original.detected_T & method.detected_T
    a, b = landmarks.asymmetry(original.landmarks_T68x2), landmarks.asymmetry(method.landmarks_T68x2)
    out = {}
    for name in landmarks.ASYMMETRY_INDICES:
        x, y = a[name][both], b[name][both]
        enough = len(x) >= 3
        out[name] = {"pearson_r": _pearson(x, y) if enough else None,
                     "ccc": _concordance(x, y) if enough else None,
                     "mean_abs_diff": _mean(np.abs(x - y)),
                     "mean_offset": _mean(y - x)}
    return out


def _eye_opening(points_T68x2):
    return (landmarks.eye_aspect_ratio(points_T68x2, landmarks.EYE_IMAGE_LEFT)
            + landmarks.eye_aspect_ratio(points_T68x2, landmarks.EYE_IMAGE_RIGHT)) / 2


def _mean(values):
    return float(np.mean(values)) if len(values) else None


def _pearson(x, y):
    if len(x) < 3 or np.std(x) < 1e-9 or np.std(y) < 1e-9:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _concordance(x, y):
    """Lin's concordance correlation: agreement in level and scale, not only in shape."""
    denominator = np.var(x) + np.var(y) + (np.mean(x) - np.mean(y)) ** 2
    return float(2 * np.cov(x, y, bias=True)[0, 1] / denominator) if denominator > 1e-12 else None


def series(analysis):
    """Per-frame signals for the report's plots (NaN where no face)."""
    points = np.where(analysis.detected_T[:, None, None], analysis.landmarks_T68x2, np.nan)
    out = {"blink": _eye_opening(points), "mouth": landmarks.mouth_opening(points),
           "mouth_corner_y": landmarks.normalise(points)[:, landmarks.MOUTH_CORNER_IMAGE_LEFT, 1]}
    out.update({f"asymmetry_{k}": v for k, v in landmarks.asymmetry(points).items()})
    return out


def evaluate_deid(original_path, deid_path, report_dir, *, identity_path=None, gallery_dir=None,
                  baselines=("blur", "pixelate", "mask"), max_frames=None, stride=1, progress=True):
    """Evaluates ``deid_path`` against ``original_path`` and the baselines; writes the report
    (metrics.json, report.html, PNG plots) into ``report_dir`` and returns the metrics."""
    from safetriage_jax.deid.report import write_report
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise SafeTriageError(f"Unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}.")
    original_frames, fps = read_frames(original_path, stride, max_frames)
    deid_frames, _ = read_frames(deid_path, stride, max_frames)
    notes = []
    if len(deid_frames) != len(original_frames):
        notes.append(f"The videos differ in length ({len(original_frames)} vs {len(deid_frames)} "
                     "frames evaluated); the shorter length is used.")
        count = min(len(deid_frames), len(original_frames))
        original_frames, deid_frames = original_frames[:count], deid_frames[:count]
    bar = tqdm(total=len(original_frames) * (2 + len(baselines)), unit="frame",
               desc="evaluate", disable=not progress)
    original, track = analyse(original_frames, fps, progress=bar)
    if not original.detected_T.any():
        bar.close()
        raise SafeTriageError(f"No face found in the original video {original_path} "
                              f"({len(original_frames)} frames evaluated): nothing to compare.")
    notes += track.notes
    gallery, gallery_notes = gallery_embeddings(identity_path, gallery_dir)
    gallery = {"original": np.nanmean(original.embeddings_TE, 0), **gallery}
    notes += gallery_notes
    if len(gallery) < 2:
        notes.append("The gallery holds only the original person, so every rank is 1; pass "
                     "--identity and/or --gallery for a meaningful attack.")
    # Same geometry (paste-back): the attacker looks where the original's face is; otherwise
    # (face crops) where this video last showed a face.
    same_size = deid_frames[0].shape == original_frames[0].shape
    methods = {}
    methods["deid"], _ = analyse(deid_frames, fps, track.boxes_T4 if same_size else "last seen",
                                 progress=bar)
    for name in baselines:
        treated = [BASELINES[name](frame, box) for frame, box in zip(original_frames, track.boxes_T4)]
        methods[name], _ = analyse(treated, fps, track.boxes_T4, progress=bar)
    bar.close()
    metrics = {
        "original": str(original_path), "deid": str(deid_path), "frames": len(original_frames),
        "stride": stride, "original_face_frames": int(original.detected_T.sum()),
        "same_person_threshold": SAME_PERSON_DISTANCE, "gallery": list(gallery), "notes": notes,
        "methods": {name: {"privacy": privacy(original, m, gallery), "motion": motion(original, m),
                           "asymmetry": asymmetry(original, m)} for name, m in methods.items()},
    }
    signals = {"original": series(original), **{name: series(m) for name, m in methods.items()}}
    frames = {"original": original, **methods}
    write_report(report_dir, metrics, signals, frames, fps / stride)
    return metrics
