"""ResNet-18 (He et al. 2016, torchvision layout), the encoder of the keypoint and background nets.

Submodule names follow torchvision's state_dict (``layer2_0/downsample_0`` for
``layer2.0.downsample.0``) so that weight porting is a mechanical renaming.
"""

import flax.linen as nn
import jax.numpy as jnp

from safetriage_jax.models.layers import batch_norm, conv
from safetriage_jax.models.policy import Policy, conv_output


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 strided projection) shortcut."""

    features: int
    stride: int = 1
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x_BHWC, train: bool):
        dtype = self.policy.dtype
        out = conv(self.features, 3, self.stride, use_bias=False, dtype=dtype, name="conv1")(x_BHWC)
        out = nn.relu(batch_norm(train, dtype, name="bn1")(conv_output(out)))
        out = conv(self.features, 3, use_bias=False, dtype=dtype, name="conv2")(out)
        out = batch_norm(train, dtype, name="bn2")(conv_output(out))
        if self.stride != 1 or x_BHWC.shape[-1] != self.features:
            x_BHWC = conv(self.features, 1, self.stride, use_bias=False, dtype=dtype,
                          name="downsample_0")(x_BHWC)
            x_BHWC = batch_norm(train, dtype, name="downsample_1")(conv_output(x_BHWC))
        return nn.relu(out + x_BHWC)


class ResNet18(nn.Module):
    """ResNet-18 with a linear head of ``num_outputs``; any number of input channels.

    ``width`` is the first stage's channels (torchvision: 64); each later stage doubles it.

    Runs in the policy's compute dtype, head included (the caller casts what it regresses).
    """

    num_outputs: int
    width: int = 64
    head_kernel_init: object = nn.linear.default_kernel_init
    head_bias_init: object = nn.initializers.zeros_init()
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x_BHWC, train: bool = False):
        dtype = self.policy.dtype
        x_BHWC = conv(self.width, 7, 2, use_bias=False, dtype=dtype, name="conv1")(x_BHWC)
        x_BHWC = nn.relu(batch_norm(train, dtype, name="bn1")(x_BHWC))
        x_BHWC = nn.max_pool(x_BHWC, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        basic_block = self.policy.block(BasicBlock, static_argnums=(2,))  # train is static
        for stage in range(4):
            width = self.width * 2 ** stage
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                x_BHWC = basic_block(width, stride, self.policy,
                                     name=f"layer{stage + 1}_{block}")(x_BHWC, train)
        features_BC = jnp.mean(x_BHWC, axis=(1, 2))
        return nn.Dense(self.num_outputs, kernel_init=self.head_kernel_init,
                        bias_init=self.head_bias_init, dtype=dtype, name="fc")(features_BC)
