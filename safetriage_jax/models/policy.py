"""How the networks run: the compute dtype of their layers, which blocks rematerialise, and
which grid-sample backend every warp uses.

One frozen :class:`Policy` is handed to every network. The precision rule it carries:

- convolutions, norms and activations of the generator, the dense-motion hourglass, the
  keypoint and background ResNets and VGG run in ``dtype`` (norm statistics in float32);
- keypoints, TPS solves, sampling grids, the softmax over transforms and loss reductions stay
  float32; parameters stay float32 (master weights) and are cast where a layer reads them.

Values cross between the two at module boundaries, with explicit casts. ``remat`` names a
``jax.checkpoint`` policy applied to each block (conv-norm-activation, residual, ResNet basic
block) and to VGG, trading backward-pass recomputation for activation memory.
``warp_implementation`` names the grid-sample backend of every warp (None: the op's default
for the platform); none of these is part of what a model is, so none is saved with it.
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
    """Compute precision (``float32`` | ``bfloat16``), remat policy (``REMAT_POLICIES``) and
    warp backend (a ``kernels.grid_sample.api.IMPLEMENTATIONS`` name, or None)."""

    precision: str = "float32"
    remat: str = "none"
    warp_implementation: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise SafeTriageError(f"Unknown precision {self.precision!r}; choose one of "
                                  f"{', '.join(PRECISIONS)}.")
        if self.remat not in REMAT_POLICIES:
            raise SafeTriageError(f"Unknown remat policy {self.remat!r}; choose one of "
                                  f"{', '.join(REMAT_POLICIES)}.")
        if self.warp_implementation is not None:
            from safetriage_jax.kernels.grid_sample import api
            known = sorted(set(api.IMPLEMENTATIONS) | set(api.UNAVAILABLE))
            if self.warp_implementation not in api.IMPLEMENTATIONS:
                why = (f" ({self.warp_implementation} is not available here: "
                       f"{api.UNAVAILABLE[self.warp_implementation]})"
                       if self.warp_implementation in api.UNAVAILABLE else "")
                raise SafeTriageError(f"Unknown warp_implementation {self.warp_implementation!r}; "
                                      f"choose one of {known}, or leave it unset{why}.")

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
