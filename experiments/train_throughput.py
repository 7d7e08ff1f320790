"""Training throughput (pairs/s) and memory of the jitted, sharded train step, by precision,
remat policy and micro-batching.

Times the full upstream training step (augmentation, all five losses, both optimizers) on
random uint8 batches already on the device, so the input pipeline is not in the figure. The
baseline is the first variant (float32, no remat) in the same run. Memory is XLA's compiled
estimate (arguments + outputs + temporaries - donated, ``train.cost.memory``) and, where the
runtime reports it (GPU/TPU), the measured peak. Prints a table and writes JSON.

  python experiments/train_throughput.py --config configs/train.py:vox-256 --batch 28 \
      --variants float32:none,bfloat16:conv_outputs,bfloat16:conv_outputs:2
"""

import argparse
import json
import platform
import time

import jax
import numpy as np

from safetriage_jax.config_loader import load_python_config
from safetriage_jax.train import cost
from safetriage_jax.train.backbone import Trainer

GIB = 1024 ** 3


def measure(config, batch_size, steps):
    trainer = Trainer(config, steps_per_epoch=1000)
    state, vgg = trainer.initial_state()
    size = config.model.image_size
    rng = np.random.default_rng(0)
    batch = trainer.global_batch({k: rng.integers(0, 256, (batch_size, size, size, 3), np.uint8)
                                  for k in ("source", "driving")})
    extras = trainer.step_extras(vgg)
    compiled = trainer.step.lower(state, batch, *extras).compile()
    sizes = cost.memory(compiled)
    estimate = sizes["total"] / GIB if sizes is not None else float("nan")
    state, metrics = compiled(state, batch, *extras)  # warm-up (the step compiled once, above)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, *extras)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    step_s = float(np.median(seconds))
    return {"precision": config.train.precision, "remat": config.train.remat,
            "micro_batches": config.train.micro_batches, "batch": batch_size, "step_ms": step_s * 1e3,
            "pairs_per_s": batch_size / step_s, "xla_memory_gib": estimate,
            "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / GIB,
            "loss": float(metrics["loss"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/train.py:vox-256")
    parser.add_argument("--batch", type=int, default=28)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="float32:none,bfloat16:conv_outputs,bfloat16:conv_outputs:2",
                        help="comma-separated precision[:remat[:micro_batches]] variants "
                             "(train.precision, train.remat, train.micro_batches)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        variants = [cost.parse_variant(v) for v in args.variants.split(",")]
    except ValueError as error:
        parser.error(str(error))
    rows = []
    for variant in variants:
        config = load_python_config(args.config)
        # timing only: the VGG weights' values don't matter
        config.train.update(perceptual_weights="random", batch_size=args.batch, **variant)
        rows.append(measure(config, args.batch, args.steps))
    base = rows[0]["pairs_per_s"]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x{jax.device_count()} ({platform.processor() or device.platform}),"
          f" jax {jax.__version__}, config {args.config}")
    print(f"{'precision':>10} {'remat':>12} {'micro':>5} {'batch':>6} {'ms/step':>9} {'pairs/s':>9} "
          f"{'vs first':>8} {'XLA GiB':>8} {'peak GiB':>9}")
    for row in rows:
        print(f"{row['precision']:>10} {row['remat']:>12} {row['micro_batches']:>5} {row['batch']:>6} {row['step_ms']:>9.1f} "
              f"{row['pairs_per_s']:>9.2f} {row['pairs_per_s'] / base:>7.2f}x "
              f"{row['xla_memory_gib']:>8.2f} {row['peak_gib']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device.device_kind), "config": args.config, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
