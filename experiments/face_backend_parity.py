"""The jax face backend against dlib's on whole videos: tracks, and what paste-back would write.

For each variant of a video (as is, mirrored, scaled), both backends track the face the way
``deid --paste-back`` does (every frame searched whole); then, per backend: frames found,
blanked by the crop plan and by the coverage check, frames with other faces masked; between
them: frames found by one only, landmark distances (px) and face box (``framing.face_boxes``)
corner distances on frames found by both, and a cross check for leaks: frames one backend would
paste whose square does not cover the other backend's landmarks (outline with the margin).

  python experiments/face_backend_parity.py [--video shared/samples/driving.mp4] [--json out.json]
"""

import argparse
import json
import os
import pathlib
import time

import numpy as np

from safetriage_jax import outputs
from safetriage_jax.deid.faces import FaceTracker, face_models, resize
from safetriage_jax.deid.framing import (BLANK, FramingOptions, face_boxes, other_faces, plan_crops,
                                         uncovered_frames)
from safetriage_jax.video import VideoReader

SHARED = pathlib.Path(os.environ.get(
    "SAFETRIAGE_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared")) / "samples"


def variants(frames):
    """{name: frames}: as is, mirrored, scaled to 0.6 (all of the video's frames)."""
    height, width = frames[0].shape[:2]
    small = (round(width * 0.6), round(height * 0.6))
    return {"as is": frames, "mirrored": [f[:, ::-1].copy() for f in frames],
            "scaled 0.6": [resize(f, *small) for f in frames]}


def paste_back(track, options=FramingOptions()):
    """The crop plan with paste-back's coverage blanking, as ``pipeline.plan_frames``."""
    plan = plan_crops(face_boxes(track.landmarks_T68x2), track.fps, options)
    uncovered_T = uncovered_frames(plan, track.landmarks_T68x2, options)
    plan.status_T[uncovered_T] = BLANK
    return plan, uncovered_T


def compare(frames, fps):
    """Both backends on one list of frames: the row of the table."""
    row, tracks, plans = {}, {}, {}
    for backend in ("dlib", "jax"):
        start = time.perf_counter()
        tracker = FaceTracker(face_models(backend=backend), scan_every_frame=True)
        track = tracker.track(frames, fps)
        seconds = time.perf_counter() - start
        plan, uncovered_T = paste_back(track)
        masks = other_faces(track, plan)
        tracks[backend], plans[backend] = track, plan
        row[backend] = {"found": int(track.found_T.sum()), "blank": plan.counts()["blank"],
                        "uncovered": int(uncovered_T.sum()),
                        "masked_frames": int(sum(len(m) > 0 for m in masks)),
                        "seconds": round(seconds, 1)}
    dlib, jax = tracks["dlib"], tracks["jax"]
    both_T = dlib.found_T & jax.found_T
    dlib_T68x2, jax_T68x2 = dlib.landmarks_T68x2[both_T], jax.landmarks_T68x2[both_T]
    distance_TN = np.linalg.norm(dlib_T68x2 - jax_T68x2, axis=-1)
    corners_T4 = np.abs(face_boxes(dlib_T68x2) - face_boxes(jax_T68x2))
    row["found_by_one_only"] = int((dlib.found_T != jax.found_T).sum())
    row["landmark_px"] = {"median": float(np.median(distance_TN)),
                          "p95": float(np.percentile(distance_TN, 95)),
                          "max": float(distance_TN.max()),
                          "share_within_2px": float((distance_TN <= 2).mean())}
    row["face_box_px"] = {"median": float(np.median(corners_T4)), "max": float(corners_T4.max())}
    # A leak: a frame one backend pastes whose square leaves the other's face outline showing.
    for mine, theirs in (("jax", dlib), ("dlib", jax)):
        other = "dlib" if mine == "jax" else "jax"
        missed_T = uncovered_frames(plans[mine], theirs.landmarks_T68x2)
        row[f"{mine}_square_misses_{other}_face"] = int(missed_T.sum())
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=str(SHARED / "driving.mp4"))
    parser.add_argument("--frames", type=int, default=None, help="first N frames only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with VideoReader(args.video) as reader:
        fps = float(reader.fps)
        frames = [f for i, f in enumerate(reader) if args.frames is None or i < args.frames]
    rows = {}
    for name, clip in variants(frames).items():
        rows[name] = compare(clip, fps)
        print(name, json.dumps(rows[name]), flush=True)
    print(f"\n{'variant':<11} {'found d/j':>10} {'one only':>8} {'blank d/j':>9} "
          f"{'uncov d/j':>9} {'masked d/j':>10} {'lmk px med/p95/max':>19} {'leaks j/d':>9} "
          f"{'s d/j':>11}")
    for name, r in rows.items():
        d, j, lm = r["dlib"], r["jax"], r["landmark_px"]
        print(f"{name:<11} {d['found']:>4}/{j['found']:<5} {r['found_by_one_only']:>8} "
              f"{d['blank']:>4}/{j['blank']:<4} {d['uncovered']:>4}/{j['uncovered']:<4} "
              f"{d['masked_frames']:>5}/{j['masked_frames']:<4} "
              f"{lm['median']:>5.1f}/{lm['p95']:.1f}/{lm['max']:<5.1f} "
              f"{r['jax_square_misses_dlib_face']:>4}/{r['dlib_square_misses_jax_face']:<4} "
              f"{d['seconds']:>5.0f}/{j['seconds']:<5.0f}")
    if args.json:
        outputs.write_json(args.json, {"video": pathlib.Path(args.video).name,
                                                       "frames": len(frames), "rows": rows}, overwrite=True)


if __name__ == "__main__":
    main()
