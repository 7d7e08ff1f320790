"""InpaintingNetwork: warps the source's multi-scale features with the flow and decodes the frame.

Split into ``encode`` (source only: computed once per source image when animating a video)
and ``decode`` (per driving frame). The warp-loss copies of the warped features carry gradient
to the flow only (features and occlusion stopped), as upstream's; XLA shares their forward.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from safetriage_jax.kernels.grid_sample import grid_sample
from safetriage_jax.models.layers import (DownBlock, ResBlock, SameBlock, UpBlock, conv,
                                          resize_bilinear_align_corners)
from safetriage_jax.models.policy import Policy


class InpaintingNetwork(nn.Module):
    """Encoder-decoder generator fed with flow-warped, occlusion-masked source features."""

    num_channels: int
    block_expansion: int
    max_features: int
    num_down_blocks: int
    multi_mask: bool = True
    policy: Policy = Policy()

    def setup(self):
        widths = [min(self.max_features, self.block_expansion * 2 ** i)
                  for i in range(self.num_down_blocks + 1)]
        policy, block = self.policy, self.policy.block
        self.first = block(SameBlock)(self.block_expansion, kernel_size=7, policy=policy)
        self.down_blocks = [block(DownBlock)(widths[i + 1], policy)
                            for i in range(self.num_down_blocks)]
        # Decoder levels, deepest first; the deepest takes the bottleneck alone, others a concat.
        up_blocks, resblocks = [], []
        for i in reversed(range(self.num_down_blocks)):
            up_blocks.append(block(UpBlock)(widths[i], policy))
            resblocks += [block(ResBlock)(policy), block(ResBlock)(policy)]
        self.up_blocks = up_blocks
        self.resblock = resblocks
        self.final = conv(self.num_channels, 7, dtype=policy.dtype)

    def __call__(self, source_BHWC, dense_motion):
        return self.decode(self.encode(source_BHWC), source_BHWC, dense_motion)

    def encode(self, source_BHWC):
        """Source features at every level, full resolution first (in the compute dtype)."""
        feature_maps = [self.first(source_BHWC.astype(self.policy.dtype))]
        for block in self.down_blocks:
            feature_maps.append(block(feature_maps[-1]))
        return feature_maps

    def _warp(self, image_BHWC, flow_BHW2, flows_by_size):
        """Warps with the flow resized (once per resolution) to the image's size."""
        size = image_BHWC.shape[1:3]
        if size not in flows_by_size:
            flows_by_size[size] = resize_bilinear_align_corners(flow_BHW2, *size)
        # A batch-1 image (one source shared by the frames) is read by every frame's flow.
        # Under remat the warp keeps only its inputs: its four gathered taps per pixel and
        # channel are the largest tensors of the training step.
        warp = self.policy.function(functools.partial(
            grid_sample, align_corners=True, implementation=self.policy.warp_implementation))
        return warp(image_BHWC, flows_by_size[size])

    def _occlusion_at(self, occlusion_map, index, size):
        mask_BHW1 = occlusion_map[index if self.multi_mask else 0]
        return resize_bilinear_align_corners(mask_BHW1, *size)

    def decode(self, feature_maps, source_BHWC, dense_motion):
        """Returns 'prediction', 'deformed' (B,H,W,C) and 'warped_encoder_maps' (deepest first,
        differentiable in the flow only, for the warp loss), all in the compute dtype.
        ``feature_maps``/``source`` may have batch 1."""
        dtype = self.policy.dtype
        source_BHWC = source_BHWC.astype(dtype)
        flow_BHW2 = dense_motion["deformation"]  # a float32 sampling grid
        occlusion_map = [mask.astype(dtype) for mask in dense_motion["occlusion_map"]]
        flows_by_size = {}

        warped_maps = []

        def warped_level(level, mask_index):
            feature = feature_maps[level]
            occlusion = self._occlusion_at(occlusion_map, mask_index, feature.shape[1:3])
            flow_only = self._warp(jax.lax.stop_gradient(feature), flow_BHW2, flows_by_size)
            warped_maps.append(flow_only * jax.lax.stop_gradient(occlusion))
            return self._warp(feature, flow_BHW2, flows_by_size) * occlusion

        out = warped_level(self.num_down_blocks, 0)
        for i in range(self.num_down_blocks):
            out = self.resblock[2 * i](out)
            out = self.resblock[2 * i + 1](out)
            out = self.up_blocks[i](out)
            skip = warped_level(self.num_down_blocks - 1 - i, i + 1)
            if i < self.num_down_blocks - 1:
                out = jnp.concatenate([out, skip], axis=-1)

        deformed_BHWC = self._warp(source_BHWC, flow_BHW2, flows_by_size)
        occlusion_last = self._occlusion_at(occlusion_map, -1, out.shape[1:3])
        out = out * (1 - occlusion_last) + skip
        out = nn.sigmoid(self.final(out))
        prediction = out * (1 - occlusion_last) + deformed_BHWC * occlusion_last
        return {"prediction": prediction, "deformed": deformed_BHWC,
                "warped_encoder_maps": warped_maps}

    def get_encode(self, driving_BHWC, occlusion_map):
        """Driving-frame features masked by the occlusion maps (targets of the warp loss)."""
        driving_BHWC = jax.lax.stop_gradient(driving_BHWC)
        occlusion_map = [jax.lax.stop_gradient(m).astype(self.policy.dtype) for m in occlusion_map]
        feature_maps = self.encode(driving_BHWC)
        num_masks = len(occlusion_map)
        encoded = []
        for level, feature in enumerate(feature_maps):
            mask_index = (num_masks - 1 - level) if self.multi_mask else 0
            occlusion = resize_bilinear_align_corners(occlusion_map[mask_index], *feature.shape[1:3])
            encoded.append(jax.lax.stop_gradient(feature * occlusion))
        return encoded
