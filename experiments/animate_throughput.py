"""Animate throughput (frames/s) of the batched TPSMM pipeline, by batch size.

Times the jitted per-batch device function (resize, keypoints, dense motion, generator,
uint8 quantisation) on random weights of the chosen config; the source's keypoints and
features are cached, as in `safetriage animate`. The baseline is batch 1 (one frame per call,
as upstream's demo animates), measured in the same run. Prints a table and writes JSON.

  python experiments/animate_throughput.py --config vox-256 --batch-sizes 1,8,32
"""

import argparse
import platform
import time

import jax
import numpy as np

from safetriage_jax import outputs
from safetriage_jax.animate import Animator
from safetriage_jax.models.config import load_model_config
from safetriage_jax.models.tpsmm import init_variables


def time_batch(animator, frames, iters):
    """Median seconds per call over ``iters`` calls after one warm-up (compilation) call."""
    animator.animate(frames).block_until_ready()
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        animator.animate(frames).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vox-256")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--frame-size", type=int, default=256, help="decoded video frame side")
    parser.add_argument("--precision", default="default", choices=["default", "highest"],
                        help="matmul/conv precision (GPU default is TF32)")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the networks' compute dtype (`safetriage animate --precision`)")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    config = load_model_config(args.config)
    variables = init_variables(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (args.frame_size, args.frame_size, 3), np.uint8)
    device = jax.devices()[0]
    rows = []
    with jax.default_matmul_precision(args.precision if args.precision != "default" else None):
        animator = Animator(config, variables, mode="relative", precision=args.compute_dtype)
        animator.set_source(source, source)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            frames = rng.integers(0, 256, (batch, args.frame_size, args.frame_size, 3), np.uint8)
            seconds = time_batch(animator, frames, args.iters)
            rows.append({"batch": batch, "seconds_per_call": seconds,
                         "frames_per_s": batch / seconds})
    base = rows[0]["frames_per_s"]
    print(f"\nanimate throughput: config {args.config} ({config.image_size}px), "
          f"{args.compute_dtype}, "
          f"precision {args.precision}, device {device.device_kind} ({device.platform}), "
          f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'batch':>6} {'ms/call':>10} {'frames/s':>10} {'vs batch ' + str(rows[0]['batch']):>12}")
    for row in rows:
        print(f"{row['batch']:>6} {row['seconds_per_call'] * 1e3:>10.1f} "
              f"{row['frames_per_s']:>10.2f} {row['frames_per_s'] / base:>11.2f}x")
    if args.json:
        outputs.write_json(args.json, {"config": args.config, "compute_dtype": args.compute_dtype,
                       "device": device.device_kind,
                       "platform": device.platform, "jax": jax.__version__,
                       "host": platform.node(), "rows": rows}, overwrite=True)


if __name__ == "__main__":
    main()
