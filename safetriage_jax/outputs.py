"""The one way this project writes a file or a folder: whole or not at all, never onto an input,
and never over anything it did not make.

Every output is first checked (:func:`check_output`): its name has an extension the writer makes
(:data:`EXTENSIONS`) and fits the file system, it is not an input (same resolved path or same
inode), a folder output does not contain an input or the working directory, an existing output
is replaced only when overwriting is asked for **and it carries this tool's mark**, and the
location is a writable folder. The content is written to a hidden ``.NAME.PID.partial`` beside
the output and renamed at the end; the rename refuses a target that appeared meanwhile.
Leftovers of runs that were killed (their process is gone) are removed by the next write in that
folder. Staged files and folders get the usual permissions (umask), not ``tempfile``'s.

The mark (:func:`new_mark`: the tool's name and a random id) is in every output: a
:data:`MARKER_FILE` in every folder, the :data:`MARK_KEY` entry of every JSON object, npz and
torch checkpoint, the ``comment`` tag of every video. :func:`is_ours` recognises nothing else, so
a user's file or folder is never replaced, whatever it looks like.
"""

import contextlib
import ctypes
import errno
import json
import os
import pathlib
import re
import secrets
import shutil
import time

from safetriage_jax.errors import SafeTriageError

PARTIAL = "partial"
MIN_FREE_BYTES = 1 << 20  # below this the output location counts as full
TOOL = "safetriage-jax"
MARK_KEY = "safetriage_output"  # the mark's key in JSON objects, npz files and torch payloads
MARKER_FILE = ".safetriage-output"  # the mark of a folder (JSON: {"safetriage_output": mark})
LOCK_FILE = ".safetriage-lock"  # held by the run using a work directory
VIDEO_TAG = "comment"  # the container tag that holds a video's mark
_MARK = re.compile(rf"{re.escape(TOOL)}:[0-9a-f]{{32}}")
# What each kind of output may be called: the writers make exactly these formats.
EXTENSIONS = {"video": (".mp4",), "torch": (".pth.tar", ".pth", ".tar"), "npz": (".npz",),
              "json": (".json",), "folder": ()}
MAX_NAME_BYTES = 200  # leaves room for the staging name's ".NAME.PID.partial.EXT" within 255


class OutputExistsError(SafeTriageError):
    """The output exists and overwriting it was not asked for."""


def new_mark():
    """A fresh mark: the tool's name and a random 128-bit id."""
    return f"{TOOL}:{secrets.token_hex(16)}"


def is_mark(value):
    return isinstance(value, str) and _MARK.fullmatch(value) is not None


def marked_json(data):
    """``data`` (a dict) with a fresh mark under :data:`MARK_KEY`, as indented JSON text."""
    return json.dumps({MARK_KEY: new_mark(), **data}, indent=2)


def is_ours(path, kind):
    """Whether ``path`` carries this tool's mark (only such outputs are ever replaced)."""
    path = pathlib.Path(path)
    try:
        if kind == "folder":
            marker = json.loads((path / MARKER_FILE).read_text())
            if not is_mark(marker.get(MARK_KEY)):
                return False
            written = set(marker.get("entries", ())) | {MARKER_FILE, LOCK_FILE}
            # A folder filled over time (a work directory) lists no entries; a folder written
            # whole lists them, and anything added since (a user's notes) keeps it safe.
            return "entries" not in marker or {p.name for p in path.iterdir()} <= written
        if not path.is_file():
            return False
        if kind == "json":
            data = json.loads(path.read_text())
            return isinstance(data, dict) and is_mark(data.get(MARK_KEY))
        if kind == "npz":
            import numpy as np
            with np.load(path, allow_pickle=False) as archive:
                return MARK_KEY in archive.files and is_mark(str(archive[MARK_KEY]))
        if kind == "torch":
            import torch
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return isinstance(payload, dict) and is_mark(payload.get(MARK_KEY))
        if kind == "video":
            import av
            with av.open(str(path)) as container:
                return is_mark(container.metadata.get(VIDEO_TAG))
    except Exception:  # unreadable, foreign or damaged: not ours
        return False
    raise ValueError(f"Unknown output kind {kind!r}.")


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


_LEFTOVER = re.compile(rf"\..+\.(\d+)\.(old\.)?{PARTIAL}(\.[^.]*)?")


def remove_stale_partials(folder):
    """Deletes the ``.NAME.PID.partial*`` leftovers in ``folder`` whose process is gone."""
    folder = _resolved(folder)
    if not folder.is_dir():
        return
    for leftover in folder.iterdir():
        match = _LEFTOVER.fullmatch(leftover.name)
        if match and not _running(int(match.group(1))):
            _remove(leftover)


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


def check_name(out, kind):
    """Raises unless ``out``'s name has an extension of ``kind`` and fits the file system."""
    out = pathlib.Path(out)
    allowed = EXTENSIONS[kind]
    if allowed and not out.name.lower().endswith(allowed):
        raise SafeTriageError(f"Cannot write {out}: this output is written as "
                              f"{' or '.join(allowed)}; give it that extension.")
    _check_length(out)


def _check_length(out):
    name = pathlib.Path(out).name
    if len(name.encode()) > MAX_NAME_BYTES:
        raise SafeTriageError(f"The output name {name[:40]}... is {len(name.encode())} bytes "
                              f"long; at most {MAX_NAME_BYTES} are allowed. Choose a shorter "
                              "name.")


def check_output(out, kind, *, inputs=(), overwrite=False, need_bytes=0):
    """Checks that ``out`` may be written as ``kind`` (a key of :data:`EXTENSIONS`); returns its
    resolved path. Raises SafeTriageError.

    ``inputs``: paths the run reads or writes elsewhere (None ignored). ``need_bytes``: a lower
    bound on the output's size, checked against the free space.
    """
    folder = kind == "folder"
    _check_length(out)  # first: the file system refuses even to look at a longer name
    if not folder and _resolved(out).is_dir():
        raise SafeTriageError(f"{_resolved(out)} is a folder; the output must be a file path.")
    check_name(out, kind)
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
        if out.is_dir() and not folder:
            raise SafeTriageError(f"{out} is a folder; the output must be a file path.")
        if not out.is_dir() and folder:
            raise SafeTriageError(f"{out} is a file; the output must be a folder path.")
        if not folder and not out.is_file():
            raise SafeTriageError(f"{out} is not a regular file (a device, pipe or socket); "
                                  "choose another output path.")
        if folder and not any(out.iterdir()):
            pass  # an empty folder holds nothing to lose
        elif not overwrite:
            raise OutputExistsError(f"The output {what} {out} already exists; choose another path "
                                    "or ask for it to be overwritten.")
        elif not is_ours(out, kind):
            extra = ", or it holds files the tool did not put there" if folder else ""
            raise SafeTriageError(f"{out} exists and is not a {what} this tool wrote (it has no "
                                  f"safetriage mark{extra}), so it is never replaced; choose "
                                  "another output path.")
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


def os_error_code(err):
    """The errno of a failed write: an OSError's, or the one orbax/TensorStore put in the text
    of their ValueError (``os_error_code='28'``); None for other errors."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"os_error_code='(\d+)'", str(err))
    return int(found.group(1)) if found else None


def describe_os_error(code):
    return {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EDQUOT: "the disk quota is exceeded"}.get(code, os.strerror(code) if code else "")


def _write_error(out, err):
    reason = describe_os_error(err.errno) or err.strerror or str(err)
    return SafeTriageError(f"Could not write {out}: {reason}; nothing was written.")


@contextlib.contextmanager
def atomic_file(out, kind, **checks):
    """Yields a staging path beside ``out`` (same suffix); on success it becomes ``out``.

    The writer puts the mark in the content (:data:`MARK_KEY`, :data:`VIDEO_TAG`); a staged
    file without it is never moved into place. ``checks``: as for :func:`check_output`.
    """
    out = check_output(out, kind, **checks)
    with _staged(out, kind) as staging:
        yield staging
        if not staging.exists():
            raise SafeTriageError(f"Nothing was written, so {out} was not created.")
        if not is_ours(staging, kind):
            raise RuntimeError(f"The {kind} written for {out} lacks the safetriage mark.")


@contextlib.contextmanager
def atomic_directory(out, **checks):
    """Yields an empty staging folder beside ``out``; on success it gets the mark (listing
    what was written) and replaces ``out`` whole."""
    out = check_output(out, "folder", **checks)
    with _staged(out, "folder") as staging:
        yield staging


def write_marker(folder, entries=None):
    """Puts a fresh mark in ``folder`` (:data:`MARKER_FILE`); ``entries``: the names the tool
    wrote in it (a folder written whole), None for a folder filled over time."""
    marker = {MARK_KEY: new_mark()}
    if entries is not None:
        marker["entries"] = sorted(entries)
    (pathlib.Path(folder) / MARKER_FILE).write_text(json.dumps(marker) + "\n")


@contextlib.contextmanager
def _staged(out, kind):
    existed = out.exists() and not (kind == "folder" and not any(out.iterdir()))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out.parent)
    except OSError as err:
        raise _write_error(out, err) from None
    staging = out.parent / _partial_name(out)
    _remove(staging)
    try:
        if kind == "folder":
            staging.mkdir()
        yield staging
        if kind == "folder":
            write_marker(staging, [p.name for p in staging.iterdir()])
        _move_into_place(staging, out, kind, existed)
    except OSError as err:
        _remove(staging, settle=True)
        raise _write_error(out, err) from None
    except BaseException:
        _remove(staging, settle=True)
        raise


def _move_into_place(staging, out, kind, existed):
    """Renames ``staging`` to ``out``. A target that existed at the check is replaced only if it
    still carries the mark; one that appeared meanwhile is never replaced (another run's)."""
    if not existed:
        if kind == "folder" and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the empty folder the check allowed
        _rename_noreplace(staging, out)
        return
    if not is_ours(out, kind):
        raise SafeTriageError(f"{out} changed while this run was writing and is no longer this "
                              "tool's output; it was kept and this run's result discarded.")
    if kind == "folder":
        old = out.parent / f".{out.name}.{os.getpid()}.old.{PARTIAL}"
        _remove(old)
        out.rename(old)
        try:
            _rename_noreplace(staging, out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.replace(out)


_RENAME_NOREPLACE, _AT_FDCWD = 1, -100


def _rename_noreplace(source, target):
    """Renames ``source`` to ``target`` unless ``target`` exists (Linux renameat2; elsewhere a
    hard link for files, a checked rename for folders)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                                _RENAME_NOREPLACE)
        code = ctypes.get_errno() if result else 0
    except (OSError, AttributeError):
        code = errno.ENOSYS
    if code in (errno.ENOSYS, errno.EINVAL):  # no renameat2 here, or not on this file system
        code = _fallback_noreplace(source, target)
    if code == errno.EEXIST or code == errno.ENOTEMPTY:
        raise SafeTriageError(f"{target} appeared while this run was writing (another run?); it "
                              "was kept and this run's result discarded. Run again with another "
                              "output path.")
    if code:
        raise OSError(code, os.strerror(code), str(target))


def _fallback_noreplace(source, target):
    try:
        if source.is_dir():
            if target.exists() or target.is_symlink():
                return errno.EEXIST
            os.rename(source, target)
        else:
            os.link(source, target)
            os.unlink(source)
    except OSError as err:
        return err.errno
    return 0


def _remove(path, settle=False):
    """Deletes a file or folder. ``settle``: after a failed write, background writers (orbax's
    TensorStore threads) may still add files for a moment, so try again until it stays gone."""
    for _ in range(20 if settle else 1):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
        if not settle:
            return
        time.sleep(0.1)
        if not (path.exists() or path.is_symlink()):
            return


def write_json(out, data, **checks):
    """Writes the dict ``data`` to ``out`` as JSON with a fresh mark, atomically (``checks``: as
    for :func:`check_output`); returns the resolved path."""
    with atomic_file(out, "json", **checks) as staging:
        staging.write_text(marked_json(data) + "\n")
    return _resolved(out)



def claim_folder(folder, *, inputs=()):
    """Makes ``folder`` (a work directory filled over time) this tool's: a new or empty folder
    gets the mark; an existing one must already carry it. Returns the resolved path; raises
    SafeTriageError before any work otherwise (a user's folder is never written into)."""
    folder = _resolved(folder)
    for given in filter(None, inputs):
        if _resolved(given).is_relative_to(folder):
            raise SafeTriageError(f"The work directory {folder} contains the input {given}; "
                                  "choose another work directory.")
    if folder.exists() and not folder.is_dir():
        raise SafeTriageError(f"The work directory {folder} is a file, not a folder; choose "
                              "another path.")
    if folder.is_dir() and any(folder.iterdir()):
        if not is_ours(folder, "folder"):
            raise SafeTriageError(f"The work directory {folder} holds files this tool did not "
                                  "write (it has no safetriage mark), so nothing is written "
                                  "there; choose a new or empty folder.")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SafeTriageError(f"The work directory {folder} is not writable.")
        return folder
    location = _existing_ancestor(folder)
    if not location.is_dir():
        raise SafeTriageError(f"Cannot create {folder}: {location} is a file, not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_marker(folder)
    except OSError as err:
        raise _write_error(folder, err) from None
    return folder


@contextlib.contextmanager
def folder_lock(folder):
    """Holds an exclusive lock on ``folder`` (a run's work directory) while the block runs;
    raises SafeTriageError at once if another process holds it. Released when the process
    ends, however it ends."""
    import fcntl
    path = pathlib.Path(folder) / LOCK_FILE
    try:
        handle = open(path, "a")
    except OSError as err:
        raise _write_error(path, err) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SafeTriageError(f"Another run is using the work directory {folder}; wait for "
                                  "it to finish or choose another work directory.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
