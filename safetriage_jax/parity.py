"""Runs every TPSMM network on given frames and returns outputs in upstream's layout.

This is how a port is checked against PyTorch: the output names, shapes (NCHW) and dtypes
match what upstream's modules return, so arrays can be compared one to one.
"""

import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax.models.tpsmm import TPSMM


def _nchw(x_BHWC):
    return jnp.transpose(x_BHWC, (0, 3, 1, 2))


def parity_outputs(config, variables, source_NCHW, driving_NCHW):
    """{name: float32 numpy array} for source/driving frames in [0, 1] (NCHW), eval mode.

    Names: kp_source, kp_driving, bg_param (if the model has bg), and for tag 'nobg' (no
    background motion) and 'bg' (with it) {tag}_deformation, {tag}_contribution_maps,
    {tag}_occlusion_{i}, {tag}_prediction, {tag}_deformed; avd_kp when AVD weights exist.
    """
    model = TPSMM(config)
    has_avd = "avd_network" in variables["params"]

    def run(variables, source_NCHW, driving_NCHW):
        source = jnp.transpose(source_NCHW, (0, 2, 3, 1))
        driving = jnp.transpose(driving_NCHW, (0, 2, 3, 1))
        kp_source = model.apply(variables, source, method=TPSMM.keypoints)
        kp_driving = model.apply(variables, driving, method=TPSMM.keypoints)
        out = {"kp_source": kp_source, "kp_driving": kp_driving}
        tags = [("nobg", None)]
        if config.bg:
            out["bg_param"] = model.apply(variables, source, driving, method=TPSMM.background)
            tags.append(("bg", out["bg_param"]))
        features = model.apply(variables, source, method=TPSMM.encode_source)
        for tag, bg_param in tags:
            motion = model.apply(variables, source, kp_driving, kp_source, bg_param,
                                 method=TPSMM.dense_motion)
            generated = model.apply(variables, features, source, motion, method=TPSMM.decode)
            out[f"{tag}_deformation"] = motion["deformation"]
            out[f"{tag}_contribution_maps"] = _nchw(motion["contribution_maps"])
            for i, mask in enumerate(motion["occlusion_map"]):
                out[f"{tag}_occlusion_{i}"] = _nchw(mask)
            out[f"{tag}_prediction"] = _nchw(generated["prediction"])
            out[f"{tag}_deformed"] = _nchw(generated["deformed"])
        if has_avd:
            out["avd_kp"] = model.apply(variables, kp_source, kp_driving, method=TPSMM.avd)
        return out

    with jax.default_matmul_precision("highest"):
        out = jax.jit(run)(variables, jnp.asarray(source_NCHW, jnp.float32),
                           jnp.asarray(driving_NCHW, jnp.float32))
    return {name: np.asarray(value, np.float32) for name, value in out.items()}


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| over the whole tensor."""
    expected = np.asarray(expected, np.float64)
    diff = np.linalg.norm(np.asarray(actual, np.float64) - expected)
    return float(diff / max(np.linalg.norm(expected), 1e-30))


def compare(outputs, expected):
    """{name: relative error} for every output that ``expected`` also has."""
    return {name: relative_error(value, expected[name])
            for name, value in outputs.items() if name in expected}
