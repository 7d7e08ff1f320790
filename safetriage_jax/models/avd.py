"""AVDNetwork (animation via disentanglement): driving pose + source identity -> keypoints."""

import flax.linen as nn
import jax.numpy as jnp

from safetriage_jax.models.layers import batch_norm

HIDDEN = (256, 512, 1024)


def _mlp(x_BF, hidden, out_features, prefix, train):
    """Linear -> BatchNorm -> ReLU blocks, then Linear; call inside a compact method.

    Layers are named ``{prefix}_{index}`` with upstream nn.Sequential's indices (ReLUs count).
    """
    for i, width in enumerate(hidden):
        x_BF = nn.Dense(width, name=f"{prefix}_{3 * i}")(x_BF)
        x_BF = nn.relu(batch_norm(train, name=f"{prefix}_{3 * i + 1}")(x_BF))
    return nn.Dense(out_features, name=f"{prefix}_{3 * len(hidden)}")(x_BF)


class AVDNetwork(nn.Module):
    """Re-targets driving keypoints onto the source's identity (upstream's 'avd' mode)."""

    num_tps: int
    id_bottle_size: int = 64
    pose_bottle_size: int = 64

    @nn.compact
    def __call__(self, kp_source_BN2, kp_driving_BN2, train: bool = False):
        batch = kp_source_BN2.shape[0]
        size = self.num_tps * 5 * 2
        pose_emb = _mlp(kp_driving_BN2.reshape(batch, -1), HIDDEN, self.pose_bottle_size,
                        "pose_encoder", train)
        id_emb = _mlp(kp_source_BN2.reshape(batch, -1), HIDDEN, self.id_bottle_size,
                      "id_encoder", train)
        rec = _mlp(jnp.concatenate([pose_emb, id_emb], axis=-1), HIDDEN[::-1], size,
                   "decoder", train)
        return rec.reshape(batch, self.num_tps * 5, 2)
