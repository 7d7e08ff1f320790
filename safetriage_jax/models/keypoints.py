"""KPDetector (K TPS x 5 control points per image) and BGMotionPredictor (background affine)."""

import flax.linen as nn
import jax.numpy as jnp

from safetriage_jax.models.policy import Policy
from safetriage_jax.models.resnet import ResNet18


class KPDetector(nn.Module):
    """ResNet-18 regressing num_tps * 5 keypoints, squashed into [-1, 1] (float32)."""

    num_tps: int
    width: int = 64  # the ResNet-18's first-stage channels
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, image_BHWC, train: bool = False):
        encoder = ResNet18(self.num_tps * 5 * 2, self.width, policy=self.policy, name="fg_encoder")
        raw_BF = encoder(image_BHWC, train)
        kp_BF = nn.sigmoid(raw_BF.astype(jnp.float32)) * 2 - 1
        return kp_BF.reshape(image_BHWC.shape[0], self.num_tps * 5, 2)


def _identity_affine_bias(key, shape, dtype=jnp.float32):
    del key
    return jnp.array([1, 0, 0, 0, 1, 0], dtype).reshape(shape)


class BGMotionPredictor(nn.Module):
    """ResNet-18 on source and driving (channels stacked) -> 3x3 matrix with last row [0 0 1].

    Starts at the identity (zero head weights), as upstream initialises it. The matrix is float32.
    """

    width: int = 64  # the ResNet-18's first-stage channels
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, source_BHWC, driving_BHWC, train: bool = False):
        encoder = ResNet18(6, self.width, head_kernel_init=nn.initializers.zeros_init(),
                           head_bias_init=_identity_affine_bias, policy=self.policy,
                           name="bg_encoder")
        affine_B6 = encoder(jnp.concatenate([source_BHWC, driving_BHWC], axis=-1), train)
        affine_B6 = affine_B6.astype(jnp.float32)
        batch = affine_B6.shape[0]
        last_row = jnp.broadcast_to(jnp.array([0, 0, 1], affine_B6.dtype), (batch, 1, 3))
        return jnp.concatenate([affine_B6.reshape(batch, 2, 3), last_row], axis=1)
