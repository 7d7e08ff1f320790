"""The one way this project writes a file or a folder: whole or not at all, never onto an input.

Every output is first checked (:func:`check_output`): it is not an input (same resolved path or
same inode), a folder output does not contain an input or the working directory, an existing
output is replaced only when overwriting is asked for and only if it is something this tool
made (``recognise``), and the location is a writable folder. The content is then written to a
hidden ``.NAME.PID.partial`` beside the output and renamed over it at the end; leftovers of
runs that were killed (their process is gone) are removed on the next write. Staged files and
folders get the usual permissions (umask), not the private ones of ``tempfile``.
"""

import contextlib
import errno
import os
import pathlib
import shutil

from safetriage_jax.errors import SafeTriageError

PARTIAL = "partial"
MIN_FREE_BYTES = 1 << 20  # below this the output location counts as full


class OutputExistsError(SafeTriageError):
    """The output exists and overwriting it was not asked for."""


def _resolved(path):
    return pathlib.Path(path).expanduser().resolve()


def _same(a, b):
    """Same file by resolved path or by inode (hard links, bind mounts)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _existing_ancestor(path):
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return pathlib.Path("/")


def _partial_name(out, pid=None):
    return f".{out.name}.{pid or os.getpid()}.{PARTIAL}{out.suffix}"


def remove_stale_partials(out):
    """Deletes ``.NAME.PID.partial*`` beside ``out`` whose process is no longer running."""
    out = _resolved(out)
    if not out.parent.is_dir():
        return
    for leftover in out.parent.glob(f".{out.name}.*.{PARTIAL}*"):
        pid = leftover.name[len(out.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _running(pid):
    if pid == os.getpid():
        return False  # our own leftovers of an earlier, failed attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output(out, *, inputs=(), overwrite=False, folder=False, recognise=None,
                 need_bytes=0):
    """Checks that ``out`` may be written; returns its resolved path. Raises SafeTriageError.

    ``inputs``: paths the run reads or writes elsewhere (None ignored). ``recognise(path) -> bool``: whether
    an existing output is something this tool made (only those are ever replaced).
    ``need_bytes``: a lower bound on the output's size, checked against the free space.
    """
    out = _resolved(out)
    what = "folder" if folder else "file"
    for given in filter(None, inputs):
        source = _resolved(given)
        if source.exists() and _same(out, source):  # a missing input has nothing to lose
            raise SafeTriageError(f"The output {out} is also an input; choose another output path "
                                  "(an input is never overwritten).")
        if folder and source.is_relative_to(out):
            raise SafeTriageError(f"The output folder {out} contains the input {source}; choose "
                                  "another output folder.")
    if folder and pathlib.Path.cwd().resolve().is_relative_to(out):
        raise SafeTriageError(f"The output folder {out} is the working directory or one of its "
                              "parents; choose a new folder.")
    if out.exists() or out.is_symlink():
        if out.is_dir() != folder:
            raise SafeTriageError(f"{out} exists and is a {'file' if folder else 'folder'}; the "
                                  f"output must be a {what} path.")
        if folder and not any(out.iterdir()):
            pass  # an empty folder holds nothing to lose
        elif not overwrite:
            raise OutputExistsError(f"The output {what} {out} already exists; choose another path "
                                    "or ask for it to be overwritten.")
        elif recognise is not None and not recognise(out):
            raise SafeTriageError(f"{out} exists and is not a {what} this tool wrote, so it is "
                                  "not replaced; choose another output path.")
    location = _existing_ancestor(out.parent)
    if not location.is_dir():
        raise SafeTriageError(f"Cannot create {out}: {location} is a file, not a folder.")
    if not os.access(location, os.W_OK | os.X_OK):
        raise SafeTriageError(f"Cannot write {out}: the folder {location} is not writable; "
                              "choose another output location.")
    free = shutil.disk_usage(location).free
    if free < max(need_bytes, MIN_FREE_BYTES):
        raise SafeTriageError(f"Cannot write {out}: {location} has {free / 1e6:.1f} MB free, "
                              f"{max(need_bytes, MIN_FREE_BYTES) / 1e6:.1f} MB are needed.")
    return out


def _write_error(out, err):
    reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return SafeTriageError(f"Could not write {out}: {reason}; nothing was written.")


@contextlib.contextmanager
def atomic_file(out, **checks):
    """Yields a staging path beside ``out`` (same suffix); on success it becomes ``out``.

    ``checks``: the keyword arguments of :func:`check_output` (folder excepted).
    """
    out = check_output(out, **checks)
    with _staged(out, folder=False) as staging:
        yield staging
        if not staging.exists():
            raise SafeTriageError(f"Nothing was written, so {out} was not created.")


@contextlib.contextmanager
def atomic_directory(out, **checks):
    """Yields an empty staging folder beside ``out``; on success it replaces ``out`` whole."""
    out = check_output(out, folder=True, **checks)
    with _staged(out, folder=True) as staging:
        yield staging


@contextlib.contextmanager
def _staged(out, folder):
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(out, err) from None
    remove_stale_partials(out)
    staging = out.parent / _partial_name(out)
    _remove(staging)
    try:
        if folder:
            staging.mkdir()
        yield staging
        _replace(staging, out)
    except OSError as err:
        _remove(staging)
        raise _write_error(out, err) from None
    except BaseException:
        _remove(staging)
        raise


def _replace(staging, out):
    """Renames ``staging`` onto ``out``; an existing folder is moved aside, then deleted."""
    if staging.is_dir() and out.is_dir():
        old = out.parent / f".{out.name}.{os.getpid()}.old.{PARTIAL}"
        _remove(old)
        out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.replace(out)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def write_text(out, text, **checks):
    """Writes ``text`` to ``out`` atomically (see :func:`check_output` for ``checks``)."""
    with atomic_file(out, **checks) as staging:
        staging.write_text(text)
    return _resolved(out)
