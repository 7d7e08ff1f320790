"""Upstream TPSMM's optimizers in optax, and its epoch-based schedules expressed in steps.

Upstream trains kp_detector + dense_motion_network + inpainting_network with one torch Adam
(betas 0.5/0.999, coupled weight decay 1e-4) and bg_predictor with a second one from epoch
``bg_start``; gradients of kp_detector, dense_motion_network and bg_predictor are clipped to an
infinity-norm of 10 per network first; the learning rate drops 10x at each epoch milestone.
"""

import jax
import jax.numpy as jnp
import optax

GENERATOR_MODULES = ("kp_detector", "dense_motion_network", "inpainting_network")
CLIPPED_MODULES = ("kp_detector", "dense_motion_network")


def clip_max_abs(max_norm):
    """torch ``clip_grad_norm_(norm_type=inf)`` on the whole tree: scale by
    min(1, max_norm / (max |g| + 1e-6))."""
    def update(updates, state, params=None):
        del params
        largest = jax.tree.reduce(jnp.maximum, jax.tree.map(lambda g: jnp.max(jnp.abs(g)), updates))
        scale = jnp.minimum(1.0, max_norm / (largest + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def per_module(transform, modules):
    """Applies ``transform`` separately to each named top-level subtree; others pass through."""
    def label(params):
        return {name: name if name in modules else "other" for name in params}

    transforms = {name: transform for name in modules}
    transforms["other"] = optax.identity()
    return optax.multi_transform(transforms, label)


def adam_coupled(learning_rate, weight_decay):
    """torch.optim.Adam(betas=(0.5, 0.999), weight_decay=wd): decay is added to the gradient."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.scale_by_adam(b1=0.5, b2=0.999, eps=1e-8),
                       optax.scale_by_learning_rate(learning_rate))


def learning_rate(base, milestones_epochs, steps_per_epoch):
    """MultiStepLR(gamma=0.1) stepped per epoch, as a function of the optimizer step.

    ``steps_per_epoch`` may be traced (the train step takes it as an argument), so one compiled
    step serves any epoch length. float32 products in optax's piecewise-constant order."""
    def schedule(count):
        value = jnp.float32(base)
        for milestone in sorted(int(m) for m in milestones_epochs):
            value = jnp.where(count >= milestone * steps_per_epoch, jnp.float32(0.1) * value, value)
        return value

    return schedule


def generator_optimizer(train_cfg, steps_per_epoch):
    lr = learning_rate(train_cfg.lr, train_cfg.epoch_milestones, steps_per_epoch)
    return optax.chain(per_module(clip_max_abs(train_cfg.max_grad_norm), CLIPPED_MODULES),
                       adam_coupled(lr, train_cfg.weight_decay))


def background_optimizer(train_cfg, steps_per_epoch):
    lr = learning_rate(train_cfg.lr, train_cfg.epoch_milestones, steps_per_epoch)
    return optax.chain(clip_max_abs(train_cfg.max_grad_norm),
                       adam_coupled(lr, train_cfg.weight_decay))


def tps_dropout_p(epoch, train_cfg):
    """TPS dropout probability: rises linearly from ``dropout_startp`` to ``dropout_maxp`` over
    ``dropout_inc_epoch`` epochs, and is off from ``dropout_epoch`` on (upstream's schedule)."""
    rising = jnp.minimum(epoch / train_cfg.dropout_inc_epoch * train_cfg.dropout_maxp
                         + train_cfg.dropout_startp, train_cfg.dropout_maxp)
    return jnp.where(epoch < train_cfg.dropout_epoch, rising, 0.0)
