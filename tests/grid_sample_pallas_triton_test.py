"""The Pallas Triton backend: interpret-mode values and gradients against the reference, the
interpret-mode atomic-add fix, int32 refusal, CUDA lowering, the model on it (training-loss
gradient, every parity output) and the benchmark library."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from conftest import TINY
from safetriage_jax.kernels.grid_sample import api, interpret_atomic, pallas_triton, specs
from safetriage_jax.kernels.grid_sample.test_base import GridSampleTestBase, relative_error
from safetriage_jax.models.policy import Policy
from safetriage_jax.models.tpsmm import TPSMM


# Interpret mode compiles three kernels per case: of the on-border cases (the only C = 2,
# T = 3 ones), keep one per padding mode, alternating align_corners; the random cases cover
# every padding mode x alignment.
_BORDERS_KEPT = {("zeros", False), ("border", True), ("reflection", False)}


class TestPallasTriton(GridSampleTestBase):
    IMPLEMENTATION = "pallas_triton"
    CASES = [case for case in specs.TEST_CASES
             if case.flow != "borders" or case.channels != 2
             or (case.padding_mode, case.align_corners) in _BORDERS_KEPT]


def _atomic_add_in_interpret_mode(index, values, mask=None, scoped=True, use_jit=True):
    """out = zeros; out[index[i]] += values[i] (where mask[i]) by one interpreted atomic_add,
    under ``interpret_atomic.scatter_add_scope`` or (``scoped=False``) JAX's own rule."""
    def kernel(index_ref, values_ref, zeros_ref, out_ref):
        del zeros_ref
        plgpu.atomic_add(out_ref, index_ref[...], values_ref[...],
                         mask=None if mask is None else index_ref[...] >= 0)

    index = jnp.asarray(index if mask is None else np.where(mask, index, -1), jnp.int32)
    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((4,), jnp.float32),
                          input_output_aliases={2: 0}, interpret=True)
    call = interpret_atomic.scatter_add_scope(call) if scoped else call
    call = jax.jit(call) if use_jit else call
    return np.asarray(call(index, jnp.asarray(values), jnp.zeros((4,), jnp.float32)))


def test_interpret_mode_atomic_add_is_fixed_only_inside_its_scope():
    """JAX's discharge rule drops duplicate-index adds and refuses masks (the bug the d_image
    kernel works around); inside ``scatter_add_scope`` every lane adds, jitted, eager and
    vmapped, and the process-wide rule is JAX's own before, between and after."""
    from jax._src.state import discharge
    upstream = discharge._discharge_rules[interpret_atomic.ATOMIC_RMW]
    index = np.array([0, 2, 0, 0, 3, 2, 1, 0])
    values = np.arange(1, 9, dtype=np.float32)
    mask = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
    want = np.zeros(4, np.float32)
    np.add.at(want, index, values)
    want_masked = np.zeros(4, np.float32)
    np.add.at(want_masked, index[mask], values[mask])

    np.testing.assert_allclose(_atomic_add_in_interpret_mode(index, values), want)
    np.testing.assert_allclose(_atomic_add_in_interpret_mode(index, values, mask), want_masked)
    np.testing.assert_allclose(_atomic_add_in_interpret_mode(index, values, use_jit=False), want)
    assert discharge._discharge_rules[interpret_atomic.ATOMIC_RMW] is upstream

    assert not np.allclose(_atomic_add_in_interpret_mode(index, values, scoped=False), want)
    with pytest.raises(NotImplementedError):
        _atomic_add_in_interpret_mode(index, values, mask, scoped=False)


def test_interpret_mode_d_image_adds_every_tap_under_vmap(rng):
    """The scoped rule holds inside vmap too (its batching rule re-wraps the batched call)."""
    case = specs.Case(1, 1, 5, 6, 3, 4, 4)
    images = jnp.asarray(rng.standard_normal((2,) + case.image_shape), jnp.float32)
    grids = jnp.asarray(rng.uniform(-1, 1, (2,) + case.grid_shape), jnp.float32)

    def image_gradient(implementation, image, grid):
        loss = lambda i: jnp.sum(api.grid_sample(i, grid, implementation=implementation,
                                                 interpret=True) ** 2)
        return jax.grad(loss)(image)

    got = jax.vmap(functools.partial(image_gradient, "pallas_triton"))(images, grids)
    want = jax.vmap(functools.partial(image_gradient, "xla"))(images, grids)
    assert relative_error(got, want) < 1e-5


def test_int32_offset_overflow_is_refused_and_falls_through_to_xla():
    image = jax.ShapeDtypeStruct((2, 16384, 32768, 4), jnp.bfloat16)  # 2^32 elements
    grid = jax.ShapeDtypeStruct((2, 8, 8, 2), jnp.float32)
    with pytest.raises(NotImplementedError, match="int32"):
        jax.eval_shape(functools.partial(pallas_triton.grid_sample, interpret=False), image, grid)
    out = jax.eval_shape(functools.partial(api.grid_sample, implementation="pallas_triton"),
                         image, grid)
    assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.bfloat16


def _lower_for_cuda(f, *args):
    """StableHLO text of ``jax.jit(f)`` lowered for CUDA on this (GPU-less) machine.

    jax >= 0.11 reads the GPU's compute capability while lowering a Triton call and, with no
    GPU present, needs it from an abstract device: an abstract mesh holding an abstract H100.
    jax 0.10 accepts the same mesh but ignores it (it falls back to sm_90 without a GPU), so
    one code path serves both versions.
    """
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                         platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _triton_calls(stablehlo):
    """{kernel name: SSA result} of the Triton custom calls in a StableHLO module."""
    pattern = r'(%\S+) = stablehlo\.custom_call @__gpu\$xla\.gpu\.triton\(.*?\bname = "(\w+)"'
    return {name: result for result, name in re.findall(pattern, stablehlo)}


def _sampler(padding_mode="reflection"):
    return functools.partial(pallas_triton.grid_sample, padding_mode=padding_mode,
                             align_corners=False, interpret=False)


@pytest.mark.parametrize("channels,dtype", [(3, jnp.bfloat16), (130, jnp.float32)])
def test_forward_and_gradient_lower_to_triton_calls_for_cuda(channels, dtype):
    image = jax.ShapeDtypeStruct((2, 9, 13, channels), dtype)
    grid = jax.ShapeDtypeStruct((6, 7, 11, 2), jnp.float32)  # T = 3 grids per image
    sample = _sampler()

    def loss(image_BHWC, grid_NHW2):
        return jnp.sum(sample(image_BHWC, grid_NHW2).astype(jnp.float32) ** 2)

    assert set(_triton_calls(_lower_for_cuda(sample, image, grid))) == {"grid_sample_forward"}
    lowered = _lower_for_cuda(jax.grad(loss, argnums=(0, 1)), image, grid)
    assert set(_triton_calls(lowered)) == {"grid_sample_forward", "grid_sample_d_grid",
                                           "grid_sample_d_image"}
    assert "has_side_effect" not in lowered


def test_interpret_none_compiles_the_kernel_for_cuda_and_interprets_on_cpu(rng):
    """interpret=None is decided by the lowering platform, not the host's default backend: the
    same jitted function lowers to Triton calls for CUDA and runs interpreted on this CPU."""
    image = jax.ShapeDtypeStruct((1, 9, 13, 3), jnp.float32)
    grid = jax.ShapeDtypeStruct((1, 7, 11, 2), jnp.float32)
    sample = functools.partial(pallas_triton.grid_sample, interpret=None)
    loss = lambda i, g: jnp.sum(sample(i, g) ** 2)
    lowered = _lower_for_cuda(jax.grad(loss, argnums=(0, 1)), image, grid)
    assert set(_triton_calls(lowered)) == {"grid_sample_forward", "grid_sample_d_grid",
                                           "grid_sample_d_image"}
    image_v = jnp.asarray(rng.standard_normal(image.shape), jnp.float32)
    grid_v = jnp.asarray(rng.uniform(-1, 1, grid.shape), jnp.float32)
    on_cpu = jax.jit(sample).lower(image_v, grid_v).as_text()
    assert "xla.gpu.triton" not in on_cpu
    want = api.grid_sample(image_v, grid_v, implementation="xla")
    assert relative_error(jax.jit(sample)(image_v, grid_v), want) < 1e-6


def test_d_image_call_is_dead_code_when_the_image_needs_no_gradient():
    """Under stop_gradient the d_image kernel's result is unused and the call has no side
    effects, so XLA's dead-code elimination drops it (a separate call from d_grid)."""
    image = jax.ShapeDtypeStruct((2, 9, 13, 3), jnp.float32)
    grid = jax.ShapeDtypeStruct((2, 7, 11, 2), jnp.float32)
    sample = _sampler("zeros")

    def loss(image_BHWC, grid_NHW2):
        return jnp.sum(sample(jax.lax.stop_gradient(image_BHWC), grid_NHW2) ** 2)

    lowered = _lower_for_cuda(jax.grad(loss, argnums=1), image, grid)
    calls = _triton_calls(lowered)
    uses = {name: len(re.findall(re.escape(result) + r"(?![\w#])", lowered)) - 1
            for name, result in calls.items()}
    assert uses["grid_sample_d_image"] == 0 and uses["grid_sample_d_grid"] > 0
    assert "has_side_effect" not in lowered


def test_training_loss_gradient_on_pallas_triton_equals_xla(rng, tiny_variables):
    """The reconstruction loss of the training forward and its gradient for the two networks
    that warp (dense motion, generator) agree between the warp backends, on the TINY config
    (in interpret mode the fixture's 256 x 256 model is too slow to differentiate in CI; its
    outputs are checked below). Keypoints and background motion are fixed inputs."""
    source = jnp.asarray(rng.uniform(size=(2, TINY.image_size, TINY.image_size, 3)), jnp.float32)
    driving = jnp.asarray(rng.uniform(size=source.shape), jnp.float32)
    params = tiny_variables["params"]
    warping_params = {name: params[name] for name in ("dense_motion_network",
                                                      "inpainting_network")}
    plain = TPSMM(TINY)
    kp_source = plain.apply(tiny_variables, source, method=TPSMM.keypoints)
    kp_driving = plain.apply(tiny_variables, driving, method=TPSMM.keypoints)
    bg_param = plain.apply(tiny_variables, source, driving, method=TPSMM.background)

    def loss_outputs_and_grads(implementation):
        model = TPSMM(TINY, Policy(warp_implementation=implementation))

        def loss(warping_params):
            variables = {**tiny_variables, "params": {**params, **warping_params}}
            motion = model.apply(variables, source, kp_driving, kp_source, bg_param,
                                 method=TPSMM.dense_motion)
            features = model.apply(variables, source, method=TPSMM.encode_source)
            out = model.apply(variables, features, source, motion, method=TPSMM.decode)
            return jnp.abs(out["prediction"] - driving).mean(), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(warping_params)

    (want_loss, want), want_grads = loss_outputs_and_grads("xla")
    (got_loss, got), got_grads = loss_outputs_and_grads("pallas_triton")
    assert abs(float(got_loss) - float(want_loss)) < 1e-5 * float(want_loss)
    for name in ("prediction", "deformed"):
        assert relative_error(got[name], want[name]) < 1e-5, name
    for got_map, want_map in zip(got["warped_encoder_maps"], want["warped_encoder_maps"]):
        assert relative_error(got_map, want_map) < 1e-5
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])
    assert relative_error(flat(got_grads), flat(want_grads)) < 1e-4


def test_bench_runs_this_platforms_implementations_and_torch():
    from safetriage_jax.kernels.grid_sample import bench
    assert bench.implementations_here("cpu") == ["xla"]
    assert "pallas_triton" in bench.implementations_here("gpu")
    case = specs.Case(1, 2, 8, 8, 3, 8, 8, flow="smooth", name="tiny")
    rows = bench.run([case], repeats=1, copy_bytes=2**20)
    assert {(row["pass"], row["implementation"]) for row in rows} == {
        (p, name) for p in bench.PASSES for name in ("xla", "torch")}
    assert all(row["ms"] > 0 and row["gbps"] > 0 for row in rows)
    assert "tiny:" in bench.format_table(rows)


def test_every_parity_output_on_pallas_triton_equals_xla(rng, tiny_variables):
    """Every output the parity command compares (keypoints, both background tags, deformation,
    contribution and occlusion maps, prediction, deformed source, AVD) of the TINY model with
    every warp on pallas_triton (interpret mode) equals the xla backend's, whose outputs match
    upstream PyTorch on the shared fixture (porting_test): TINY is the smallest shape with every
    warp of the model (interpreting the fixture's 256 x 256 model costs minutes in CI)."""
    from safetriage_jax.parity import compare, parity_outputs
    source, driving = (rng.uniform(size=(2, 3, TINY.image_size, TINY.image_size)).astype(np.float32)
                       for _ in range(2))
    want = parity_outputs(TINY, tiny_variables, source, driving, warp_implementation="xla")
    got = parity_outputs(TINY, tiny_variables, source, driving, warp_implementation="pallas_triton")
    errors = compare(got, want)
    assert len(errors) >= 20 and max(errors.values()) < 1e-5, errors
