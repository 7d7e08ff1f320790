"""Memory of ``evaluate_deid`` against video length: it streams, so the peak must not grow with
the number of frames (before, both videos were held in memory whole).

Evaluates a video against itself (all baselines) on its first N frames for each N, and prints
the peak of Python/NumPy allocations (``tracemalloc``: frames are NumPy arrays; dlib's own C++
buffers are not counted) next to what both videos' frames alone would take if held.

    python experiments/evaluate_memory.py [--video V] [--frames 30,120] [--out memory.json]
"""

import argparse
import pathlib
import tempfile
import time
import tracemalloc

from safetriage_jax import outputs
from safetriage_jax.deid.evaluation import evaluate_deid
from safetriage_jax.video import VideoReader

SHARED_VIDEO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "samples" / "driving.mp4"


def measure(video, frames):
    """(frames evaluated, peak MB, MB of both videos' frames, seconds) of one evaluation."""
    with VideoReader(video) as reader:
        height, width = next(iter(reader)).shape[:2]
    with tempfile.TemporaryDirectory() as folder:
        tracemalloc.start()
        start = time.perf_counter()
        metrics = evaluate_deid(video, video, pathlib.Path(folder) / "report", max_frames=frames,
                                progress=False)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    held = 2 * metrics["frames"] * height * width * 3
    return metrics["frames"], peak / 1e6, held / 1e6, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=str(SHARED_VIDEO))
    parser.add_argument("--frames", default="30,120", help="comma-separated frame counts")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    print(f"{'frames':>6} {'peak MB':>8} {'frames held MB':>14} {'seconds':>8}")
    for count in (int(n) for n in args.frames.split(",")):
        frames, peak, held, seconds = measure(args.video, count)
        rows.append({"frames": frames, "peak_mb": round(peak, 1), "frames_mb": round(held, 1),
                     "seconds": round(seconds, 1)})
        print(f"{frames:>6} {peak:>8.1f} {held:>14.1f} {seconds:>8.0f}")
    if args.out:
        outputs.write_json(args.out, {"rows": rows}, overwrite=True)


if __name__ == "__main__":
    main()
