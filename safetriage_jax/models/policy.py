"""How the networks run: the compute dtype of their layers and which blocks rematerialise.

One frozen :class:`Policy` is handed to every network. The precision rule it carries:

- convolutions, norms and activations of the generator, the dense-motion hourglass, the
  keypoint and background ResNets and VGG run in ``dtype`` (norm statistics in float32);
- keypoints, TPS solves, sampling grids, the softmax over transforms and loss reductions stay
  float32; parameters stay float32 (master weights) and are cast where a layer reads them.

Values cross between the two at module boundaries, with explicit casts. ``remat`` names a
``jax.checkpoint`` policy applied to each block (conv-norm-activation, residual, ResNet basic
block) and to VGG, trading backward-pass recomputation for activation memory.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from safetriage_jax.errors import SafeTriageError

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONV_OUTPUT = "conv_output"  # checkpoint_name of every block's convolution outputs
# What each block keeps for the backward pass (None: no rematerialisation, keep everything).
REMAT_POLICIES = {
    "none": None,
    # Keep only the conv outputs; norms and activations are recomputed (cheap, elementwise).
    "conv_outputs": jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT),
    # Keep only each block's input; the whole block (its convs too) is recomputed.
    "blocks": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """Compute precision (``float32`` | ``bfloat16``) and remat policy (``REMAT_POLICIES``)."""

    precision: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise SafeTriageError(f"Unknown precision {self.precision!r}; choose one of "
                                  f"{', '.join(PRECISIONS)}.")
        if self.remat not in REMAT_POLICIES:
            raise SafeTriageError(f"Unknown remat policy {self.remat!r}; choose one of "
                                  f"{', '.join(REMAT_POLICIES)}.")

    @property
    def dtype(self):
        """The compute dtype of convolutions, norms and activations."""
        return PRECISIONS[self.precision]

    def block(self, module_cls, static_argnums=()):
        """``module_cls``, wrapped in ``nn.remat`` under this policy (same variable names).

        ``static_argnums`` counts ``self`` as 0, as ``nn.remat`` does.
        """
        if self.remat == "none":
            return module_cls
        return nn.remat(module_cls, policy=REMAT_POLICIES[self.remat],
                        static_argnums=static_argnums)

    def function(self, fn):
        """A pure function ``fn``, wrapped in ``jax.checkpoint`` under this policy."""
        if self.remat == "none":
            return fn
        return jax.checkpoint(fn, policy=REMAT_POLICIES[self.remat])


def conv_output(x):
    """Tags a convolution's output so the ``conv_outputs`` policy keeps it (identity otherwise)."""
    return checkpoint_name(x, CONV_OUTPUT)
