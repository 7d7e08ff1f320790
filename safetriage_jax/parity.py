"""Runs every TPSMM network on given frames and returns outputs in upstream's layout.

This is how a port is checked against PyTorch: the output names, shapes (NCHW) and dtypes
match what upstream's modules return, so arrays can be compared one to one.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax import outputs
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.policy import Policy
from safetriage_jax.models.tpsmm import TPSMM


def _nchw(x_BHWC):
    return jnp.transpose(x_BHWC, (0, 3, 1, 2))


def parity_outputs(config, variables, source_NCHW, driving_NCHW, warp_implementation=None):
    """{name: float32 numpy array} for source/driving frames in [0, 1] (NCHW), eval mode.

    Names: kp_source, kp_driving, bg_param (if the model has bg), and for tag 'nobg' (no
    background motion) and 'bg' (with it) {tag}_deformation, {tag}_contribution_maps,
    {tag}_occlusion_{i}, {tag}_prediction, {tag}_deformed; avd_kp when AVD weights exist.
    """
    model = TPSMM(config, Policy(warp_implementation=warp_implementation))
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
    """||actual - expected|| / ||expected|| over the whole tensor, in float64; for two trees of
    the same structure (variables, gradients), over all their leaves as one vector."""
    actual, expected = (np.concatenate([np.ravel(np.asarray(x, np.float64))
                                        for x in jax.tree.leaves(tree)])
                        for tree in (actual, expected))
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def compare(outputs, expected):
    """{name: relative error} for every output that ``expected`` also has."""
    return {name: relative_error(value, expected[name])
            for name, value in outputs.items() if name in expected}


def read_inputs(path):
    """{name: array} of a parity ``.npz``: ``source`` and ``driving`` frames (N, 3, S, S) of one
    shape, in [0, 1], and optionally expected outputs."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SafeTriageError(f"Inputs file {path} does not exist.")
    try:
        with np.load(path) as npz:
            inputs = dict(npz)
    except Exception as err:  # numpy raises several types for foreign files
        raise SafeTriageError(f"Could not read {path} as .npz ({type(err).__name__}).") from None
    for key in ("source", "driving"):
        if key not in inputs or inputs[key].ndim != 4 or inputs[key].shape[1] != 3:
            raise SafeTriageError(f"{path} needs '{key}' frames shaped (N, 3, H, W) in [0, 1].")
    source, driving = inputs["source"].shape, inputs["driving"].shape
    if source != driving or source[2] != source[3]:
        raise SafeTriageError(f"{path}: source {source} and driving {driving} must have the same "
                              "shape, with square frames (N, 3, S, S): the model runs at one size.")
    for key in ("source", "driving"):
        if not np.isfinite(inputs[key]).all():
            raise SafeTriageError(f"{path}: '{key}' holds NaN or infinite values.")
    return inputs


def run_parity(checkpoint, inputs_path, out_path, *, config_spec=None, overwrite=False):
    """Runs every network on the frames of ``inputs_path``, writes the outputs to ``out_path``
    (.npz, atomically, never over an input) and returns {output name: relative error} against
    the expected outputs the inputs file holds (empty when it holds none)."""
    from safetriage_jax.porting import load_weights
    inputs_of_run = (inputs_path, checkpoint, config_spec)
    outputs.check_output(out_path, "npz", inputs=inputs_of_run, overwrite=overwrite)
    inputs = read_inputs(inputs_path)
    config, variables = load_weights(checkpoint, config_spec,
                                     image_size=inputs["source"].shape[2])
    results = parity_outputs(config, variables, inputs["source"], inputs["driving"])
    with outputs.atomic_file(out_path, "npz", inputs=inputs_of_run,
                             overwrite=overwrite) as staging:
        with open(staging, "wb") as f:
            np.savez(f, **results, **{outputs.MARK_KEY: np.array(outputs.new_mark())})
    return results, compare(results, inputs)
