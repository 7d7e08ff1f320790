"""End-to-end de-identification throughput (frames/s), detection and encoding included.

Runs `deidentify` on the first N frames of a video (default: the shared driving clip) with
random weights of the chosen config, in crop and paste-back modes, and splits the time into
stages (find face: decode + track + plan; render: crop + animate + compose + encode). The
baseline, measured in the same run, is `animate_video` on the same frames, i.e. the model and
the video I/O without any face pipeline. Each run is done twice with a persistent compilation
cache and the second is reported, so XLA compilation is excluded. Prints a table, writes JSON.

  python experiments/deid_throughput.py --config vox-256 --frames 48
"""

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import jax

from safetriage_jax.animate import animate_video
from safetriage_jax.deid.pipeline import DeidOptions, deidentify
from safetriage_jax.model_dir import save_model
from safetriage_jax.models.config import load_model_config
from safetriage_jax.models.tpsmm import init_variables
from safetriage_jax.video import copy_first_frames

SHARED = pathlib.Path(os.environ.get(
    "SAFETRIAGE_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared")) / "samples"


def twice(fn):
    """Runs fn twice (the first compiles into the persistent cache); returns the second's result."""
    fn()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vox-256")
    parser.add_argument("--video", default=str(SHARED / "driving.mp4"))
    parser.add_argument("--identity", default=str(SHARED / "source.png"))
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="deid-bench-"))
    jax.config.update("jax_compilation_cache_dir", str(work / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    config = load_model_config(args.config)
    model = save_model(work / "model", config, init_variables(config, jax.random.PRNGKey(0)))
    clip = work / "clip.mp4"
    count, (height, width) = copy_first_frames(args.video, clip, args.frames)

    rows = []
    _, seconds = twice(lambda: animate_video(model, args.identity, clip, work / "a.mp4",
                                             batch_size=args.batch, overwrite=True,
                                             progress=False))
    rows.append({"pipeline": "animate (no face pipeline)", "seconds": seconds})
    for paste_back in (False, True):
        options = DeidOptions(paste_back=paste_back, batch_size=args.batch)
        summary, seconds = twice(lambda: deidentify(clip, args.identity, work / "d.mp4", model,
                                                    options=options, overwrite=True,
                                                    progress=False))
        rows.append({"pipeline": "deid " + ("paste-back" if paste_back else "crop"),
                     "seconds": seconds, "stages": summary["stage_seconds"]})
    device = jax.devices()[0]
    base = rows[0]["seconds"]
    print(f"\ndeid throughput: {count} frames of {width}x{height}, config {args.config} "
          f"({config.image_size}px, random weights), batch {args.batch}, device "
          f"{device.device_kind} ({device.platform}), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'pipeline':<28} {'frames/s':>9} {'vs animate':>11} {'find face s':>12} {'render s':>9}")
    for row in rows:
        row["frames_per_s"] = count / row["seconds"]
        stages = row.get("stages", {})
        print(f"{row['pipeline']:<28} {row['frames_per_s']:>9.2f} {base / row['seconds']:>10.2f}x "
              f"{stages.get('find_face', float('nan')):>12.2f} {stages.get('render', float('nan')):>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "frames": count, "device": device.device_kind,
                       "platform": device.platform, "jax": jax.__version__,
                       "host": platform.node(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
