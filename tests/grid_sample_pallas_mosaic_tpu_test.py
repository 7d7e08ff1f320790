"""The Pallas Mosaic TPU warp kernels: TPU interpret mode against the reference, lowering for
TPU v5e and v6e from this CPU machine, and the whole model against its xla warps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from conftest import TINY
from safetriage_jax.kernels.grid_sample import api, config, grid_sample, pallas_mosaic_tpu, specs
from safetriage_jax.kernels.grid_sample import pallas_mosaic_tpu_planar as planar
from safetriage_jax.kernels.grid_sample.pallas_mosaic_tpu_common import make_geometry, make_plan
from safetriage_jax.kernels.grid_sample.reference import source_coordinates
from safetriage_jax.kernels.grid_sample.specs import Case
from safetriage_jax.kernels.grid_sample.test_base import GridSampleTestBase, relative_error
from safetriage_jax.models.policy import Policy
from safetriage_jax.models.tpsmm import TPSMM

# Tiles far smaller than the defaults, so the tiny cases below span several output tiles and
# several windows per tile in both directions: the window loop, the per-tile window ranges and
# the d_image windows are all exercised. Planar windows (C < 128) are at their smallest legal
# rows (16) only where the image is; 32 x 256 so that 40 x 300 images need clamped windows.
SMALL_TILES = config.MosaicTpuConfig(block_rows=8, block_cols=16, window_rows=4, window_cols=16,
                                     planar_window_rows=32, planar_window_cols=256)

# Every padding mode and alignment once, across both dtypes, C = 3 and 128, random, smooth
# (TPS-like) and on-border flows; all with T x B grid batches. Interpret mode compiles each
# case for seconds, so the properties share cases instead of multiplying them.
CASES = (
    Case(2, 2, 9, 37, 3, 7, 11, padding_mode="zeros", align_corners=True),
    Case(1, 2, 12, 20, 128, 12, 16, dtype="bfloat16", padding_mode="zeros",
         align_corners=False, flow="smooth"),
    Case(2, 2, 9, 37, 3, 7, 11, dtype="bfloat16", padding_mode="border", align_corners=True),
    Case(1, 3, 6, 7, 3, 6, 7, padding_mode="border", align_corners=False, flow="borders"),
    Case(1, 2, 12, 20, 128, 12, 16, padding_mode="reflection", align_corners=True,
         flow="smooth"),
    Case(2, 2, 9, 37, 3, 7, 11, padding_mode="reflection", align_corners=False),
    Case(1, 2, 9, 20, 128, 6, 8, dtype="bfloat16", padding_mode="zeros"),
    # Planar path (C < 128) on images wider and taller than one window (clamped, overlapping
    # windows), C = 1, 3, 4, both dtypes.
    Case(1, 2, 40, 300, 3, 8, 24, padding_mode="border", align_corners=True),
    Case(2, 1, 40, 300, 1, 9, 20, padding_mode="zeros", align_corners=False),
    Case(1, 1, 40, 300, 4, 8, 16, dtype="bfloat16", padding_mode="reflection",
         align_corners=False),
    Case(1, 2, 40, 300, 3, 16, 16, dtype="bfloat16", padding_mode="zeros", flow="smooth"),
)


class TestMosaicTpuInterpret(GridSampleTestBase):
    IMPLEMENTATION = "pallas_mosaic_tpu"
    CASES = CASES

    def backend(self, case):
        return functools.partial(pallas_mosaic_tpu.grid_sample, padding_mode=case.padding_mode,
                                 align_corners=case.align_corners, interpret=self.INTERPRET,
                                 config=SMALL_TILES)


@pytest.mark.parametrize("index,planar_path", [(6, False), (8, True)])
def test_random_flows_make_tiles_loop_over_several_windows(rng, index, planar_path):
    """The cases above really take the multi-window paths (else the loops are untested): the
    pixel-major path (C >= 128) and the planar one (C < 128, clamped windows)."""
    case = CASES[index]
    _, grid, _ = specs.make_inputs(case, rng)
    geometry = make_geometry(case.height, case.width, case.channels,
                             case.repeats * case.out_h, case.out_w, SMALL_TILES)
    assert geometry.planar == planar_path
    if planar_path:
        geometry = planar.forward_geometry(geometry)
    plan_of = planar.make_plan if planar_path else make_plan

    @jax.jit
    def window_ranges(grid_BQ2):
        ix = source_coordinates(grid_BQ2[..., 0], case.width, case.padding_mode, True)
        iy = source_coordinates(grid_BQ2[..., 1], case.height, case.padding_mode, True)
        plan = plan_of(ix, iy, geometry)
        return plan.reads_4BJ, plan.owned_4BJ  # the forward's windows, d_image's

    assert geometry.window_grid == ((2, 2) if planar_path else (3, 2))
    for _, rows, _, cols in window_ranges(jnp.asarray(grid).reshape(case.batch, -1, 2)):
        assert int((rows * cols).max()) == geometry.num_windows  # a tile needs every window


def test_unsupported_dtypes_decline_and_the_op_falls_through_to_xla():
    image = jnp.arange(48, dtype=jnp.float16).reshape(1, 4, 4, 3)
    grid = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(NotImplementedError, match="float32 or bfloat16"):
        pallas_mosaic_tpu.grid_sample(image, grid)
    out = grid_sample(image, grid, implementation="pallas_mosaic_tpu")
    assert out.dtype == jnp.float16
    np.testing.assert_array_equal(out, grid_sample(image, grid, implementation="xla"))


# --- Lowering for TPU from this CPU machine ---------------------------------------------------

def _lowered_text(device_kind, function, *args):
    """StableHLO of ``jax.jit(function)`` lowered for a TPU of ``device_kind``.

    Lowering consults chip facts, so it needs an (abstract) TPU device: a one-device abstract
    mesh supplies one without any TPU attached. This proves Pallas -> Mosaic; libtpu's own
    passes (layouts, VMEM allocation) run only when compiling on a TPU.
    """
    device = AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(function).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])  # v5e, v6e
@pytest.mark.parametrize("channels,dtype", [(3, jnp.float32), (128, jnp.bfloat16)])
def test_forward_and_gradient_lower_to_mosaic_for_tpu(device_kind, channels, dtype):
    sample = functools.partial(pallas_mosaic_tpu.grid_sample, padding_mode="reflection",
                               align_corners=False, interpret=False)

    def loss(image, grid):
        return jnp.sum(sample(image, grid).astype(jnp.float32) ** 2)

    image = jax.ShapeDtypeStruct((2, 32, 32, channels), dtype)
    grid = jax.ShapeDtypeStruct((4, 32, 32, 2), jnp.float32)  # T x B = 2 x 2
    forward = _lowered_text(device_kind, sample, image, grid)
    backward = _lowered_text(device_kind, jax.grad(loss, argnums=(0, 1)), image, grid)
    assert forward.count("tpu_custom_call") == 1
    assert backward.count("tpu_custom_call") == 3  # forward, d_image, d (coordinates)


def test_interpret_none_compiles_the_kernel_for_tpu_and_interprets_on_cpu(rng):
    """interpret=None is decided by the lowering platform, not the host's default backend: the
    same jitted function lowers to Mosaic calls for a TPU and runs interpreted on this CPU."""
    sample = functools.partial(pallas_mosaic_tpu.grid_sample, interpret=None)
    loss = lambda image, grid: jnp.sum(sample(image, grid) ** 2)
    image = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
    grid = jax.ShapeDtypeStruct((1, 16, 16, 2), jnp.float32)
    backward = _lowered_text("TPU v5 lite", jax.grad(loss, argnums=(0, 1)), image, grid)
    assert backward.count("tpu_custom_call") == 3
    image_v = jnp.asarray(rng.standard_normal(image.shape), jnp.float32)
    grid_v = jnp.asarray(rng.uniform(-1, 1, grid.shape), jnp.float32)
    assert "tpu_custom_call" not in jax.jit(sample).lower(image_v, grid_v).as_text()
    want = api.grid_sample(image_v, grid_v, implementation="xla")
    assert relative_error(jax.jit(sample)(image_v, grid_v), want) < 1e-5


# --- The whole model --------------------------------------------------------------------------

def test_tpsmm_with_tpu_warps_equals_xla_warps(rng, tiny_variables):
    """The tiny TPSMM's outputs are the same with either warp backend (default tiles).

    Every warp of the forward is covered: dense motion (T = K + 1 grids over one source, then
    its hourglass and masks), the generator's feature-map warps and the deformed source.
    Gradients are compared op by op in the interpret tests above.
    """
    size = TINY.image_size
    source = jnp.asarray(rng.uniform(size=(1, size, size, 3)), jnp.float32)
    driving = jnp.asarray(rng.uniform(size=(1, size, size, 3)), jnp.float32)

    def outputs(implementation):
        """(Pallas kernels, gathers) in the forward's jaxpr, and its outputs. Each kernel is
        one kernel_or_interpreter equation (holding the kernel and its interpreter)."""
        model = TPSMM(TINY, Policy(warp_implementation=implementation))
        traced = jax.jit(model.apply).trace(tiny_variables, source, driving)
        jaxpr = str(traced.jaxpr)
        counts = jaxpr.count("kernel_or_interpreter["), jaxpr.count("= gather")
        return counts, traced.lower().compile()(tiny_variables, source, driving)

    (xla_counts, want), (tpu_counts, got) = outputs("xla"), outputs("pallas_mosaic_tpu")
    # Every warp ran the TPU kernel, none fell through to xla: each reference warp is four
    # gathers, and exactly those are gone, one kernel for each.
    assert xla_counts[0] == 0 and tpu_counts[0] > 0
    assert xla_counts[1] - tpu_counts[1] == 4 * tpu_counts[0]
    for key in ("deformed_source", "deformation", "occlusion_map"):
        for actual, expected in zip(jax.tree.leaves(got["dense_motion"][key]),
                                    jax.tree.leaves(want["dense_motion"][key]), strict=True):
            assert relative_error(actual, expected) < 1e-5, key
    for key in ("warped_encoder_maps", "deformed", "prediction"):
        for actual, expected in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want[key]),
                                    strict=True):
            assert relative_error(actual, expected) < 1e-5, key
