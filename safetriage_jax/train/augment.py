"""On-device colour jitter of (source, driving) pairs with dm-pix: both frames of a pair get the
same random brightness, contrast, saturation and hue change (upstream's video-consistent jitter)."""

import dm_pix as pix
import jax
import jax.numpy as jnp


def color_jitter(rng, pair_B2HWC, brightness, contrast, saturation, hue):
    """Factors drawn per pair: brightness/contrast/saturation x U[1-v, 1+v], hue shift U[-h, h]."""
    def jitter_one(key, pair_2HWC):
        keys = jax.random.split(key, 4)
        factor = lambda k, v: jax.random.uniform(k, (), minval=1 - v, maxval=1 + v)
        pair_2HWC = jnp.clip(pair_2HWC * factor(keys[0], brightness), 0, 1)
        pair_2HWC = jnp.clip(pix.adjust_contrast(pair_2HWC, factor(keys[1], contrast)), 0, 1)
        pair_2HWC = jnp.clip(pix.adjust_saturation(pair_2HWC, factor(keys[2], saturation)), 0, 1)
        shift = jax.random.uniform(keys[3], (), minval=-hue, maxval=hue)
        return jnp.clip(pix.adjust_hue(pair_2HWC, shift), 0, 1)

    keys = jax.random.split(rng, pair_B2HWC.shape[0])
    return jax.vmap(jitter_one)(keys, pair_B2HWC)
