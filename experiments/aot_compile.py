"""Compiler truth without hardware: the warp kernels and the train step compiled for a TPU or
an H100 on this CPU host (``safetriage_jax.aot``; needs the tpu-aot / gpu-aot extras).

``kernels``: every model-shape case of ``kernels/grid_sample/specs.BENCH_CASES`` x (float32,
bfloat16) x (forward, backward = grad to image and grid): 52 compiles of the target's Pallas
kernels (Mosaic on v5e/v6e, Triton on h100), with ``--xla`` the reference warp too (the
baseline for memory). ``train``: the training step of ``--config`` at ``--batch`` per
precision variant, xla warps and/or the target's kernels. Prints a table per part and writes
JSON beside it. Compiled, not run: memory is XLA's memory_analysis (arguments, outputs,
temporaries), Triton figures are ptxas -v for sm_90a (registers, spills, shared memory) and
the occupancy they allow.

  python experiments/aot_compile.py kernels --target v5e --xla --json out/aot_v5e.json
  python experiments/aot_compile.py kernels --target h100 --json out/aot_h100.json
  python experiments/aot_compile.py train --target h100 --config configs/train.py:vox-256 \\
      --batch 28 --variants float32,bfloat16 --warps xla,kernel
"""

import argparse
import dataclasses
import functools
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from safetriage_jax import aot, outputs
from safetriage_jax.kernels.grid_sample import api, specs

GIB = 2 ** 30
KERNEL_IMPLEMENTATION = {"tpu": "pallas_mosaic_tpu", "cuda": "pallas_triton"}
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def kernel_cases(names=None):
    """The bench's model-shape cases in both dtypes (``names``: keep cases whose name has one)."""
    cases = [dataclasses.replace(case, dtype=dtype) for case in specs.BENCH_CASES
             for dtype in ("float32", "bfloat16")]
    if names:
        cases = [case for case in cases if any(name in case.name for name in names)]
    return cases


def warp_functions(implementation, case):
    """(forward, backward) of one case: the warp, and the gradient of a loss to image and grid."""
    sample = functools.partial(api.IMPLEMENTATIONS[implementation],
                               padding_mode=case.padding_mode, align_corners=case.align_corners,
                               interpret=False if implementation != "xla" else None)

    def loss(image, grid):
        return jnp.sum(sample(image, grid).astype(jnp.float32) ** 2)
    return {"forward": sample, "backward": jax.grad(loss, argnums=(0, 1))}


def compile_row(target, fn, args, **extra):
    """Compiles fn(*args) for target: a result row (never raises; failures keep the message)."""
    platform = aot.TARGETS[target][0]
    row = dict(extra, target=target)
    start = time.perf_counter()
    try:
        if platform == "cuda":
            lowered, compiled, seconds, report = aot.compile_with_ptxas(fn, *args)
            row["ptxas"] = report
        else:
            lowered, compiled, seconds = aot.compile_for(target, fn, *args)
        row.update(ok=True, seconds=round(seconds, 1), memory=aot.memory(compiled),
                   custom_calls=lowered.as_text().count(CUSTOM_CALL[platform]))
    except Exception as error:  # the compiler's own words are the result
        row.update(ok=False, seconds=round(time.perf_counter() - start, 1),
                   error=f"{type(error).__name__}: {str(error).splitlines()[0][:400]}")
        traceback.print_exc(file=sys.stderr)
    return row


def gib(row, key):
    return f"{row['memory'][key] / GIB:.3f}" if row.get("ok") else "-"


def print_kernel_row(row):
    head = (f"| {row['case']} | {row['implementation']} | {row['pass']} | "
            f"{'yes' if row['ok'] else 'NO'} | {row['seconds']} | {gib(row, 'arguments')} | "
            f"{gib(row, 'outputs')} | {gib(row, 'temporaries')} |")
    if not row["ok"]:
        print(f"{head} {row['error'][:160]} |", flush=True)
        return
    figures = []
    for kernel, r in sorted(row.get("ptxas", {}).items()):
        occupancy = f"{r['occupancy']:.0%}" if r["occupancy"] is not None else "?"
        figures.append(f"{kernel.replace('grid_sample_', '')}: {r['registers']} regs, "
                       f"spills {r['spill_stores']}/{r['spill_loads']} B, smem {r['smem']} B, "
                       f"{occupancy}")
    print(f"{head} {'; '.join(figures)} |", flush=True)


def kernels(args):
    platform = aot.TARGETS[args.target][0]
    implementations = [KERNEL_IMPLEMENTATION[platform]] + (["xla"] if args.xla else [])
    print(f"# kernels, target {args.target} ({aot.device(args.target).device_kind}), jax "
          f"{jax.__version__}, compiled, not run")
    print("| case | implementation | pass | compiles | s | args GiB | out GiB | temp GiB | "
          "ptxas (Triton) / error |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for case in kernel_cases(args.cases):
        image = aot.abstract(case.image_shape, jnp.dtype(case.dtype), args.target)
        grid = aot.abstract(case.grid_shape, jnp.float32, args.target)
        for implementation in implementations:
            for name, fn in warp_functions(implementation, case).items():
                row = compile_row(args.target, fn, (image, grid), case=str(case),
                                  implementation=implementation, **{"pass": name})
                print_kernel_row(row)
                rows.append(row)
    kernel_rows = [r for r in rows if r["implementation"] != "xla"]
    spills = sum(r["spill_stores"] for row in kernel_rows if row["ok"]
                 for r in row.get("ptxas", {}).values())
    print(f"\n{sum(r['ok'] for r in kernel_rows)} of {len(kernel_rows)} kernel compiles pass; "
          f"ptxas spill stores in all: {spills} B")
    return rows


def train(args):
    from safetriage_jax.models.config import load_python_config
    from safetriage_jax.train import cost, step
    platform = aot.TARGETS[args.target][0]
    print(f"# train step, target {args.target}, {args.config}, batch {args.batch}, jax "
          f"{jax.__version__}, compiled, not run")
    print("| variant | warps | compiles | s | args GiB | out GiB | temp GiB | aliased GiB | "
          "total GiB | kernel calls |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    sharding = jax.sharding.NamedSharding(aot.mesh(args.target), jax.sharding.PartitionSpec())
    for variant in args.variants.split(","):
        for warps in args.warps.split(","):
            implementation = None if warps == "xla" else KERNEL_IMPLEMENTATION[platform]
            config = load_python_config(args.config)
            config.train.update(batch_size=args.batch, perceptual_weights="random",
                                **cost.parse_variant(variant))
            config.model.warp_implementation = implementation

            def lower_and_compile():
                lowered = step.lower_train_step(config, args.batch, sharding=sharding)
                options = {"xla_gpu_enable_triton_gemm": False} if args.cublas_gemm else None
                return lowered, lowered.compile(compiler_options=options)
            start = time.perf_counter()
            row = dict(target=args.target, config=args.config, batch=args.batch,
                       variant=variant, warps=implementation or "xla")
            try:
                with aot.lowering_for(args.target):
                    lowered, compiled = lower_and_compile()
                row.update(ok=True, seconds=round(time.perf_counter() - start),
                           memory=aot.memory(compiled),
                           custom_calls=lowered.as_text().count(CUSTOM_CALL[platform]))
                m = row["memory"]
                print(f"| {variant} | {row['warps']} | yes | {row['seconds']} | "
                      + " | ".join(f"{m[k] / GIB:.3f}" for k in
                                   ("arguments", "outputs", "temporaries", "aliased", "total"))
                      + f" | {row['custom_calls']} |", flush=True)
            except Exception as error:
                row.update(ok=False, seconds=round(time.perf_counter() - start),
                           error=f"{type(error).__name__}: {str(error).splitlines()[0][:400]}")
                print(f"| {variant} | {row['warps']} | NO | {row['seconds']} | "
                      f"{row['error'][:200]} |", flush=True)
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("kernels", "train"))
    parser.add_argument("--target", required=True, choices=sorted(aot.TARGETS))
    parser.add_argument("--xla", action="store_true", help="kernels: the reference warp too")
    parser.add_argument("--cases", type=lambda text: text.split(","), default=None,
                        help="kernels: only cases whose name has one of these (comma list)")
    parser.add_argument("--config", default="configs/train.py:small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default="float32,bfloat16")
    parser.add_argument("--warps", default="xla,kernel", help="train: xla and/or kernel")
    parser.add_argument("--cublas-gemm", action="store_true",
                        help="train on h100: GEMMs by cuBLAS, not Triton (deviceless XLA:GPU "
                             "cannot tile the small config's tiny GEMMs)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    reason = aot.missing_extra(args.target)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    rows = {"kernels": kernels, "train": train}[args.what](args)
    if args.json:
        outputs.write_json(args.json, {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
                       "target": args.target, "what": args.what, "rows": rows}, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
