"""Pallas Mosaic TPU backend of the grid-sample op: forward kernel and its custom VJP.

Images of 128 channels or more take the pixel-major path (this module's ``forward`` and
``pallas_mosaic_tpu_vjp``): each grid step owns one 2-D output tile of one image (the T output
planes of image b are one stacked T * Ho x Wo plane, so T x B batches need no copies of the
image) and loops over the windows the pre-pass found for its tile
(``pallas_mosaic_tpu_common``): DMA the window HBM -> VMEM, build the one-hot interpolation
matrix M, accumulate ``M @ window`` in float32 on the MXU, (P, C) with C on the lanes. Images of
fewer than 128 channels take the planar path instead (``pallas_mosaic_tpu_planar``:
channel-major image and output, separable weights). Gradients are taken in pixel coordinates;
XLA autodiff chains them through the padding rules (``reference.source_coordinates``), so they
match the reference.

bfloat16 images are DMA'd as bfloat16 and widened in VMEM: weights and accumulation stay
float32, as the reference's. Proven in TPU interpret mode and by lowering for TPU v5e/v6e
from a CPU; unmeasured on a TPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from safetriage_jax.kernels.grid_sample import config as tile_config
from safetriage_jax.kernels.grid_sample import pallas_mosaic_tpu_planar as planar
from safetriage_jax.kernels.grid_sample import pallas_mosaic_tpu_vjp as vjp
from safetriage_jax.kernels.grid_sample.pallas_mosaic_tpu_common import (
    NUM_TAPS, contract, flat_read_image, from_blocks, interpolation_matrix_t, interpret_params,
    load_window, make_geometry, make_plan, num_windows_of, pixel_values_spec, to_blocks,
    window_origin)
from safetriage_jax.kernels.grid_sample.platforms import kernel_or_interpreter
from safetriage_jax.kernels.grid_sample.reference import source_coordinates

PLATFORM = "tpu"
DTYPES = (jnp.float32, jnp.bfloat16)
VMEM_BUDGET_BYTES = 16 * 2**20  # v5e's default scoped VMEM; the kernels' working sets stay under
MAX_INDEX = 2**31 - 1           # flat pixel indices are int32
SUBLANES = 8                    # a (4, P) or (2, P) block occupies whole 8-sublane vregs


def _forward_kernel(reads_ref, row_ref, col_ref, weight_ref, image_hbm, out_ref,
                    window_vmem, semaphore, *, geometry):
    b, j = pl.program_id(0), pl.program_id(1)

    def add_window(i, acc_PC):
        top, left = window_origin(reads_ref, b, j, i, geometry)
        load_window(image_hbm, b, top, left, window_vmem, semaphore, geometry)
        matrix_t_WP = interpolation_matrix_t(row_ref[0], col_ref[0], weight_ref[0], top, left,
                                             geometry)
        return acc_PC + contract(matrix_t_WP, window_vmem[...], 0, 0)  # M @ window

    acc = jnp.zeros(out_ref.shape[1:], jnp.float32)
    acc = jax.lax.fori_loop(0, num_windows_of(reads_ref, b, j), add_window, acc)
    out_ref[0] = acc.astype(out_ref.dtype)


def forward(image_BPC, plan, geometry, interpret):
    """(B, padded pixels, C) samples at the plan's taps, tile-major (``from_blocks`` undoes
    it); ``image_BPC`` from ``flat_read_image``."""
    g = geometry
    batch = image_BPC.shape[0]
    tap_spec = pl.BlockSpec((1, NUM_TAPS, g.block_pixels), lambda b, j, *_: (b, 0, j))
    make_call = lambda interpret_flag: pl.pallas_call(
        functools.partial(_forward_kernel, geometry=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, g.num_blocks),
            in_specs=[tap_spec, tap_spec, tap_spec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pixel_values_spec(g, lambda b, j, *_: (b, j)),
            scratch_shapes=[pltpu.VMEM((g.window_pixels, g.channels), image_BPC.dtype),
                            pltpu.SemaphoreType.DMA(())],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, g.padded_pixels, g.channels), image_BPC.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params(interpret_flag))
    return kernel_or_interpreter(make_call, (PLATFORM,), interpret, plan.reads_4BJ,
                                 plan.row_B4Q, plan.col_B4Q, plan.weight_B4Q, image_BPC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def sample_pixels(image_BHWC, ix_BQ, iy_BQ, geometry, interpret):
    """(B, Q, C) bilinear samples at pixel coordinates (already through the padding rules)."""
    g = geometry
    if g.planar:
        g = planar.forward_geometry(g)
        out_BCRW = planar.forward(planar.planar_image(image_BHWC, g),
                                  planar.make_plan(ix_BQ, iy_BQ, g), g, interpret)
        out_BRWC = out_BCRW[:, :, :g.out_rows, :g.out_cols].transpose(0, 2, 3, 1)
        return out_BRWC.reshape(ix_BQ.shape + (g.channels,))
    out = forward(flat_read_image(image_BHWC, g), make_plan(ix_BQ, iy_BQ, g), g, interpret)
    return from_blocks(out, g).reshape(ix_BQ.shape + (g.channels,))


def _sample_pixels_fwd(image_BHWC, ix_BQ, iy_BQ, geometry, interpret):
    return sample_pixels(image_BHWC, ix_BQ, iy_BQ, geometry, interpret), (image_BHWC, ix_BQ, iy_BQ)


def _sample_pixels_bwd(geometry, interpret, residuals, cotangent_BQC):
    image_BHWC, ix_BQ, iy_BQ = residuals
    g = geometry
    batch, height, width, channels = image_BHWC.shape
    if g.planar:  # the forward's tiles; the cotangent read in place, channel-major
        g = planar.forward_geometry(g)
        plan = planar.make_plan(ix_BQ, iy_BQ, g)
        cotangent = planar.cotangent_layout(cotangent_BQC, g)
        d_image_BCHW = planar.d_image(cotangent, plan, g, interpret)[:, :, :height, :width]
        d_image_BHWC = d_image_BCHW.transpose(0, 2, 3, 1)
        d_xy_B2Q = planar.d_coordinates(planar.planar_image(image_BHWC, g), cotangent, plan, g,
                                        interpret)
        d_x_BQ, d_y_BQ = d_xy_B2Q[:, 0], d_xy_B2Q[:, 1]
    else:
        cotangent_BPC = to_blocks(
            cotangent_BQC.reshape(batch, g.out_rows, g.out_cols, channels), g)
        plan = make_plan(ix_BQ, iy_BQ, g)
        d_image_BHWC = vjp.d_image(cotangent_BPC, plan, g, interpret)[:, :height, :width]
        d_x_BQ, d_y_BQ = vjp.d_coordinates(flat_read_image(image_BHWC, g), cotangent_BPC, plan,
                                           g, interpret)
    return (d_image_BHWC.astype(image_BHWC.dtype),
            from_blocks(d_x_BQ, g).reshape(ix_BQ.shape),
            from_blocks(d_y_BQ, g).reshape(iy_BQ.shape))


sample_pixels.defvjp(_sample_pixels_fwd, _sample_pixels_bwd)


def check_supported(image_BHWC, geometry):
    """Raises NotImplementedError for cases these kernels do not take (dtype, sizes)."""
    if image_BHWC.dtype not in DTYPES:
        raise NotImplementedError(f"pallas_mosaic_tpu takes float32 or bfloat16 images, "
                                  f"not {image_BHWC.dtype}.")
    g = geometry
    largest = max(g.read_source_pixels, g.padded_source_pixels, g.padded_pixels)
    if largest * max(g.channels, NUM_TAPS) > MAX_INDEX:
        raise NotImplementedError("pallas_mosaic_tpu: the image or grid has more than 2^31 "
                                  "elements per batch row; its indices are int32.")
    # The largest step's VMEM (d_coordinates: two matrices, taps, window, accumulators; the
    # d_image step's output window block is counted with the window), float32 upper bounds.
    if g.planar:  # separable matrices, (C, rows, cols) windows, (C, rows, P)
        matrices = 2 * g.block_pixels * (g.window_rows + g.window_cols) * 4
        taps = 2 * 3 * SUBLANES * g.block_pixels * 4  # (2, P) coordinate blocks
        windows = 4 * g.channels * g.window_pixels * 4
        pixel_blocks = (4 * max(g.channels, SUBLANES) + 3 * g.channels * g.window_rows) \
            * g.block_pixels * 4
    else:  # pixel-major: one-hot (window pixels, P) matrices, (pixels, C >= 128) blocks
        matrices = 2 * g.block_pixels * g.window_pixels * 4
        taps = 2 * 5 * SUBLANES * g.block_pixels * 4  # (4, P) blocks fill 8 sublanes
        windows = 3 * g.window_pixels * g.channels * 4
        pixel_blocks = 4 * g.block_pixels * g.channels * 4
    if matrices + taps + windows + pixel_blocks > VMEM_BUDGET_BYTES:
        raise NotImplementedError(
            f"pallas_mosaic_tpu: {g.window_rows} x {g.window_cols}-pixel windows of "
            f"{g.channels} channels and {g.block_rows} x {g.block_cols}-pixel tiles need more "
            f"than {VMEM_BUDGET_BYTES >> 20} MiB of VMEM; use a smaller MosaicTpuConfig.")


def grid_sample(image_BHWC, grid_NHW2, *, padding_mode="zeros", align_corners=True,
                interpret=None, config=None):
    """The op (see ``reference``) on TPU; ``config`` is a ``MosaicTpuConfig`` (tile sizes).

    ``interpret=None`` compiles the kernels where the program is lowered for a TPU and
    interprets them elsewhere (``platforms``), whatever the host's default backend.
    """
    config = tile_config.MOSAIC_TPU if config is None else config
    batch, height, width, channels = image_BHWC.shape
    num_grids, out_h, out_w, _ = grid_NHW2.shape
    num_pixels = num_grids // batch * out_h * out_w
    geometry = make_geometry(height, width, channels, num_grids // batch * out_h, out_w, config)
    check_supported(image_BHWC, geometry)
    # Grid rows b*T .. b*T + T-1 all read image b: one run of T * Ho * Wo pixels per image.
    grid_BQ2 = grid_NHW2.astype(jnp.float32).reshape(batch, num_pixels, 2)
    ix_BQ = source_coordinates(grid_BQ2[..., 0], width, padding_mode, align_corners)
    iy_BQ = source_coordinates(grid_BQ2[..., 1], height, padding_mode, align_corners)
    out_BQC = sample_pixels(image_BHWC, ix_BQ, iy_BQ, geometry,
                            None if interpret is None else bool(interpret))
    return out_BQC.reshape(num_grids, out_h, out_w, channels)
