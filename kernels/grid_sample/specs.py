"""Argument specs of the op, shared by the tests (tiny cases) and ``bench.py`` (model shapes).

A :class:`Case` names one call: image (B, H, W, C), grid (T*B, Ho, Wo, 2), dtype, padding,
alignment, and the kind of flow that makes the grid.
"""

import dataclasses

import numpy as np

from safetriage_jax.kernels.grid_sample.api import PADDING_MODES

FLOWS = ("random", "smooth", "borders")


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int                # image batch B
    repeats: int              # T: grids per image (grid batch T * B)
    height: int
    width: int
    channels: int
    out_h: int
    out_w: int
    dtype: str = "float32"    # the image's; grids are float32
    padding_mode: str = "zeros"
    align_corners: bool = True
    flow: str = "random"      # see make_grid
    name: str = ""            # what the shape is in the model (bench tables)

    def __str__(self):
        text = (f"{self.batch}x{self.repeats}-{self.height}x{self.width}x{self.channels}"
                f"-to-{self.out_h}x{self.out_w}-{self.dtype}-{self.padding_mode}"
                f"-ac{int(self.align_corners)}-{self.flow}")
        return f"{self.name}:{text}" if self.name else text

    @property
    def image_shape(self):
        return (self.batch, self.height, self.width, self.channels)

    @property
    def grid_shape(self):
        return (self.batch * self.repeats, self.out_h, self.out_w, 2)


def make_grid(case, rng):
    """(T*B, Ho, Wo, 2) float32 grid of the case's flow kind:

    - "random": uniform in [-1.25, 1.25], so every padding rule and reflection is exercised;
    - "smooth": an identity grid plus a smooth displacement of up to ~0.15 (TPS-like motion);
    - "borders": exact pixel centres, the image's edges and points beyond them, where the
      bilinear taps and the clamped-gradient branches meet.
    """
    shape = case.grid_shape
    if case.flow == "random":
        return rng.uniform(-1.25, 1.25, shape).astype(np.float32)
    if case.flow == "smooth":
        ys, xs = np.meshgrid(np.linspace(-1, 1, case.out_h), np.linspace(-1, 1, case.out_w),
                             indexing="ij")
        base = np.stack([xs, ys], -1)[None]
        phase = rng.uniform(0, 2 * np.pi, (shape[0], 1, 1, 2))
        freq = rng.uniform(0.5, 2.0, (shape[0], 1, 1, 2))
        shift = 0.15 * np.sin(freq * np.pi * base[..., ::-1] + phase)
        return (base + shift).astype(np.float32)
    if case.flow == "borders":
        def values(size):
            centres = np.linspace(-1, 1, size)
            edges = np.array([-1 - 1 / size, 1 + 1 / size, -1.5, 1.5, 0.0])
            return np.concatenate([centres, edges]).astype(np.float32)
        x = rng.choice(values(case.width), shape[:-1])
        y = rng.choice(values(case.height), shape[:-1])
        return np.stack([x, y], -1).astype(np.float32)
    raise ValueError(f"Unknown flow {case.flow!r}; one of {FLOWS}.")


def make_inputs(case, rng):
    """(image, grid, output cotangent) as numpy arrays; the image in the case's dtype."""
    import jax.numpy as jnp
    image = rng.standard_normal(case.image_shape).astype(np.float32)
    image = np.asarray(jnp.asarray(image, case.dtype))
    cotangent = rng.standard_normal(case.grid_shape[:-1] + (case.channels,)).astype(np.float32)
    return image, make_grid(case, rng), cotangent


def _modes():
    return [(mode, ac) for mode in PADDING_MODES for ac in (True, False)]


# Tiny cases for the per-backend tests: every padding mode and alignment, both dtypes,
# C = 1, 3, 64, 130, odd sizes, out-of-range and on-border coordinates, T x B grid batches.
TEST_CASES = tuple(
    [Case(2, 2, 9, 13, 3, 7, 11, padding_mode=m, align_corners=ac) for m, ac in _modes()]
    + [Case(1, 3, 6, 7, 2, 6, 7, padding_mode=m, align_corners=ac, flow="borders")
       for m, ac in _modes()]
    + [
        Case(2, 1, 5, 8, 1, 9, 4),
        Case(1, 2, 16, 16, 64, 16, 16, flow="smooth"),
        Case(1, 1, 7, 5, 130, 3, 6, padding_mode="border", align_corners=False),
        Case(2, 2, 9, 13, 3, 7, 11, dtype="bfloat16", padding_mode="reflection"),
        Case(1, 2, 11, 10, 64, 5, 9, dtype="bfloat16", flow="smooth"),
        Case(1, 1, 6, 9, 130, 4, 4, dtype="bfloat16", padding_mode="border", flow="borders"),
    ])


def _model_cases(batch, repeats, prefix):
    """The warps of one vox-256 training step (batch pairs) or animate call (one shared source,
    ``repeats`` frames): dense motion, the generator's four levels, the deformed source."""
    return [
        Case(batch, repeats * 11, 64, 64, 3, 64, 64, name=f"{prefix}dense-motion"),
        Case(batch, repeats, 32, 32, 512, 32, 32, name=f"{prefix}gen-32"),
        Case(batch, repeats, 64, 64, 256, 64, 64, name=f"{prefix}gen-64"),
        Case(batch, repeats, 128, 128, 128, 128, 128, name=f"{prefix}gen-128"),
        Case(batch, repeats, 256, 256, 64, 256, 256, name=f"{prefix}gen-256"),
        Case(batch, repeats, 256, 256, 3, 256, 256, name=f"{prefix}deformed"),
    ]


# The model's real shapes: training at batch 28 (plus the equivariance loss's reflection
# warp), animate at 32 frames per call over one source. Flows are smooth, as the model's are.
BENCH_CASES = tuple(
    [dataclasses.replace(c, flow="smooth") for c in _model_cases(28, 1, "train/")]
    + [Case(28, 1, 256, 256, 3, 256, 256, padding_mode="reflection", flow="smooth",
            name="train/equivariance")]
    + [dataclasses.replace(c, flow="smooth") for c in _model_cases(1, 32, "animate/")])
