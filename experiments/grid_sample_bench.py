"""Grid-sample benchmark: each implementation of the warp op on the model's real shapes.

Forward and forward+backward of xla, the Pallas backend of this platform (pallas_triton on a
GPU) and torch F.grid_sample, with effective GB/s and % of a device-to-device copy measured
in the same run (see kernels/grid_sample/bench.py). Prints a table and writes JSON.

  python experiments/grid_sample_bench.py                       # every case (on a GPU)
  python experiments/grid_sample_bench.py --cases gen-64,deformed --max-batch 2 --repeats 3
"""

import argparse
import datetime
import platform

import jax

from safetriage_jax import outputs
from safetriage_jax.kernels.grid_sample import bench, specs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="",
                        help="comma-separated substrings of case names (default: all)")
    parser.add_argument("--implementations", default="",
                        help="comma-separated names (default: xla and this platform's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="cap the image batch (small runs on a CPU)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch baseline")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    wanted = [part for part in args.cases.split(",") if part]
    cases = [c for c in specs.BENCH_CASES if not wanted or any(w in str(c) for w in wanted)]
    if not cases:
        parser.error(f"no bench case matches {args.cases!r}; names: "
                     f"{', '.join(c.name for c in specs.BENCH_CASES)}")
    if args.max_batch:
        cases = bench.limit_batch(cases, args.max_batch)
    implementations = [name for name in args.implementations.split(",") if name] or None

    rows = bench.run(cases, implementations, repeats=args.repeats,
                     with_torch=not args.no_torch)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"copy {rows[0]['copy_gbps']:.1f} GB/s")
    print(bench.format_table(rows))
    if args.json:
        outputs.write_json(args.json, {"device": device.device_kind, "platform": jax.default_backend(),
                       "host": platform.node(), "jax": jax.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "rows": rows}, overwrite=True)


if __name__ == "__main__":
    main()
