"""Config files: finding ``configs/*.py``, loading their ``get_config()``, and the
``key=value`` overrides every config and the CLI accept."""

import pathlib

from safetriage_jax.errors import SafeTriageError


PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]  # holds configs/ (editable install)
CONFIGS_DIR = PROJECT_ROOT / "configs"


def locate_config(path):
    """The Python config file to run. A bare name (``train.py``) is looked up in the project's
    own configs/ only, never in the working directory; a path (``configs/train.py``,
    ``./mine.py``, ``/abs/x.py``) is taken as given, and ``configs/NAME.py`` falls back to the
    project's. Only ``.py`` files are run."""
    text = str(path)
    path = pathlib.Path(text).expanduser()
    if path.suffix != ".py":
        raise SafeTriageError(f"Config {text!r} is not a Python config: pass NAME.py (one of "
                              f"{', '.join(sorted(p.name for p in CONFIGS_DIR.glob('*.py')))}), "
                              "a path to a .py file, a preset name or an upstream .yaml.")
    bare = "/" not in text  # ``train.py``; ``./train.py`` is a path in the working directory
    if bare:  # a bare name: the project's configs only
        candidates = [CONFIGS_DIR / path.name]
    else:
        candidates = [path]
        if not path.is_absolute() and path.parent == pathlib.Path("configs"):
            candidates.append(CONFIGS_DIR / path.name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = (f"in {CONFIGS_DIR} (a bare name is looked up only there; write ./{path.name} for "
             "a file in the working directory)") if bare else \
        f"(nor in {CONFIGS_DIR})" if len(candidates) > 1 else ""
    raise SafeTriageError(f"Config file {text} does not exist {where}".rstrip() + ".")


def load_python_config(spec):
    """The ConfigDict of ``path/to/file.py[:arg]`` (its ``get_config(arg)``)."""
    import importlib.util

    path, _, arg = str(spec).partition(":")
    path = locate_config(path)
    module_spec = importlib.util.spec_from_file_location(f"_safetriage_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # a syntax error or a failing import in the user's config file
        raise SafeTriageError(f"Config file {path} could not be loaded ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}).") from None
    if not callable(getattr(module, "get_config", None)):
        raise SafeTriageError(f"Config file {path} has no get_config() function.")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise SafeTriageError(f"Config {spec}: {message}") from None


TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def split_config_arg(arg, default):
    """``VARIANT[,key=value,...]`` -> (variant, [overrides]); an empty variant is ``default``."""
    variant, *overrides = str(arg).split(",")
    return variant or default, [o for o in overrides if o]


def apply_overrides(c, overrides):
    """Applies ``a.b=value`` overrides (see :func:`parse_value`); raises ValueError naming the
    known keys when a key does not exist, or the expected type when a value does not parse."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"Override {override!r} is not key=value.")
        *parents, leaf = key.strip().split(".")
        node = c
        for depth, name in enumerate([*parents, leaf]):
            if not hasattr(node, "keys") or name not in node:
                known = sorted(node.keys()) if hasattr(node, "keys") else []
                where = ".".join(parents[:depth]) or "the config"
                raise ValueError(f"Unknown key {key!r}: {where} has no {name!r}; known keys: "
                                 f"{', '.join(known)}.")
            if depth < len(parents):
                node = node[name]
        try:
            node[leaf] = parse_value(node[leaf], text.strip())
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None


def parse_value(current, text):
    """``text`` parsed as the type of ``current``: booleans true/false/1/0/yes/no, integers
    without a fraction, tuples as ``1;2;3``, optional strings with ``none`` to unset."""
    if current is None or isinstance(current, str):
        return None if current is None and text.lower() in ("", "none") else text
    if isinstance(current, bool):
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ValueError(f"expected a boolean (true/false/1/0/yes/no), got {text!r}.")
    if isinstance(current, tuple):
        if not text:
            return ()
        kind = type(current[0]) if current else str
        return tuple(parse_value(kind(), part.strip()) if kind is not str else part
                     for part in text.split(";"))
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}.") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}.") from None
    if hasattr(current, "keys"):
        raise ValueError(f"is a group of keys ({', '.join(sorted(current.keys()))}); set one of "
                         "them, e.g. key.sub=value.")
    raise ValueError(f"cannot be set from text (it is a {type(current).__name__}).")


# Training settings: upper bounds a real run stays far below (a typo would otherwise run out
# of memory after minutes of data preparation).
TRAIN_LIMITS = {"model.image_size": (32, 1024), "data.size": (32, 1024),
                "train.batch_size": (1, 4096), "train.num_steps": (0, 10 ** 8),
                "train.num_epochs": (0, 10 ** 6), "train.micro_batches": (1, 4096)}


def check_limits(c, limits):
    """Raises ValueError naming the first ``a.b`` key of ConfigDict ``c`` outside its range."""
    for key, (low, high) in limits.items():
        node = c
        for name in key.split("."):
            node = node[name] if hasattr(node, "keys") and name in node else None
        if node is not None and not low <= node <= high:
            raise ValueError(f"{key} must be from {low} to {high} (got {node}).")
