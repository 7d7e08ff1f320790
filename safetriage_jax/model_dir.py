"""Saving and loading ported/trained TPSMM weights (and prompt generators) without PyTorch.

A model directory holds ``config.json`` (the :class:`TPSMMConfig`) and the variables either as
an orbax checkpoint (``variables/``, the default) or as ``model.safetensors``, or both.
"""

import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from safetriage_jax import outputs
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.config import TPSMMConfig
from safetriage_jax.models.tpsmm import variable_shapes

CONFIG_FILE = "config.json"
ORBAX_DIR = "variables"
SAFETENSORS_FILE = "model.safetensors"
PROMPT_PARAMS_DIR = "params"



def _write_directory(out_dir, overwrite, fill, inputs=(), tree=None):
    """Creates ``out_dir`` whole or not at all; an existing one is replaced only if it carries
    this tool's mark (outputs.is_ours). ``tree``: the arrays to write (their size must fit)."""
    size = sum(np.asarray(v).nbytes for v in jax.tree.leaves(tree)) if tree is not None else 0
    with outputs.atomic_directory(out_dir, overwrite=overwrite, inputs=inputs,
                                  need_bytes=size) as staging:
        fill(staging)
    return pathlib.Path(out_dir).expanduser().resolve()


def _save_tree(directory, tree):
    # This process alone: in a multi-process run only the primary writes model directories,
    # and orbax's default barriers would wait for every process.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler(),  # synchronous: a failed
                              multiprocessing_options=alone) as checkpointer:  # write ends here
            checkpointer.save(directory, args=ocp.args.StandardSave(jax.tree.map(np.asarray, tree)))
    except Exception as err:  # orbax reports a failed write as a ValueError with the OS code
        code = outputs.os_error_code(err)
        if code:
            raise OSError(code, os.strerror(code)) from None
        raise


def _restore_tree(directory, what):
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(pathlib.Path(directory).absolute())
    except Exception as err:  # orbax raises several types for damaged directories
        raise SafeTriageError(f"Could not read the orbax checkpoint in {directory} "
                              f"({type(err).__name__}); {what}.") from None


def save_model(out_dir, config: TPSMMConfig, variables, *, safetensors=False, overwrite=False,
               inputs=()):
    """Writes a model directory (config.json + variables), whole or not at all; ``inputs``: files
    the weights came from (never overwritten or deleted)."""
    check_finite(variables, "The weights to save")
    def fill(staging):
        (staging / CONFIG_FILE).write_text(config.to_json())
        _save_tree(staging / ORBAX_DIR, variables)
        if safetensors:
            from safetensors.numpy import save_file
            flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, variables), sep="/")
            save_file({k: np.ascontiguousarray(v) for k, v in flat.items()},
                      str(staging / SAFETENSORS_FILE))
    return _write_directory(out_dir, overwrite, fill, inputs, variables)


def save_prompt(out_dir, config, params, *, info=None, overwrite=True):
    """Writes a prompt-generator directory: config.json (PromptConfig), params/, info.json."""
    def fill(staging):
        (staging / CONFIG_FILE).write_text(config.to_json())
        (staging / "info.json").write_text(json.dumps(info or {}, indent=2))
        _save_tree(staging / PROMPT_PARAMS_DIR, params)
    return _write_directory(out_dir, overwrite, fill, tree=params)


def load_prompt(prompt_dir):
    """(PromptConfig, params) from a directory written by ``safetriage train-prompt``."""
    from safetriage_jax.models.prompt import PromptConfig, init_params
    prompt_dir = pathlib.Path(prompt_dir)
    if not (prompt_dir / PROMPT_PARAMS_DIR).is_dir() or not (prompt_dir / CONFIG_FILE).is_file():
        raise SafeTriageError(f"{prompt_dir} is not a prompt-generator directory (it needs "
                              f"{CONFIG_FILE} and {PROMPT_PARAMS_DIR}/); make one with "
                              "`safetriage train-prompt`.")
    try:
        config = PromptConfig.from_dict(json.loads((prompt_dir / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise SafeTriageError(f"{prompt_dir / CONFIG_FILE} is not a prompt config ({err}).") from None
    params = _restore_tree(prompt_dir / PROMPT_PARAMS_DIR, "train the prompt generator again")
    expected = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    if jax.tree.structure(expected) != jax.tree.structure(params) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params))):
        raise SafeTriageError(f"The parameters in {prompt_dir} do not fit its config.json.")
    return config, params


def require_model_directory(path):
    """Raises unless ``path`` is a folder (naming what it is instead: an upstream file, ...)."""
    path = pathlib.Path(path)
    if path.is_file():
        kind = ("an upstream PyTorch checkpoint" if path.name.endswith((".pth", ".pth.tar", ".tar"))
                else "a file")
        raise SafeTriageError(f"{path} is {kind}, but a model directory is needed here; make one "
                              "from it with `safetriage port-weights`.")
    if not path.is_dir():
        raise SafeTriageError(f"Model directory {path} does not exist; make one with "
                              "`safetriage port-weights`.")


def load_config(model_dir) -> TPSMMConfig:
    path = pathlib.Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise SafeTriageError(
            f"{model_dir} is not a safetriage model directory (no {CONFIG_FILE}). Make one from "
            "an upstream checkpoint with `safetriage port-weights`.")
    try:
        return TPSMMConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise SafeTriageError(f"{path} is corrupt ({err}); port the weights again.") from None


def load_model(model_dir):
    """Returns (config, variables) from a model directory, checking every shape (how to run
    the model, e.g. its warp backend, is a ``models.policy.Policy`` of the caller's)."""
    model_dir = pathlib.Path(model_dir)
    require_model_directory(model_dir)
    config = load_config(model_dir)
    if (model_dir / ORBAX_DIR).is_dir():
        variables = _restore_tree(model_dir / ORBAX_DIR, "port the weights again")
    elif (model_dir / SAFETENSORS_FILE).is_file():
        from safetensors.numpy import load_file
        try:
            flat = load_file(str(model_dir / SAFETENSORS_FILE))
        except Exception as err:
            raise SafeTriageError(f"Could not read {model_dir / SAFETENSORS_FILE} ({err}); port "
                                  "the weights again.") from None
        variables = traverse_util.unflatten_dict(flat, sep="/")
    else:
        raise SafeTriageError(f"{model_dir} has no weights ({ORBAX_DIR}/ or {SAFETENSORS_FILE}).")
    check_variables(variables, config)
    check_finite(variables, f"The weights in {model_dir}")
    return config, variables


def check_variables(variables, config: TPSMMConfig):
    """Raises if ``variables`` do not fit ``config`` (names the first mismatch)."""
    expected = traverse_util.flatten_dict(variable_shapes(config), sep="/")
    got = traverse_util.flatten_dict(dict(variables), sep="/")
    for key, shape_dtype in expected.items():
        if key not in got:
            if "/avd_network/" in key:
                continue  # optional: checkpoints without AVD still animate in other modes
            raise SafeTriageError(f"Weights do not match the config: {key} is missing.")
        if tuple(got[key].shape) != tuple(shape_dtype.shape):
            raise SafeTriageError(f"Weights do not match the config at {key}: shape "
                                  f"{tuple(got[key].shape)}, config needs {tuple(shape_dtype.shape)}.")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise SafeTriageError(f"Weights do not match the config: {extra[0]} is not in the model.")


def check_finite(variables, what):
    """Raises if any tensor holds NaN or infinity (such weights animate a black video)."""
    for key, value in traverse_util.flatten_dict(dict(variables), sep="/").items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            raise SafeTriageError(f"{what} are damaged: {key} holds {bad} NaN or infinite "
                                  "value(s). Use an intact checkpoint (or retrain).")
