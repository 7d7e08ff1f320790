"""De-identify a facial video: the synthetic identity makes the patient's facial movements.

Two passes over the input. The first (:func:`find_face`) finds and tracks the face, and
:func:`plan_frames` plans a smoothed square crop per frame. The second (:func:`render`) crops,
animates the identity image with the crops (batched, jitted), and writes either the generated
crops or the full frames with the face pasted back. Frames with no face are written black,
never as the original. One face is the subject (``--subject``: the largest by default); with
paste-back every frame is searched whole and every other face found is masked black, so no face
of the original passes through. Only video is written unless audio is asked for: audio and
metadata are dropped (a voice or a recording's tags can identify a person too).
"""

import dataclasses
import pathlib
import time

import numpy as np
from tqdm.auto import tqdm

from safetriage_jax import outputs
from safetriage_jax.animate import MODES, Animator, check_batch_size
from safetriage_jax.deid import landmarks
from safetriage_jax.deid.faces import (DEFAULT_FACE_BACKEND, DETECTORS, FACE_BACKENDS,
                                       FaceTracker, Subject, crop_square, face_models, find_faces)
from safetriage_jax.deid.framing import (BLANK, FramingOptions, black_out, face_boxes, other_faces,
                                         paste, plan_crops, runs, uncovered_frames)
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.model_dir import load_model, load_prompt
from safetriage_jax.video import VideoReader, read_image, video_writer

REFERENCES = ("first", "neutral", "best")


@dataclasses.dataclass(frozen=True)
class DeidOptions:
    mode: str = "relative"  # relative (convex-hull scaled) | standard | avd
    reference: str = "first"  # which frame relative motion starts from: first | neutral | best
    paste_back: bool = False  # full frames with the face replaced, instead of the face crop
    detector: str | None = None  # dlib backend: hog (default) or centerface (OpenCV)
    face_backend: str = DEFAULT_FACE_BACKEND  # jax (batched, on the device) | dlib (reference)
    keep_audio: bool = False  # off by default: a voice identifies a person too
    batch_size: int = 16
    framing: FramingOptions = FramingOptions()
    warp_implementation: str | None = None
    precision: str = "float32"  # the networks' compute dtype: float32 | bfloat16
    subject: str = "largest"  # the patient's face: largest | center | x0,y0,x1,y1 (frame pixels)


def _check(options):
    check_batch_size(options.batch_size)
    Subject.parse(options.subject)
    choices = {"reference": REFERENCES, "mode": MODES, "detector": DETECTORS,
               "face_backend": FACE_BACKENDS}
    for name, allowed in choices.items():
        if getattr(options, name) not in allowed and getattr(options, name) is not None:
            raise SafeTriageError(f"Unknown {name} {getattr(options, name)!r}; choose one of "
                                  f"{', '.join(allowed)}.")


def identity_face(path, size, framing, models):
    """The identity image's face, cropped like the video's: (crop_SS3, landmarks_68x2, notes)."""
    image = read_image(path)
    boxes, _ = find_faces(models, image)
    if not len(boxes):
        raise SafeTriageError(f"No face found in the identity image {path}; use a frontal "
                              "portrait with the face at least 40 px across.")
    notes = [f"The identity image shows {len(boxes)} faces; the largest is used."] if len(boxes) > 1 else []
    marks = models.landmarks(image, boxes[0])
    box = face_boxes(marks[None])[0]
    side = box[2] - box[0]
    center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2 - framing.raise_by * side])
    crop, _ = crop_square(image, center, side * framing.scale, size)
    return crop, marks, notes


def choose_reference(track, plan, how, identity_landmarks_68x2):
    """Index of the frame whose face the relative motion is measured from."""
    usable = plan.status_T != BLANK
    marks = np.where(usable[:, None, None], track.landmarks_T68x2, np.nan)
    if how == "neutral":
        return landmarks.neutral_frame(marks)
    if how == "best":
        return landmarks.closest_frame(marks, identity_landmarks_68x2)
    return int(np.flatnonzero(track.found_T & usable)[0])


def _frame_at(path, index):
    with VideoReader(path) as reader:
        for i, frame in enumerate(reader):
            if i == index:
                return frame
    raise SafeTriageError(f"{path} changed while it was being read (frame {index} is gone).")


def _chunks(frames, plan, size, batch_size):
    """Groups frames into (entries, crops_BSS3 or None): ``entries`` holds (index, frame)
    for every frame in order; ``crops`` the face crops, padded to the batch size."""
    entries, crops = [], []
    for index, frame in enumerate(frames):
        entries.append((index, frame))
        if plan.status_T[index] != BLANK:
            crops.append(crop_square(frame, plan.centers_T2[index], plan.sides_T[index], size)[0])
        if len(crops) == batch_size or len(entries) >= 4 * batch_size:
            yield _batch(entries, crops, batch_size)
            entries, crops = [], []
    if entries:
        yield _batch(entries, crops, batch_size)


def _batch(entries, crops, batch_size):
    if not crops:
        return entries, None
    return entries, np.stack(crops + [crops[-1]] * (batch_size - len(crops)))


def _compose(entries, faces_BSS3, plan, paste_back, feather, blank_HW3, masks_T):
    """Output frames of one chunk: generated face (or frame with it pasted back and every
    other face masked black), or black."""
    out, next_face = [], 0
    for index, frame in entries:
        if plan.status_T[index] == BLANK:
            out.append(blank_HW3)
            continue
        face = faces_BSS3[next_face]
        next_face += 1
        if paste_back:
            pasted = paste(frame, face, plan.centers_T2[index], plan.sides_T[index], feather)
            out.append(black_out(pasted, masks_T[index]))
        else:
            out.append(face)
    return out


def _ranges(mask_T, fps):
    """Runs of True as [{start, stop, seconds}] (stop exclusive), for the report."""
    return [{"start": int(a), "stop": int(b), "seconds": [round(a / fps, 3), round(b / fps, 3)]}
            for a, b in runs(mask_T)]


def check_outputs(input_path, identity_path, out_path, model_dir, prompt_dir=None,
                  report_dir=None, overwrite=False):
    """Raises before any compute if the video or the report folder may not be written: an
    output that is an input, exists (without ``overwrite``) or lies in an unwritable place."""
    inputs = (input_path, identity_path, model_dir, prompt_dir)
    outputs.check_output(out_path, "video", inputs=inputs, overwrite=overwrite)
    if report_dir is not None:
        outputs.check_output(report_dir, "folder", inputs=(*inputs, out_path), overwrite=overwrite)


def deidentify(input_path, identity_path, out_path, model_dir, *, options=DeidOptions(),
               prompt_dir=None, report_dir=None, overwrite=False, report_show_original=False,
               progress=True):
    """Writes the de-identified video to ``out_path`` (atomically); returns a summary dict.

    ``prompt_dir``: a prompt generator from ``safetriage train-prompt`` that adapts the patient's
    frames for the backbone. With ``report_dir``, also writes ``deid.json`` there and the
    privacy/utility evaluation (the original's face masked unless ``report_show_original``).
    ``overwrite``: replace an existing output video / report this tool wrote (never an input).
    With paste-back, a frame whose pasted square would not cover the whole face is blanked.
    """
    _check(options)
    check_outputs(input_path, identity_path, out_path, model_dir, prompt_dir, report_dir,
                  overwrite)
    start_time = time.perf_counter()
    models = face_models(options.detector, options.face_backend)  # first: a missing extra
    config, variables = load_model(model_dir)
    prompt = load_prompt(prompt_dir) if prompt_dir is not None else None
    animator = Animator(config, variables, options.mode, prompt, options.precision,
                        options.warp_implementation)
    size = config.image_size
    identity, identity_marks, notes = identity_face(identity_path, size, options.framing, models)
    setup_done = time.perf_counter()

    fps, track, subject = find_face(input_path, models, options, progress)
    notes += track.notes
    track_done = time.perf_counter()
    plan, uncovered_T = plan_frames(input_path, track, fps, options)
    masks_T = other_faces(track, plan, options.framing) if options.paste_back else None
    notes.append(_subject_note(track, subject, options))
    masked_frames = sum(len(m) > 0 for m in masks_T) if masks_T is not None else 0
    if masked_frames:
        notes.append(f"Other faces were masked black in {masked_frames} frame(s).")
    reference = choose_reference(track, plan, options.reference, identity_marks)
    reference_crop = crop_square(_frame_at(input_path, reference), plan.centers_T2[reference],
                                 plan.sides_T[reference], size)[0]
    animator.set_source(identity, reference_crop)
    render(input_path, identity_path, out_path, animator, track, plan, options, size,
           overwrite, progress, masks_T)

    notes += _blank_notes(plan, uncovered_T)
    counts = plan.counts()
    end_time = time.perf_counter()
    seconds = end_time - start_time
    summary = {
        # file names only: a report is shared, and folder names often identify the patient
        "input": _name(input_path), "identity": _name(identity_path), "output": _name(out_path),
        "model": _name(model_dir), "prompt": None if prompt_dir is None else _name(prompt_dir),
        "mode": options.mode, "paste_back": options.paste_back, "subject": options.subject,
        "masked_frames": masked_frames, "face_backend": options.face_backend,
        "frames": track.num_frames, "fps": fps, "face_frames": counts["face"],
        "filled_frames": counts["filled"], "blank_frames": counts["blank"],
        "uncovered_frames": int(uncovered_T.sum()),
        "blank_ranges": _ranges(plan.status_T == BLANK, fps),
        "reference": {"how": options.reference, "frame": reference},
        "audio": "kept (AAC)" if options.keep_audio else "dropped", "metadata": "dropped",
        "seconds": round(seconds, 2), "frames_per_second": round(track.num_frames / seconds, 2),
        "stage_seconds": {"load": round(setup_done - start_time, 3),  # model, identity face
                          "find_face": round(track_done - setup_done, 3),  # decode, track, plan
                          "render": round(end_time - track_done, 3)},  # crop, animate, write
        "notes": notes,
    }
    if report_dir is not None:
        from safetriage_jax.deid.evaluation import evaluate_deid
        try:
            evaluate_deid(input_path, out_path, report_dir, identity_path=identity_path,
                          progress=progress, overwrite=overwrite,
                          face_backend=options.face_backend,
                          show_original=report_show_original, extra_json={"deid.json": summary})
        except BaseException:  # interrupted or failed: no video without its report
            pathlib.Path(out_path).unlink(missing_ok=True)
            raise
    return summary


def find_face(input_path, models, options, progress=True):
    """First pass: (fps, face track, subject) of the input video; raises if no frame shows a
    face. With paste-back every frame is searched whole, so every other face can be masked."""
    subject = Subject.parse(options.subject)
    with VideoReader(input_path) as reader:
        fps = float(reader.fps)
        bar = tqdm(total=reader.num_frames, unit="frame", desc="find face", disable=not progress)
        tracker = FaceTracker(models, subject=subject, scan_every_frame=options.paste_back)
        track = tracker.track(reader, fps, progress=bar)
        bar.close()
    if not track.found_T.any():
        raise SafeTriageError(
            f"No face found in {input_path} ({track.num_frames} frames searched). The face must be "
            "roughly frontal, unoccluded and at least 40 px across; nothing was written.")
    return fps, track, subject


def plan_frames(input_path, track, fps, options):
    """The smoothed crop per frame, and (with paste-back) the frames blanked because the pasted
    square would not cover the whole face: (plan, uncovered_T)."""
    plan = plan_crops(face_boxes(track.landmarks_T68x2), fps, options.framing)
    uncovered_T = np.zeros(track.num_frames, bool)
    if options.paste_back:  # never write a frame where part of the original face would show
        uncovered_T = uncovered_frames(plan, track.landmarks_T68x2, options.framing)
        plan.status_T[uncovered_T] = BLANK
        if not (track.found_T & (plan.status_T != BLANK)).any():
            raise SafeTriageError(
                f"At crop scale {options.framing.scale:g} the pasted face would not cover the "
                f"patient's face in any frame of {input_path}; use a larger crop scale (default "
                f"{FramingOptions().scale:g}). Nothing was written.")
    return plan, uncovered_T


def render(input_path, identity_path, out_path, animator, track, plan, options, size,
           overwrite, progress=True, masks_T=None):
    """Second pass: crops, animates (one batch in flight while the previous one is written)
    and writes every frame of ``out_path``, black where the plan says blank; ``masks_T``: the
    other faces to mask black in each pasted-back frame."""
    width, height = (track.width, track.height) if options.paste_back else (size, size)
    blank = np.zeros((height, width, 3), np.uint8)
    audio_from = input_path if options.keep_audio else None
    with VideoReader(input_path) as reader, \
            video_writer(out_path, reader.fps, width, height, audio_from=audio_from,
                         overwrite=overwrite, inputs=(input_path, identity_path)) as write:
        bar = tqdm(total=track.num_frames, unit="frame", desc="de-identify", disable=not progress)
        pending = None
        for entries, crops in _chunks(reader, plan, size, options.batch_size):
            result = animator.animate(crops) if crops is not None else None  # async dispatch
            if pending is not None:
                _flush(write, pending, plan, options, blank, bar, masks_T)
            pending = (entries, result)
        _flush(write, pending, plan, options, blank, bar, masks_T)
        bar.close()


def _blank_notes(plan, uncovered_T):
    """The report's notes on frames written black, by cause."""
    counts, notes = plan.counts(), []
    if counts["blank"] > uncovered_T.sum():
        notes.append(f"{counts['blank'] - uncovered_T.sum()} frame(s) had no face nearby in time "
                     "and were written black.")
    if uncovered_T.any():
        notes.append(f"{int(uncovered_T.sum())} frame(s) were written black because the pasted "
                     "face would not have covered the whole face (outline with a margin); a "
                     "larger crop scale keeps more of them.")
    return notes


def _subject_note(track, subject, options):
    """Which face was replaced (paste-back) or drove the motion (crop), and where it was first."""
    first = int(np.flatnonzero(track.found_T)[0])
    box = ",".join(f"{v:.0f}" for v in track.boxes_T4[first])
    role = ("is replaced; every other face found is masked black" if options.paste_back
            else "drives the motion")
    return (f"Subject (--subject {options.subject}): {subject.describe()}, first found in frame "
            f"{first} at x0,y0,x1,y1 = {box}, {role}.")


def _name(path):
    return pathlib.Path(path).name


def _flush(write, pending, plan, options, blank, bar, masks_T):
    entries, result = pending
    faces = np.asarray(result) if result is not None else None
    write(_compose(entries, faces, plan, options.paste_back, options.framing.feather, blank,
                   masks_T))
    bar.update(len(entries))

