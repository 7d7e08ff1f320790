"""The training state and the pure ``train_step`` (one optimizer step of upstream TPSMM training).

The step is jitted once over a device mesh by the loop: the state is replicated, the batch is
split along the mesh's ``data`` axis, and BatchNorm statistics are over the global batch (as
upstream's synchronised BatchNorm). Epoch-dependent behaviour (TPS dropout, background
predictor from ``bg_start``) is computed from the step inside the jit, so one compiled step
serves the whole run. The AVD network is not trained here (upstream trains it in a second
phase); its variables pass through unchanged.

``train.precision`` and ``train.remat`` make the networks' :class:`Policy`: parameters stay
float32 and each layer casts them to the compute dtype; losses are reduced in float32.
``train.micro_batches`` > 1 accumulates the gradient over that many slices of the batch, so
activation memory is that of one slice.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import optax

from safetriage_jax.models.config import TPSMMConfig
from safetriage_jax.models.policy import Policy
from safetriage_jax.models.tpsmm import TPSMM, initialize
from safetriage_jax.models.vgg import VGG19Features
from safetriage_jax.models import vgg as vgg_lib
from safetriage_jax.train import augment, losses, optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    buffers: dict
    opt_state: dict          # {"generator": ..., "bg": ...}
    rng: jax.Array


def policy(train_cfg) -> Policy:
    """The networks' compute dtype, remat policy and warp backend from ``train.precision`` /
    ``train.remat`` / ``train.warp_implementation``."""
    return Policy(precision=train_cfg.precision, remat=train_cfg.remat,
                  warp_implementation=train_cfg.warp_implementation)


def networks(config):
    """(TPSMM, VGG-19 feature extractor) of a training config, both under its :func:`policy`."""
    model_config = TPSMMConfig.from_dict(config.model.to_dict())
    used = [i for i, w in enumerate(config.train.loss_weights.perceptual) if w]
    train_policy = policy(config.train)
    return (TPSMM(model_config, train_policy),
            VGG19Features(num_slices=used[-1] + 1 if used else 1, policy=train_policy))


def optimizers(train_cfg, steps_per_epoch, has_bg):
    txs = {"generator": optimizer.generator_optimizer(train_cfg, steps_per_epoch)}
    if has_bg:
        txs["bg"] = optimizer.background_optimizer(train_cfg, steps_per_epoch)
    return txs


def create_state(variables, txs, rng) -> TrainState:
    params = variables["params"]
    opt_state = {"generator": txs["generator"].init(_generator_params(params))}
    if "bg" in txs:
        opt_state["bg"] = txs["bg"].init(params["bg_predictor"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      buffers=variables.get("buffers", {}), opt_state=opt_state, rng=rng)


def _generator_params(params):
    return {name: params[name] for name in optimizer.GENERATOR_MODULES}


def _select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def frozen_features(vgg, vgg_params, policy):
    """images -> VGG features with the weights gradient-stopped, rematerialised under ``policy``."""
    vgg_params = jax.lax.stop_gradient(vgg_params)
    apply = policy.function(vgg.apply)
    return lambda images_BHWC: apply(vgg_params, images_BHWC)


def generator_losses(params, state, batch, rng, *, model, vgg_features, cfg, epoch):
    """Weighted upstream losses for one batch; returns (total, (terms, new batch_stats))."""
    tcfg = cfg.train
    weights = tcfg.loss_weights
    compute_dtype = model.policy.dtype
    stats = state.batch_stats
    variables = lambda: {"params": params, "batch_stats": stats, "buffers": state.buffers}

    def run(method, *args, **kwargs):  # applies one model method, threading BatchNorm stats
        nonlocal stats
        out, updated = model.apply(variables(), *args, method=method, mutable=["batch_stats"],
                                   **kwargs)
        stats = updated["batch_stats"]
        return out  # keypoints and affines: float32 (geometry)

    source, driving = batch["source"].astype(compute_dtype), batch["driving"].astype(compute_dtype)
    dropout_key, tps_key = jax.random.split(rng)
    kp_source = run(TPSMM.keypoints, source, True)
    kp_driving = run(TPSMM.keypoints, driving, True)
    bg_active = epoch >= tcfg.bg_start
    bg_param = None
    if model.config.bg:
        old_bg_stats = stats["bg_predictor"]
        predicted = run(TPSMM.background, source, driving, True)
        bg_param = jnp.where(bg_active, predicted, jnp.eye(3, dtype=predicted.dtype))
    motion = model.apply(variables(), source, kp_driving, kp_source, bg_param,
                         optimizer.tps_dropout_p(epoch, tcfg), dropout_key,
                         method=TPSMM.dense_motion)
    generated = model.apply(variables(), source, motion,
                            method=lambda m, s, mo: m.inpainting_network(s, mo))
    terms = {}
    if sum(weights.perceptual):
        terms["perceptual"] = losses.perceptual(
            vgg_features, generated["prediction"], driving, tcfg.scales, weights.perceptual)
    if weights.equivariance:
        warped, tps = losses.equivariance_frame(tps_key, driving, tcfg.transform,
                                                model.policy.warp_implementation)
        kp_warped = run(TPSMM.keypoints, warped, True)
        terms["equivariance"] = weights.equivariance * losses.equivariance(kp_driving, kp_warped, tps)
    if weights.warp:
        encoded = model.apply(variables(), driving, motion["occlusion_map"],
                              method=lambda m, d, o: m.inpainting_network.get_encode(d, o))
        terms["warp"] = weights.warp * losses.warp(encoded, generated["warped_encoder_maps"])
    if model.config.bg:
        if weights.bg:
            reverse = run(TPSMM.background, driving, source, True)
            terms["bg"] = jnp.where(bg_active, weights.bg * losses.background(predicted, reverse), 0.)
        stats = dict(stats, bg_predictor=_select(bg_active, stats["bg_predictor"], old_bg_stats))
    total = sum(terms.values())
    return total, (terms, stats)


def split_micro_batches(x, micro_batches):
    """(B, ...) -> (micro_batches, B / micro_batches, ...); slice j holds samples j, j + k, ...

    Interleaved, so that a batch split over devices along B splits every slice the same way
    (each device keeps its own samples).
    """
    return jnp.moveaxis(x.reshape((-1, micro_batches) + x.shape[1:]), 1, 0)


def accumulated_gradients(loss_fn, params, batch_stats, batch, rng, micro_batches):
    """``loss_fn(params, batch_stats, batch, key) -> (loss, (terms, batch_stats))`` and its
    gradient for the whole batch, computed over ``micro_batches`` equal slices in sequence.

    Only one slice's activations are live at a time (a ``lax.scan``); loss, terms and gradients
    are the slices' means, which equal the whole batch's for per-sample mean losses. BatchNorm
    normalises each slice by its own statistics, and its running averages are updated once per
    slice. ``micro_batches=1`` is the plain gradient of the whole batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        return grad_fn(params, batch_stats, batch, rng)
    slices = jax.tree.map(lambda x: split_micro_batches(x, micro_batches), batch)
    keys = jax.random.split(rng, micro_batches)

    def accumulate(carry, slice_and_key):
        grads_sum, stats = carry
        (total, (terms, stats)), grads = grad_fn(params, stats, *slice_and_key)
        return (jax.tree.map(jnp.add, grads_sum, grads), stats), (total, terms)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads_sum, batch_stats), (totals, terms) = jax.lax.scan(
        accumulate, (zeros, batch_stats), (slices, keys))
    mean = lambda x: jnp.mean(x, axis=0)
    grads = jax.tree.map(lambda g: g / micro_batches, grads_sum)
    return (mean(totals), (jax.tree.map(mean, terms), batch_stats)), grads


def train_step(state: TrainState, batch, vgg_params, steps_per_epoch, *, model, vgg, cfg):
    """One optimizer step -> (new state, metrics). ``batch``: source/driving (B,H,W,3) in [0,1].

    ``steps_per_epoch`` (an int32 argument, not a constant: the compiled step serves any dataset
    size) turns the step into the epoch of upstream's schedules."""
    tcfg = cfg.train
    txs = optimizers(tcfg, steps_per_epoch, model.config.bg)
    epoch = state.step // steps_per_epoch
    rng = jax.random.fold_in(state.rng, state.step)
    jitter_key, loss_key = jax.random.split(rng)
    pair = jnp.stack([batch["source"], batch["driving"]], axis=1)
    pair = augment.color_jitter(jitter_key, pair, **cfg.data.jitter)
    batch = {"source": pair[:, 0], "driving": pair[:, 1]}

    vgg_features = frozen_features(vgg, vgg_params, model.policy)

    def loss_fn(params, batch_stats, micro_batch, key):
        return generator_losses(params, state.replace(batch_stats=batch_stats), micro_batch, key,
                                model=model, vgg_features=vgg_features, cfg=cfg, epoch=epoch)

    (total, (terms, batch_stats)), grads = accumulated_gradients(
        loss_fn, state.params, state.batch_stats, batch, loss_key, tcfg.micro_batches)

    params, opt_state = dict(state.params), dict(state.opt_state)
    gen_params, gen_grads = _generator_params(params), _generator_params(grads)
    updates, opt_state["generator"] = txs["generator"].update(
        gen_grads, state.opt_state["generator"], gen_params)
    params.update(optax.apply_updates(gen_params, updates))
    if "bg" in txs:  # upstream steps the background optimizer only from epoch bg_start
        bg_updates, bg_opt = txs["bg"].update(grads["bg_predictor"], state.opt_state["bg"],
                                              params["bg_predictor"])
        active = epoch >= tcfg.bg_start
        params["bg_predictor"] = _select(
            active, optax.apply_updates(params["bg_predictor"], bg_updates), params["bg_predictor"])
        opt_state["bg"] = _select(active, bg_opt, state.opt_state["bg"])

    metrics = dict(terms, loss=total, epoch=epoch,
                   dropout_p=optimizer.tps_dropout_p(epoch, tcfg),
                   grad_norm=optax.tree.norm(gen_grads))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def lower_train_step(config, batch_size, steps_per_epoch=1000, sharding=None):
    """The jitted :func:`train_step` of ``config`` lowered on abstract inputs (one device).

    Needs no data and no VGG weights file: state, batch (float32 images in [0, 1]) and VGG
    variables are ``jax.ShapeDtypeStruct``s. Inspect ``.as_text()`` or ``.compile()`` it.
    ``sharding`` places them (e.g. on a compile-only device of ``safetriage_jax.aot``).
    """
    model, vgg = networks(config)
    txs = optimizers(config.train, steps_per_epoch, model.config.bg)
    state = jax.eval_shape(lambda: create_state(initialize(model.config, jax.random.PRNGKey(0)),
                                                txs, jax.random.PRNGKey(1)))
    size = model.config.image_size
    images = jax.ShapeDtypeStruct((batch_size, size, size, model.config.num_channels), jnp.float32)
    step = jax.jit(functools.partial(train_step, model=model, vgg=vgg, cfg=config),
                   donate_argnums=0)  # as the trainer's: the new state reuses the old's buffers
    inputs = (state, {"source": images, "driving": images}, vgg_lib.variable_shapes(),
              jax.ShapeDtypeStruct((), jnp.int32))  # steps_per_epoch: a traced argument
    if sharding is not None:
        inputs = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), inputs)
    return step.lower(*inputs)
