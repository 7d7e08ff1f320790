"""DenseMotionNetwork: combines K TPS transforms and a background affine into one optical flow.

From keypoints it builds K+1 sampling grids (background + K TPS), warps a down-sampled source
with each, and an hourglass predicts per-pixel softmax weights over the K+1 grids (the
contribution maps) plus the multi-resolution occlusion masks the generator uses.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from safetriage_jax.kernels.grid_sample import grid_sample
from safetriage_jax.models import geometry
from safetriage_jax.models.layers import AntiAliasDownsample, Hourglass, UpBlock, conv
from safetriage_jax.models.policy import Policy

NUM_OCCLUSION_MASKS = 4


def dropout_softmax(logits_BHWK, drop_p, rng):
    """Softmax over the K+1 transforms with whole TPS transforms dropped (Eqs. 7-8 of the paper).

    Each of the K TPS transforms is kept with probability 1 - drop_p (the background one
    always); dropped ones get zero weight. Like upstream, kept weights are not rescaled.
    """
    batch, num = logits_BHWK.shape[0], logits_BHWK.shape[-1]
    keep_BK = jax.random.uniform(rng, (batch, num)) < (1 - drop_p)
    keep_BK = keep_BK.at[:, 0].set(True)
    exp = jnp.exp(logits_BHWK - jnp.max(logits_BHWK, axis=-1, keepdims=True))
    exp = jnp.where(keep_BK[:, None, None, :], exp, 0.0)
    return exp / (jnp.sum(exp, axis=-1, keepdims=True) + 1e-6)


class DenseMotionNetwork(nn.Module):
    """Predicts the dense flow (driving -> source), contribution maps and occlusion masks."""

    num_tps: int
    block_expansion: int
    max_features: int
    num_blocks: int
    scale_factor: float = 0.25
    multi_mask: bool = True
    kp_variance: float = 0.01
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, source_BHWC, kp_driving_BN2, kp_source_BN2, bg_param_B33=None,
                 dropout_p=0.0, dropout_rng=None):
        """``source_BHWC`` may have batch 1 (one source shared by every frame). Returns a dict
        with 'deformation' (B,h,w,2), 'contribution_maps' (B,h,w,K+1), 'deformed_source'
        (B,K+1,h,w,C) and 'occlusion_map' (list of (B,H_i,W_i,1), coarse first), with h, w =
        scale_factor x the source size. TPS dropout is on when dropout_rng is given.

        Grids, deformation and contribution maps are float32; the deformed source and the
        occlusion masks come in the policy's compute dtype."""
        dtype = self.policy.dtype
        source_BHWC = AntiAliasDownsample(self.scale_factor, name="down")(source_BHWC.astype(dtype))
        batch = kp_driving_BN2.shape[0]
        _, height, width, channels = source_BHWC.shape
        num_transforms = self.num_tps + 1

        gauss_driving = geometry.keypoint_heatmaps(kp_driving_BN2, height, width, self.kp_variance)
        gauss_source = geometry.keypoint_heatmaps(kp_source_BN2, height, width, self.kp_variance)
        heatmaps_BHWN = gauss_driving - gauss_source
        heatmaps_BHWN = jnp.concatenate(
            [jnp.zeros_like(heatmaps_BHWN[..., :1]), heatmaps_BHWN], axis=-1).astype(dtype)

        grids_BTHW2 = self.transformation_grids(kp_driving_BN2, kp_source_BN2, bg_param_B33,
                                                height, width)
        # Grid rows b*T + t read source b; a batch-1 source is read by every frame's grids.
        deformed_BTHWC = grid_sample(
            source_BHWC, rearrange(grids_BTHW2, "b t h w two -> (b t) h w two"),
            align_corners=True, implementation=self.policy.warp_implementation,
        ).reshape(batch, num_transforms, height, width, channels)

        hourglass_in = jnp.concatenate(
            [heatmaps_BHWN, rearrange(deformed_BTHWC, "b t h w c -> b h w (t c)")], axis=-1)
        outs = Hourglass(self.block_expansion, self.max_features, self.num_blocks, self.policy,
                         name="hourglass")(hourglass_in)

        logits_BHWT = conv(num_transforms, 7, dtype=dtype, name="maps")(outs[-1])
        logits_BHWT = logits_BHWT.astype(jnp.float32)  # the softmax over transforms: float32
        if dropout_rng is not None:
            contribution_BHWT = dropout_softmax(logits_BHWT, dropout_p, dropout_rng)
        else:
            contribution_BHWT = jax.nn.softmax(logits_BHWT, axis=-1)
        deformation_BHW2 = jnp.einsum("bhwt,bthwi->bhwi", contribution_BHWT, grids_BTHW2,
                                      precision=jax.lax.Precision.HIGHEST)

        return {
            "deformation": deformation_BHW2,
            "contribution_maps": contribution_BHWT,
            "deformed_source": deformed_BTHWC,
            "occlusion_map": self.occlusion_masks(outs),
        }

    def transformation_grids(self, kp_driving_BN2, kp_source_BN2, bg_param_B33, height, width):
        """(B, K+1, h, w, 2): background grid (identity or bg affine) then the K TPS grids."""
        batch = kp_driving_BN2.shape[0]
        tps_BKHW2 = geometry.keypoint_tps_grids(
            kp_driving_BN2.reshape(batch, self.num_tps, 5, 2),
            kp_source_BN2.reshape(batch, self.num_tps, 5, 2), height, width)
        if bg_param_B33 is None:
            bg_BHW2 = jnp.broadcast_to(geometry.coordinate_grid(height, width, tps_BKHW2.dtype),
                                       (batch, height, width, 2))
        else:
            bg_BHW2 = geometry.affine_grid(bg_param_B33, height, width)
        return jnp.concatenate([bg_BHW2[:, None], tps_BKHW2], axis=1)

    def occlusion_masks(self, outs):
        """Sigmoid occlusion masks from the hourglass outputs (and extra up blocks), coarse first."""
        dtype = self.policy.dtype
        if not self.multi_mask:
            return [nn.sigmoid(conv(1, 7, dtype=dtype, name="occlusion_0")(outs[-1]))]
        num_up = int(round(math.log2(1 / self.scale_factor)))
        num_from_hourglass = NUM_OCCLUSION_MASKS - num_up
        masks = []
        for i in range(num_from_hourglass):
            feature = outs[len(outs) - num_from_hourglass + i]
            masks.append(nn.sigmoid(conv(1, 7, dtype=dtype, name=f"occlusion_{i}")(feature)))
        feature = outs[-1]
        up_block = self.policy.block(UpBlock)
        for i in range(num_up):
            feature = up_block(feature.shape[-1] // 2, self.policy, name=f"up_{i}")(feature)
            mask_conv = conv(1, 7, dtype=dtype, name=f"occlusion_{num_from_hourglass + i}")
            masks.append(nn.sigmoid(mask_conv(feature)))
        return masks
