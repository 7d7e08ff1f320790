"""Windows per output tile that the TPU warp kernels' pre-pass plans on the model's warp shapes.

Runs the XLA pre-pass of ``pallas_mosaic_tpu`` (no kernel, any device) on the bench cases'
smooth flows (``specs.BENCH_CASES``, image batch capped at 2) with the default tile config,
for the path each case takes: pixel-major (C >= 128; ``make_plan``, 16 x 16 tiles, 32 x 32
windows, each window one (tile pixels x window pixels x C) matmul per tile) or planar (C < 128;
``pallas_mosaic_tpu_planar.make_plan``, 8-row tiles, (C, 32, 256|128) windows, each window
per output row one (C * window rows x window cols x P) matmul). Prints a table and writes JSON.

  python experiments/grid_sample_tpu_windows.py --out tpu_windows.json
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax import outputs
from safetriage_jax.kernels.grid_sample import config, specs
from safetriage_jax.kernels.grid_sample import pallas_mosaic_tpu_planar as planar
from safetriage_jax.kernels.grid_sample.pallas_mosaic_tpu_common import make_geometry, make_plan
from safetriage_jax.kernels.grid_sample.reference import source_coordinates


def windows_per_tile(case, rng, tiles):
    """(forward windows, d_image windows) per tile, each an array over (B, tiles), on the path
    the case takes."""
    geometry = make_geometry(case.height, case.width, case.channels, case.repeats * case.out_h,
                             case.out_w, tiles)
    if geometry.planar:
        geometry = planar.forward_geometry(geometry)
    plan_of = planar.make_plan if geometry.planar else make_plan

    @jax.jit
    def counts(grid_BQ2):
        ix = source_coordinates(grid_BQ2[..., 0], case.width, case.padding_mode,
                                case.align_corners)
        iy = source_coordinates(grid_BQ2[..., 1], case.height, case.padding_mode,
                                case.align_corners)
        plan = plan_of(ix, iy, geometry)
        return tuple(ranges[1] * ranges[3] for ranges in (plan.reads_4BJ, plan.owned_4BJ))

    grid = specs.make_grid(case, rng)
    return geometry, [np.asarray(c) for c in counts(jnp.asarray(grid).reshape(case.batch, -1, 2))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    tiles = config.MOSAIC_TPU
    rows = []
    print(f"pixel-major: tiles {tiles.block_rows}x{tiles.block_cols}, windows "
          f"{tiles.window_rows}x{tiles.window_cols}; planar: windows at most "
          f"{tiles.planar_window_rows}x{tiles.planar_window_cols}")
    print("| case | path | tile, window (rows x cols) | tiles x windows per image "
          "| forward/d_grid windows per tile: mean (max) "
          "| d_image windows per tile: mean (max) |")
    print("|---|---|---|---|---|---|")
    for case in specs.BENCH_CASES:
        case = dataclasses.replace(case, batch=min(case.batch, 2))
        geometry, (reads, owned) = windows_per_tile(case, rng, tiles)
        path = "planar" if geometry.planar else "pixel-major"
        shape = (f"{geometry.block_rows}x{geometry.block_cols}, "
                 f"{geometry.window_rows}x{geometry.window_cols}")
        rows.append(dict(case=str(case), path=path, tile_window=shape, tiles=geometry.num_blocks,
                         windows=geometry.num_windows, forward_mean=float(reads.mean()),
                         forward_max=int(reads.max()), d_image_mean=float(owned.mean()),
                         d_image_max=int(owned.max())))
        print(f"| {case.name} | {path} | {shape} | {geometry.num_blocks} x {geometry.num_windows} "
              f"| {reads.mean():.2f} ({reads.max()}) | {owned.mean():.2f} ({owned.max()}) |")
    if args.out:
        outputs.write_json(args.out, dict(config=dataclasses.asdict(tiles), seed=args.seed, rows=rows),
                           overwrite=True)


if __name__ == "__main__":
    main()
