"""Precision policy and remat: where the conv FLOPs run, bf16 training tracks float32, remat is exact."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.train import get_config
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.layers import SameBlock
from safetriage_jax.models.policy import Policy
from safetriage_jax.models.tpsmm import TPSMM
from safetriage_jax.models.vgg import VGG19Features, random_vgg19_variables
from safetriage_jax.parity import relative_error
from safetriage_jax.train import backbone, cost, step
from conftest import TINY, TINY_TRAIN


def test_conv_flop_count_matches_the_formula_forward_and_backward(rng):
    """One 3x3 conv (2 N H W Cin Cout 9 FLOPs), and with its two gradients (input, kernel) 3x."""
    image = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.bfloat16)
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    forward = 2 * 2 * 8 * 8 * 3 * 5 * 9
    assert cost.conv_flops_by_dtype(jax.jit(conv).lower(image, kernel).as_text()) == {"bf16": forward}
    loss = lambda x, k: jnp.sum(conv(x, k).astype(jnp.float32))
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(image, kernel).as_text()
    assert cost.conv_flops_by_dtype(text) == {"bf16": 3 * forward}
    # Twice through one inner jit of a lambda: one function, @"<lambda>" (a quoted name), two calls.
    twice = jax.jit(lambda x, k: jax.jit(conv)(x, k) + jax.jit(conv)(x, k))
    assert cost.conv_flops_by_dtype(twice.lower(image, kernel).as_text()) == {"bf16": 2 * forward}


def test_bf16_policy_puts_the_vox256_step_convs_in_bf16():
    """>= 95% of the conv FLOPs of the whole vox-256 step (forward, backward, VGG) in bf16."""
    config = get_config("vox-256,train.precision=bfloat16,train.perceptual_weights=random")
    flops = cost.conv_flops_by_dtype(step.lower_train_step(config, batch_size=1).as_text())
    print({k: f"{v / 1e9:.1f} GFLOP" for k, v in flops.items()})
    assert sum(flops.values()) > 500e9  # the whole step is counted (~1.1 TFLOP per pair)
    assert cost.conv_share(flops, "bf16") >= 0.95


@pytest.fixture(scope="module")
def tiny_batches():
    data = np.random.default_rng(0)
    return [{k: data.integers(0, 256, (4, 64, 64, 3), np.uint8) for k in ("source", "driving")}
            for _ in range(3)]


def test_bf16_training_tracks_float32(tiny_batches):
    """Three steps from the same state and batches, one epoch each (so the TPS dropout rate
    changes and the background optimizer joins at the third). The first loss (same weights)
    agrees to 1%; later ones to 10%: Adam's first steps move each weight by about +-lr whatever
    the gradient's size, so gradients that bf16 rounding flips in sign move weights apart.
    The float32 trainer is train_test's (same config), compiled once per session."""
    losses = {}
    initial = None
    for precision in ("float32", "bfloat16"):
        trainer = backbone.Trainer(get_config(f"{TINY_TRAIN},train.precision={precision}"),
                                   steps_per_epoch=1)
        initial = initial or jax.device_get(trainer.initial_state())
        state, vgg = jax.device_put(initial, trainer.replicated)
        losses[precision] = []
        for batch in tiny_batches:
            state, metrics = trainer.step(state, trainer.global_batch(batch), *trainer.step_extras(vgg))
            losses[precision].append(float(metrics["loss"]))
        assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # master weights
    print(losses)
    f32, bf16 = np.array(losses["float32"]), np.array(losses["bfloat16"])
    np.testing.assert_allclose(bf16[0], f32[0], rtol=0.01)
    np.testing.assert_allclose(bf16, f32, rtol=0.1)


def test_remat_leaves_gradients_unchanged(rng, tiny_variables):
    """Gradients through every block kind (ResNet with BatchNorm, hourglass, generator, warps,
    VGG) with and without remat agree to float32 rounding; the variables keep their names.
    Recomputation may round differently, and the TPS solves amplify that where random tiny
    weights put keypoints close together (1e-6 to 1e-3 relative, depending on the inputs);
    a remat bug (wrong variables, a lost gradient path) is an O(1) difference.
    ``blocks`` recomputes everything; ``conv_outputs`` shares its wrapping (only the policy
    function differs), so one of the two is compiled here to keep the test fast."""
    source, driving = (jnp.asarray(rng.random((2, 64, 64, 3)), jnp.float32) for _ in range(2))
    vgg_params = random_vgg19_variables(jax.random.PRNGKey(0))

    def loss(params, remat):
        policy = Policy(remat=remat)
        out, _ = TPSMM(TINY, policy).apply(dict(tiny_variables, params=params), source,
                                                  driving, train=True, mutable=["batch_stats"])
        features = step.frozen_features(VGG19Features(2, policy), vgg_params, policy)
        prediction = out["prediction"]
        return (jnp.mean(jnp.abs(prediction - driving)) + jnp.mean(out["kp_source"] ** 2)
                + sum(jnp.mean(f) for f in features(prediction))
                + sum(jnp.mean(m ** 2) for m in out["warped_encoder_maps"]))

    grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
    plain, remat = (grad_fn(tiny_variables["params"], name) for name in ("none", "blocks"))
    error = relative_error(remat, plain)
    print("relative gradient difference with remat=blocks:", error)
    assert error < 1e-2


@pytest.mark.parametrize("remat, convs", [("none", 3), ("blocks", 4), ("conv_outputs", 3)])
def test_remat_policies_recompute_what_they_say(rng, remat, convs):
    """A block's forward and backward pass: 3 convs' worth (forward, input and kernel grads);
    ``blocks`` recomputes the forward conv (4), ``conv_outputs`` keeps its output (3)."""
    block = Policy(remat=remat).block(SameBlock)(8, policy=Policy(remat=remat))
    image = jnp.asarray(rng.random((1, 8, 8, 4)), jnp.float32)
    variables = block.init(jax.random.PRNGKey(0), image)
    loss = lambda v, x: jnp.sum(block.apply(v, x) ** 2)
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(variables, image).as_text()
    forward = 2 * 8 * 8 * 4 * 8 * 9
    assert cost.conv_flops_by_dtype(text) == {"f32": convs * forward}


def test_unknown_policy_names_are_rejected():
    with pytest.raises(SafeTriageError, match="precision"):
        Policy(precision="float16")
    with pytest.raises(SafeTriageError, match="remat"):
        Policy(remat="everything")


def test_micro_batches_accumulate_the_whole_batch_gradient(rng):
    """Loss, terms and gradient over 4 slices equal the whole batch's (per-sample mean losses);
    the running statistics are threaded through the slices in order (as 4 sequential calls)."""
    batch = {"x": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}

    def loss_fn(params, stats, batch, key):
        del key
        y = jnp.tanh(batch["x"] @ params["w"])
        loss = jnp.mean(y ** 2)
        return loss, ({"l2": loss}, {"mean": 0.9 * stats["mean"] + 0.1 * jnp.mean(batch["x"], 0)})

    stats = {"mean": jnp.zeros(3)}
    key = jax.random.PRNGKey(0)
    (whole, _), whole_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch, key)
    (total, (terms, new_stats)), grads = step.accumulated_gradients(
        loss_fn, params, stats, batch, key, 4)
    assert relative_error(grads, whole_grads) < 1e-6
    np.testing.assert_allclose(total, whole, rtol=1e-6)
    np.testing.assert_allclose(terms["l2"], whole, rtol=1e-6)
    expected = stats
    for j in range(4):  # slice j: samples j, j + 4 (interleaved, so devices keep their samples)
        expected = loss_fn(params, expected, {"x": batch["x"][j::4]}, key)[1][1]
    np.testing.assert_allclose(new_stats["mean"], expected["mean"], rtol=1e-6)
    assert step.accumulated_gradients(loss_fn, params, stats, batch, key, 1)[0][0] == whole


def test_micro_batches_keep_one_slice_of_activations_live(rng):
    """XLA's compiled estimate for a gradient whose activations dwarf its parameters: 8 slices
    need a small fraction of the whole batch's temporaries (one slice's activations live)."""
    params = {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.standard_normal((256, 32, 64)), jnp.float32)}

    def loss_fn(params, stats, batch, key):
        del key
        h = batch["x"]
        for _ in range(8):  # eight saved activations of the batch's size
            h = jnp.tanh(h @ params["w"])
        return jnp.mean(h ** 2), ({}, stats)

    def temporaries(micro_batches):
        fn = jax.jit(lambda p, b: step.accumulated_gradients(
            loss_fn, p, {}, b, jax.random.PRNGKey(0), micro_batches))
        return cost.memory(fn.lower(params, batch).compile())["temporaries"]

    whole, sliced = temporaries(1), temporaries(8)
    print(f"temporaries: whole batch {whole / 2 ** 20:.1f} MiB, 8 slices {sliced / 2 ** 20:.1f} MiB")
    assert sliced < 0.3 * whole


def test_a_batch_that_micro_batches_cannot_split_evenly_is_refused():
    config = get_config(TINY_TRAIN)
    config.train.update(batch_size=6, micro_batches=4)  # past the config check, as code may do
    with pytest.raises(SafeTriageError, match="multiple of 4 micro-batches x the device count 1"):
        backbone.Trainer(config, 1000)
