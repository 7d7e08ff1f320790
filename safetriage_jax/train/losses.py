"""Upstream TPSMM's training losses (Sec. 3.3 of the paper), as pure functions.

- perceptual: L1 between VGG-19 features (relu1_1 .. relu5_1) of prediction and driving frame
  at every scale of an anti-aliased image pyramid, the driving side gradient-stopped;
- equivariance: keypoints of a randomly TPS-warped driving frame, warped back, must match the
  driving keypoints;
- warp: occlusion-masked driving-frame encoder features vs the flow-warped source features;
- background: the source->driving and driving->source affines must compose to the identity.
Each returns an unweighted float32 scalar (reductions run in float32 whatever the activations'
dtype); the trainer applies the config's weights.
"""

import jax
import jax.numpy as jnp

from safetriage_jax.kernels.grid_sample import grid_sample
from safetriage_jax.models import geometry
from safetriage_jax.models.layers import anti_alias_downsample


def _mean_abs(x):
    """mean |x|, accumulated in float32."""
    return jnp.mean(jnp.abs(x), dtype=jnp.float32)


def image_pyramid(image_BHWC, scales):
    return [anti_alias_downsample(image_BHWC, scale) for scale in scales]


def perceptual(vgg_features, prediction_BHWC, target_BHWC, scales, layer_weights):
    """sum over scales and VGG layers of weight * mean |vgg(prediction) - vgg(target)|."""
    total = 0.0
    for predicted, real in zip(image_pyramid(prediction_BHWC, scales),
                               image_pyramid(target_BHWC, scales)):
        for weight, x, y in zip(layer_weights, vgg_features(predicted), vgg_features(real)):
            total = total + weight * _mean_abs(x - jax.lax.stop_gradient(y))
    return total


def equivariance_frame(rng, driving_BHWC, transform, warp_implementation=None):
    """A random TPS warp of the driving frames and the warp itself (reflection padding)."""
    batch, height, width, _ = driving_BHWC.shape
    tps = geometry.random_tps(rng, batch, transform["sigma_affine"], transform["sigma_tps"],
                              transform["points_tps"])  # float32 coordinates, any image dtype
    grid_BHW2 = geometry.random_tps_grid(tps, height, width)
    warped = grid_sample(driving_BHWC, grid_BHW2, padding_mode="reflection", align_corners=True,
                         implementation=warp_implementation)
    return warped, tps


def equivariance(kp_driving_BN2, kp_transformed_BN2, tps):
    """mean |kp(driving) - T(kp(T^-1 driving))|: keypoints must follow a known warp."""
    return _mean_abs(kp_driving_BN2 - geometry.warp_random_tps(tps, kp_transformed_BN2))


def warp(encoded_driving_maps, warped_source_maps):
    """sum over levels of mean |encoder(driving) - warp(encoder(source))|; the lists run in
    opposite orders (full resolution first vs deepest first), as the generator produces them."""
    return sum(_mean_abs(encoded - warped) for encoded, warped in
               zip(encoded_driving_maps, reversed(warped_source_maps)))


def background(bg_forward_B33, bg_reverse_B33):
    """mean |I - A_sd A_ds|: the two background affines must be inverse to each other."""
    product = jnp.einsum("bij,bjk->bik", bg_forward_B33, bg_reverse_B33,
                         precision=jax.lax.Precision.HIGHEST)
    return _mean_abs(jnp.eye(3, dtype=product.dtype) - product)
