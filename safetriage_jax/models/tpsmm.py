"""TPSMM: the five networks of the Thin-Plate Spline Motion Model as one Flax module.

Variables live in three collections: ``params`` (trained), ``batch_stats`` (BatchNorm running
statistics of the ResNet-18 encoders and the AVD MLPs) and ``buffers`` (the anti-alias
kernel). Images are NHWC float32 in [0, 1]; keypoints (B, num_tps * 5, 2) in [-1, 1].
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from safetriage_jax.models.avd import AVDNetwork
from safetriage_jax.models.config import TPSMMConfig
from safetriage_jax.models.dense_motion import DenseMotionNetwork
from safetriage_jax.models.inpainting import InpaintingNetwork
from safetriage_jax.models.keypoints import BGMotionPredictor, KPDetector
from safetriage_jax.models.policy import Policy

SUBMODULES = ("kp_detector", "bg_predictor", "dense_motion_network", "inpainting_network",
              "avd_network")


class TPSMM(nn.Module):
    """Keypoint detector, background predictor, dense motion, inpainting and AVD networks.

    ``policy`` sets the compute dtype, remat and warp backend of the image networks (see
    ``models.policy``); the AVD MLPs work on keypoints and stay float32.
    """

    config: TPSMMConfig
    policy: Policy = Policy()

    def setup(self):
        cfg, policy = self.config, self.policy
        self.kp_detector = KPDetector(cfg.num_tps, cfg.encoder_width, policy)
        if cfg.bg:
            self.bg_predictor = BGMotionPredictor(cfg.encoder_width, policy)
        self.dense_motion_network = DenseMotionNetwork(
            num_tps=cfg.num_tps, block_expansion=cfg.dense_block_expansion,
            max_features=cfg.dense_max_features, num_blocks=cfg.dense_num_blocks,
            scale_factor=cfg.scale_factor, multi_mask=cfg.multi_mask,
            kp_variance=cfg.kp_variance, policy=policy)
        self.inpainting_network = InpaintingNetwork(
            num_channels=cfg.num_channels, block_expansion=cfg.generator_block_expansion,
            max_features=cfg.generator_max_features, num_down_blocks=cfg.num_down_blocks,
            multi_mask=cfg.multi_mask, policy=policy)
        self.avd_network = AVDNetwork(cfg.num_tps, cfg.id_bottle_size, cfg.pose_bottle_size)

    def __call__(self, source_BHWC, driving_BHWC, train: bool = False, dropout_p=0.0,
                 dropout_rng=None):
        """Reconstructs ``driving`` from ``source`` (the training forward); also runs AVD."""
        kp_source = self.keypoints(source_BHWC, train)
        kp_driving = self.keypoints(driving_BHWC, train)
        bg_param = self.background(source_BHWC, driving_BHWC, train) if self.config.bg else None
        motion = self.dense_motion(source_BHWC, kp_driving, kp_source, bg_param, dropout_p,
                                   dropout_rng)
        out = self.inpainting_network(source_BHWC, motion)
        out.update(kp_source=kp_source, kp_driving=kp_driving, bg_param=bg_param,
                   dense_motion=motion,
                   avd_kp=self.avd(jax.lax.stop_gradient(kp_source),
                                   jax.lax.stop_gradient(kp_driving), train))
        return out

    def keypoints(self, image_BHWC, train: bool = False):
        return self.kp_detector(image_BHWC, train)

    def background(self, source_BHWC, driving_BHWC, train: bool = False):
        return self.bg_predictor(source_BHWC, driving_BHWC, train)

    def dense_motion(self, source_BHWC, kp_driving, kp_source, bg_param=None, dropout_p=0.0,
                     dropout_rng=None):
        return self.dense_motion_network(source_BHWC, kp_driving, kp_source, bg_param,
                                         dropout_p, dropout_rng)

    def encode_source(self, source_BHWC):
        return self.inpainting_network.encode(source_BHWC)

    def decode(self, feature_maps, source_BHWC, motion):
        return self.inpainting_network.decode(feature_maps, source_BHWC, motion)

    def avd(self, kp_source, kp_driving, train: bool = False):
        return self.avd_network(kp_source, kp_driving, train)


def initialize(config: TPSMMConfig, rng, batch=1):
    """Random variables for ``config`` (dict with params, batch_stats, buffers); traceable."""
    image = jnp.zeros((batch, config.image_size, config.image_size, config.num_channels))
    return dict(TPSMM(config).init(rng, image, image))


def init_variables(config: TPSMMConfig, rng, batch=1):
    """:func:`initialize`, compiled."""
    return jax.jit(initialize, static_argnums=(0, 2))(config, rng, batch)


def variable_shapes(config: TPSMMConfig):
    """The variables' structure, shapes and dtypes, without allocating or computing them."""
    return jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0)))
