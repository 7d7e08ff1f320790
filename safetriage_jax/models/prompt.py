"""Conditional diffusion prompt generator: visual prompt tuning for a frozen TPSMM.

A small U-Net denoiser, conditioned on the driving frame, the patient's reference frame and the
identity image, is sampled with a few deterministic DDIM steps into a *prompt*: a bounded
residual added to the driving frames before the frozen backbone sees them. The sampler is a
plain differentiable function (a short unrolled loop), so it is jitted and trained end to end
through the backbone. The denoiser predicts the clean prompt (x0) and its output layer starts
at zero, so an untrained generator gives a zero prompt: training starts from the plain backbone.
Every frame starts from the same noise, so a video's prompts vary only with its frames.
"""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from safetriage_jax.errors import SafeTriageError


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    resolution: int = 64  # the prompt is generated at this size, then resized to the model's
    widths: tuple = (32, 64, 128)  # U-Net channels per level (each level halves the size)
    num_sample_steps: int = 4  # DDIM steps when sampling
    num_timesteps: int = 1000  # the diffusion time grid (cosine schedule)
    amplitude: float = 0.15  # prompt = amplitude * tanh(x0): a bounded change of the frame
    noise_seed: int = 0  # the starting noise shared by every frame

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SafeTriageError(f"Unknown prompt config keys {unknown}; known: {sorted(known)}.")
        values = dict(values)
        if "widths" in values:
            values["widths"] = tuple(values["widths"])
        config = cls(**values)
        if config.resolution % 2 ** (len(config.widths) - 1):
            raise SafeTriageError(f"Prompt resolution {config.resolution} must be divisible by "
                                  f"2^{len(config.widths) - 1} (one halving per extra width).")
        return config


def alpha_bar(t, num_timesteps):
    """Cosine noise schedule (Nichol & Dhariwal 2021): signal fraction at integer time t."""
    s = 0.008
    f = lambda u: jnp.cos((u / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return f(jnp.asarray(t, jnp.float32)) / f(0.0)


def timestep_embedding(t_B, dim):
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)
    angles = t_B.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


class TimeResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding as a per-channel scale and shift between."""

    features: int

    @nn.compact
    def __call__(self, x_BHWC, emb_BE):
        h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(min(8, x_BHWC.shape[-1]))(x_BHWC)))
        scale, shift = jnp.split(nn.Dense(2 * self.features)(nn.silu(emb_BE)), 2, -1)
        h = nn.GroupNorm(min(8, self.features))(h) * (1 + scale[:, None, None]) + shift[:, None, None]
        h = nn.Conv(self.features, (3, 3))(nn.silu(h))
        skip = x_BHWC if x_BHWC.shape[-1] == self.features else nn.Conv(self.features, (1, 1))(x_BHWC)
        return skip + h


class PromptUNet(nn.Module):
    """Predicts the clean prompt x0 (B, R, R, 3) from a noisy one, the time and the condition."""

    config: PromptConfig

    @nn.compact
    def __call__(self, noisy_BRR3, t_B, condition_BRRC):
        widths = self.config.widths
        emb = timestep_embedding(t_B, 4 * widths[0])
        emb = nn.Dense(4 * widths[0])(nn.silu(nn.Dense(4 * widths[0])(emb)))
        h = nn.Conv(widths[0], (3, 3))(jnp.concatenate([noisy_BRR3, condition_BRRC], -1))
        skips = []
        for level, width in enumerate(widths):
            h = TimeResBlock(width)(h, emb)
            skips.append(h)
            if level < len(widths) - 1:
                h = nn.Conv(width, (3, 3), strides=2)(h)
        h = TimeResBlock(widths[-1])(h, emb)
        for level in reversed(range(len(widths))):
            h = TimeResBlock(widths[level])(jnp.concatenate([h, skips[level]], -1), emb)
            if level > 0:
                batch, height, width, channels = h.shape
                h = jax.image.resize(h, (batch, 2 * height, 2 * width, channels), "nearest")
                h = nn.Conv(widths[level - 1], (3, 3))(h)
        h = nn.silu(nn.GroupNorm(min(8, widths[0]))(h))
        return nn.Conv(3, (3, 3), kernel_init=nn.initializers.zeros)(h)


def condition(driving_BHW3, reference_BHW3, identity_BHW3, resolution):
    """The denoiser's condition: the three images at the prompt resolution, in [-1, 1]."""
    def small(x):
        x = jnp.broadcast_to(x, driving_BHW3.shape)
        return jax.image.resize(x, (x.shape[0], resolution, resolution, 3), "linear",
                                antialias=True) * 2 - 1
    return jnp.concatenate([small(driving_BHW3), small(reference_BHW3), small(identity_BHW3)], -1)


def sample_times(config):
    """The DDIM time points, from the noisiest to 0."""
    steps = config.num_sample_steps
    return [round((config.num_timesteps - 1) * (1 - i / max(steps - 1, 1))) for i in range(steps)]


def sample_x0(params, condition_BRRC, config):
    """Deterministic DDIM (eta = 0) from the shared starting noise -> the clean prompt x0."""
    net = PromptUNet(config)
    batch = condition_BRRC.shape[0]
    noise = jax.random.normal(jax.random.PRNGKey(config.noise_seed),
                              (1, config.resolution, config.resolution, 3))
    x = jnp.broadcast_to(noise, (batch,) + noise.shape[1:])
    times = sample_times(config)
    for i, t in enumerate(times):
        signal = alpha_bar(t, config.num_timesteps)
        x0 = net.apply({"params": params}, x, jnp.full((batch,), t), condition_BRRC)
        if i + 1 < len(times):
            eps = (x - jnp.sqrt(signal) * x0) / jnp.sqrt(1 - signal)
            next_signal = alpha_bar(times[i + 1], config.num_timesteps)
            x = jnp.sqrt(next_signal) * x0 + jnp.sqrt(1 - next_signal) * eps
    return x0


def prompt_image(x0_BRR3, size, amplitude):
    """The bounded residual at the backbone's resolution."""
    residual = amplitude * jnp.tanh(x0_BRR3)
    return jax.image.resize(residual, (x0_BRR3.shape[0], size, size, 3), "linear")


def prompted(params, config, driving_BHW3, reference_BHW3, identity_BHW3):
    """Driving frames with their prompt added: what the frozen backbone sees. Returns
    (prompted frames, x0) — x0 feeds the denoising loss in training."""
    x0 = sample_x0(params, condition(driving_BHW3, reference_BHW3, identity_BHW3,
                                     config.resolution), config)
    return driving_BHW3 + prompt_image(x0, driving_BHW3.shape[1], config.amplitude), x0


def denoising_loss(params, config, x0_BRR3, condition_BRRC, rng):
    """The diffusion loss: recover x0 from it noised at a random time (x0-prediction MSE)."""
    t_key, noise_key = jax.random.split(rng)
    batch = x0_BRR3.shape[0]
    t = jax.random.randint(t_key, (batch,), 0, config.num_timesteps)
    signal = alpha_bar(t, config.num_timesteps)[:, None, None, None]
    noisy = jnp.sqrt(signal) * x0_BRR3 + jnp.sqrt(1 - signal) * jax.random.normal(noise_key, x0_BRR3.shape)
    predicted = PromptUNet(config).apply({"params": params}, noisy, t, condition_BRRC)
    return jnp.mean((predicted - x0_BRR3) ** 2)


def init_params(config, rng):
    """Fresh denoiser parameters (jitted: one compilation instead of one per layer op)."""
    r = config.resolution
    init = lambda key: PromptUNet(config).init(key, jnp.zeros((1, r, r, 3)), jnp.zeros((1,), jnp.int32),
                                               jnp.zeros((1, r, r, 9)))["params"]
    return jax.jit(init)(rng)
