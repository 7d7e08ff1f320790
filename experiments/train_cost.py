"""Cost of the train step per precision, remat policy and micro-batching, from XLA's own analyses.

For each ``precision:remat[:micro_batches]`` variant: the share of conv FLOPs per dtype
(counted in the lowered StableHLO), the compiled step's FLOPs, XLA's memory estimate
(arguments, outputs, temporaries, aliased = donated state; total = what the step needs at its
peak) and the largest fusions by bytes touched. With micro-batches, FLOPs are the loop body's
(which XLA counts once) times their number; the optimizer update outside it is negligible.
``--cpu-scheduler memory`` compiles with XLA:CPU's memory-minimising scheduler (its default
favours concurrency and keeps more live). No data and no VGG file are needed. Compiling
vox-256 at batch 28 takes a minute or two per variant on a CPU. Prints tables, writes JSON.

  python experiments/train_cost.py --config configs/train.py:vox-256 --batch 28 \\
      --variants float32:none,bfloat16:conv_outputs,bfloat16:conv_outputs:2 --json cost.json
"""

import argparse
import json
import platform
import time

import jax

from safetriage_jax.config_loader import load_python_config
from safetriage_jax.train import cost, step

GIB = 1024 ** 3


def _flops(compiled):
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def measure(config_spec, batch, variant, compile_step=True, compiler_options=None, top=5):
    config = load_python_config(config_spec)
    config.train.update(batch_size=batch, perceptual_weights="random", **variant)
    start = time.perf_counter()
    lowered = step.lower_train_step(config, batch)
    # Micro-batches run as a loop whose body both counts see once: every conv is in that body.
    loops = variant["micro_batches"]
    conv = {dtype: flops * loops for dtype, flops in
            cost.conv_flops_by_dtype(lowered.as_text()).items()}
    row = dict(variant, batch=batch, lower_s=time.perf_counter() - start, conv_flops=conv,
               conv_bf16_share=cost.conv_share(conv, "bf16"),
               scheduler="memory" if compiler_options else "default")
    if compile_step:
        start = time.perf_counter()
        compiled = lowered.compile(compiler_options=compiler_options)
        row.update(compile_s=time.perf_counter() - start, flops=_flops(compiled) * loops,
                   memory=cost.memory(compiled),
                   largest_fusions=cost.largest_fusions(compiled.as_text(), top))
    return row


def print_tables(rows):
    print(f"{'precision':>9} {'remat':>12} {'micro':>5} {'batch':>5} {'conv TFLOP':>10} {'bf16 conv':>9} "
          f"{'TFLOP':>7} {'args GiB':>8} {'out GiB':>7} {'temp GiB':>8} {'alias GiB':>9} "
          f"{'total GiB':>9} {'compile s':>9}")
    for r in rows:
        mem = r.get("memory") or {}
        gib = lambda k: f"{mem[k] / GIB:.2f}" if k in mem else "-"
        print(f"{r['precision']:>9} {r['remat']:>12} {r['micro_batches']:>5} {r['batch']:>5} "
              f"{sum(r['conv_flops'].values()) / 1e12:>10.2f} {r['conv_bf16_share']:>8.1%} "
              f"{r.get('flops', float('nan')) / 1e12:>7.2f} {gib('arguments'):>8} "
              f"{gib('outputs'):>7} {gib('temporaries'):>8} {gib('aliased'):>9} "
              f"{gib('total'):>9} {r.get('compile_s', float('nan')):>9.0f}")
    for r in rows:
        if r.get("largest_fusions"):
            print(f"largest fusions, {r['precision']} / {r['remat']} / {r['micro_batches']}:")
            for f in r["largest_fusions"]:
                print(f"  {f['bytes'] / GIB:7.3f} GiB  {f['kind']:<9} {f['output'][:60]}  {f['name']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/train.py:vox-256")
    parser.add_argument("--batch", type=int, default=28)
    parser.add_argument("--variants", default="float32:none,bfloat16:conv_outputs,bfloat16:conv_outputs:2",
                        help="comma-separated precision[:remat[:micro_batches]] variants")
    parser.add_argument("--cpu-scheduler", choices=("default", "memory"), default="default",
                        help="XLA:CPU scheduler to compile with (CPU only)")
    parser.add_argument("--lower-only", action="store_true",
                        help="count conv FLOPs only (no compile, no memory estimate)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = jax.devices()[0]
    options = None
    if args.cpu_scheduler == "memory":
        if device.platform != "cpu":
            parser.error("--cpu-scheduler memory applies to XLA:CPU only")
        options = cost.CPU_MEMORY_SCHEDULER
    print(f"device: {device.device_kind} ({platform.processor() or device.platform}), "
          f"jax {jax.__version__}, config {args.config}, batch {args.batch}, "
          f"scheduler {args.cpu_scheduler}")
    try:
        variants = [cost.parse_variant(v) for v in args.variants.split(",")]
    except ValueError as error:
        parser.error(str(error))
    rows = []
    for variant in variants:
        rows.append(measure(args.config, args.batch, variant, compile_step=not args.lower_only,
                            compiler_options=options))
        print_tables(rows[-1:])
        if args.json:  # after each variant: a long run keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"device": str(device.device_kind), "jax": jax.__version__,
                           "config": args.config, "rows": rows}, f, indent=2)
    print_tables(rows)


if __name__ == "__main__":
    main()
