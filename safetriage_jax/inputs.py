"""Checks on input paths, with messages that say what the path really is."""

import pathlib
import stat

from safetriage_jax.errors import SafeTriageError


def require_file(path, what, hint=""):
    """Raises unless ``path`` is a regular file: it does not exist, is a folder, or is a
    device, pipe or socket (``/dev/zero`` would be read forever). ``hint``: how to fix it."""
    path = pathlib.Path(path).expanduser()
    hint = f" {hint}" if hint else ""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SafeTriageError(f"{what} {path} does not exist.{hint}") from None
    except OSError as err:
        raise SafeTriageError(f"{what} {path} cannot be read ({err.strerror}).{hint}") from None
    if stat.S_ISDIR(mode):
        raise SafeTriageError(f"{what} {path} is a folder, not a file.{hint}")
    if not stat.S_ISREG(mode):
        raise SafeTriageError(f"{what} {path} is not a regular file (a device, pipe or "
                              f"socket).{hint}")
    return path
