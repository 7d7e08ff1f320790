"""End-to-end de-identification throughput (frames/s), detection and encoding included, and
the face stage alone on both face backends (jax, dlib) with XLA's cost of each part.

Runs `deidentify` on the first N frames of a video (default: the shared driving clip) with
random weights of the chosen config, in crop and paste-back modes, and splits the time into
stages (find face: decode + track + plan; render: crop + animate + compose + encode). The
baseline, measured in the same run, is `animate_video` on the same frames, i.e. the model and
the video I/O without any face pipeline. Each run is done twice with a persistent compilation
cache and the second is reported, so XLA compilation is excluded. Prints a table, writes JSON.

The face stage (``face_stage_rows``): tracking as ``deid --paste-back`` does it (every frame
searched whole, landmarks of the followed face) and the embedding of every found face (what
``evaluate-deid`` adds per frame and method), per backend, compiled first, then timed in turns
(dlib, jax, dlib, jax, ...; the best turn is reported: the machine may be shared). The cost
table (``cost_rows``): FLOPs and bytes accessed per frame from XLA's cost analysis of the
compiled functions (detector, landmarks, embedding network; chip extraction not counted) and of
the backbone's animate step, with a roofline lower bound on a device of the given peak FLOP/s
and memory bandwidth (an estimate, not a measurement).

  python experiments/deid_throughput.py --config vox-256 --frames 48
  python experiments/deid_throughput.py --face-stage-only --frames 16
"""

import argparse
import os
import pathlib
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax import outputs
from safetriage_jax.animate import Animator, animate_video
from safetriage_jax.deid.faces import FaceTracker, dlib_rectangles, face_models
from safetriage_jax.deid.pipeline import DeidOptions, deidentify
from safetriage_jax.face_models import face_embedding, shape_predictor
from safetriage_jax.model_dir import save_model
from safetriage_jax.models.config import load_model_config
from safetriage_jax.models.tpsmm import init_variables
from safetriage_jax.video import VideoReader, copy_first_frames, read_image

SHARED = pathlib.Path(os.environ.get(
    "SAFETRIAGE_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared")) / "samples"


def twice(fn):
    """Runs fn twice (the first compiles into the persistent cache); returns the second's result."""
    fn()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def face_stage(models, frames, fps):
    """(tracking seconds, embedding seconds) of one backend on the frames."""
    start = time.perf_counter()
    track = FaceTracker(models, scan_every_frame=True).track(frames, fps)
    tracked = time.perf_counter()
    found = np.flatnonzero(track.found_T)
    models.embeddings([frames[t] for t in found], track.landmarks_T68x2[found])
    return tracked - start, time.perf_counter() - tracked


def face_stage_rows(frames, fps, turns):
    """Face stage frames/s per backend, best of ``turns`` turns after a compiling run."""
    backends = {"dlib": face_models(backend="dlib"), "jax": face_models(backend="jax")}
    for models in backends.values():
        face_stage(models, frames, fps)  # loads and compiles
    best = {name: (float("inf"), float("inf")) for name in backends}
    for _ in range(turns):
        for name, models in backends.items():
            track_s, embed_s = face_stage(models, frames, fps)
            best[name] = min(best[name], (track_s, embed_s), key=sum)
    return [{"backend": name, "track_s": t, "embed_s": e, "track_fps": len(frames) / t,
             "embed_fps": len(frames) / e, "stage_fps": len(frames) / (t + e)}
            for name, (t, e) in best.items()]


def _cost(compiled, batch):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0)) / batch,
            "bytes": float(cost.get("bytes accessed", 0)) / batch}


def cost_per_frame(frames_BHW3, models=None):
    """XLA's cost analysis of the jax face stage on a batch of frames: per frame FLOPs and
    bytes accessed of the detector, the landmarks and the embedding (one face a frame).
    Returns {part: {"flops": ..., "bytes": ...}} (runs detector and landmarks once for the
    boxes and chips the later parts take)."""
    models = models or face_models(backend="jax")
    batch = len(frames_BHW3)
    frames = jnp.asarray(frames_BHW3)
    detector = models.detector
    boxes_B4 = np.asarray(detector.detect_batch(np.asarray(frames_BHW3))[0])[:, 0]
    rects_B4 = jnp.asarray(dlib_rectangles(boxes_B4))
    marks = models.landmarks_frames(list(frames_BHW3), list(boxes_B4), batch=batch)
    chips = face_embedding.extract_chips(frames_BHW3, np.round(marks))
    lowered = {
        "detector": detector._framed.lower(detector.params, frames),
        "landmarks": shape_predictor.cascade.lower(
            shape_predictor.device_arrays(models.predictor), shape_predictor.grey(frames),
            rects_B4, models.predictor.depth),
        "embedding": face_embedding.embed_chips.lower(models.embedding_params, chips),
    }
    out = {}
    for part, low in lowered.items():
        out[part] = _cost(low.compile(), batch)
    return out


def cost_rows(frames, config, variables, identity, batch, peak_tflops, bandwidth_tbs):
    """Per-frame XLA cost of the jax face stage's parts and of the backbone's animate step,
    with a roofline lower bound in ms per frame on a device of this peak and bandwidth."""
    parts = cost_per_frame(np.stack(frames[:face_models(backend="jax").chunk]))
    animator = Animator(config, variables)
    animator.set_source(identity, frames[0])
    size = config.image_size
    crops = np.zeros((batch, size, size, 3), np.uint8)
    parts["backbone (animate)"] = _cost(animator._animate.lower(
        animator.variables, animator.prompt_params, animator._state, crops).compile(), batch)
    face = {k: sum(parts[p][k] for p in ("detector", "landmarks", "embedding"))
            for k in ("flops", "bytes")}
    rows = []
    for name, cost in list(parts.items())[:3] + [("face stage", face)] + list(parts.items())[3:]:
        bound_ms = 1e3 * max(cost["flops"] / (peak_tflops * 1e12),
                             cost["bytes"] / (bandwidth_tbs * 1e12))
        rows.append({"part": name, **cost, "roofline_ms": bound_ms})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vox-256")
    parser.add_argument("--video", default=str(SHARED / "driving.mp4"))
    parser.add_argument("--identity", default=str(SHARED / "source.png"))
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--turns", type=int, default=2, help="timed turns of the face stage")
    parser.add_argument("--face-stage-only", action="store_true",
                        help="skip the end-to-end deid rows")
    parser.add_argument("--peak-tflops", type=float, default=67.0,
                        help="for the roofline estimate (default: H200 float32, dense)")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8,
                        help="for the roofline estimate (default: H200 HBM3e)")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="deid-bench-"))
    jax.config.update("jax_compilation_cache_dir", str(work / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    config = load_model_config(args.config)
    variables = init_variables(config, jax.random.PRNGKey(0))
    model = save_model(work / "model", config, variables)
    clip = work / "clip.mp4"
    count, (height, width) = copy_first_frames(args.video, clip, args.frames)
    with VideoReader(clip) as reader:
        frames, fps = list(reader), float(reader.fps)
    device = jax.devices()[0]
    header = (f"{count} frames of {width}x{height}, device {device.device_kind} "
              f"({device.platform}), jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")

    face_rows = face_stage_rows(frames, fps, args.turns)
    load = os.getloadavg()[0]
    print(f"\nface stage: {header}, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'backend':<8} {'track frames/s':>15} {'embed frames/s':>15} {'stage frames/s':>15}")
    for row in face_rows:
        print(f"{row['backend']:<8} {row['track_fps']:>15.2f} {row['embed_fps']:>15.2f} "
              f"{row['stage_fps']:>15.2f}")
    costs = cost_rows(frames, config, variables, read_image(args.identity), args.batch,
                      args.peak_tflops, args.bandwidth_tbs)
    backbone = costs[-1]
    print(f"\nXLA cost per frame (face stage in chunks of {face_models(backend='jax').chunk}, "
          f"backbone batch {args.batch}, compiled for {device.platform}); roofline "
          f"lower bound at {args.peak_tflops:g} TFLOP/s, {args.bandwidth_tbs:g} TB/s")
    print(f"{'part':<20} {'GFLOP':>8} {'MB':>8} {'x backbone FLOPs':>17} {'roofline ms':>12}")
    for row in costs:
        print(f"{row['part']:<20} {row['flops'] / 1e9:>8.3f} {row['bytes'] / 1e6:>8.1f} "
              f"{row['flops'] / backbone['flops']:>17.3f} {row['roofline_ms']:>12.3f}")
    print("(landmarks: XLA counts the body of the cascade's 15-level loop once, so its row is a "
          "lower bound; by hand ~1 MFLOP and ~4 MB of leaf reads per face)")

    rows = []
    if not args.face_stage_only:
        _, seconds = twice(lambda: animate_video(model, args.identity, clip, work / "a.mp4",
                                                 batch_size=args.batch, overwrite=True,
                                                 progress=False))
        rows.append({"pipeline": "animate (no face pipeline)", "seconds": seconds})
        for paste_back in (False, True):
            options = DeidOptions(paste_back=paste_back, batch_size=args.batch)
            summary, seconds = twice(lambda: deidentify(
                clip, args.identity, work / "d.mp4", model, options=options, overwrite=True,
                progress=False))
            rows.append({"pipeline": "deid " + ("paste-back" if paste_back else "crop"),
                         "seconds": seconds, "stages": summary["stage_seconds"]})
        base = rows[0]["seconds"]
        print(f"\ndeid throughput: {header}, config {args.config} ({config.image_size}px, random "
              f"weights), batch {args.batch}")
        print(f"{'pipeline':<28} {'frames/s':>9} {'vs animate':>11} {'find face s':>12} "
              f"{'render s':>9}")
        for row in rows:
            row["frames_per_s"] = count / row["seconds"]
            stages = row.get("stages", {})
            find_s, render_s = (stages.get(k, float("nan")) for k in ("find_face", "render"))
            print(f"{row['pipeline']:<28} {row['frames_per_s']:>9.2f} "
                  f"{base / row['seconds']:>10.2f}x {find_s:>12.2f} {render_s:>9.2f}")
    if args.json:
        outputs.write_json(args.json, {"config": args.config, "frames": count, "size": [width, height],
                       "device": device.device_kind, "platform": device.platform,
                       "jax": jax.__version__, "host": platform.node(), "load_average": load,
                       "face_stage": face_rows, "cost_per_frame": costs, "rows": rows}, overwrite=True)


if __name__ == "__main__":
    main()
