"""Training checkpoints: an orbax ``CheckpointManager`` (async) holding the train state and, beside
it, what the state belongs to (``meta``: the model config), step by step.

The data stream is a function of (seed, step), so the step is all a resume needs to continue it,
on any process count; every process takes part in every save and restore (orbax's barriers).
Orbax commits a step only once all of it is written, so a run killed mid-save leaves no partial
step behind. A committed step that later became unreadable is reported, moved aside (to
``<directory>-damaged/``) and skipped in favour of the previous one, so training continues and
writes that step again. State restores onto the current mesh whatever device count wrote it.
"""

import logging
import pathlib
import shutil
import time

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from safetriage_jax.errors import SafeTriageError
from safetriage_jax.train import distributed

log = logging.getLogger(__name__)


class TrainCheckpoints:
    def __init__(self, directory, *, keep=3, async_save=True):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def steps(self):
        return sorted(self._manager.all_steps())

    def save(self, step, state, meta=None):
        """Starts writing ``step`` in the background (returns at once when async); ``meta``: a
        JSON-able dict saved with it, checked by :meth:`restore_latest`."""
        self._manager.save(int(step), force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})))

    def restore_latest(self, state_like, meta=None):
        """(state, step) of the newest readable step, laid out like ``state_like`` (arrays or
        ShapeDtypeStructs with shardings); None when there is none. Raises when the step's
        ``meta`` differs from ``meta`` (naming the first differing field), and when every step
        is unreadable (a resume must not silently start over)."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                stored = self._manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                self._set_aside(step, err)
                continue
            if meta is not None:
                check_meta(stored, meta, self.directory)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(state_like))))
            except Exception as err:
                self._set_aside(step, err)
                continue
            return restored["state"], step
        if steps:
            raise SafeTriageError(
                f"Every checkpoint in {self.directory} is unreadable (steps {steps}, moved to "
                f"{self.directory.name}-damaged/), so there is nothing to resume. Start a new "
                "run without --resume, or in another work directory.")
        return None

    def _set_aside(self, step, err):
        """Reports the unreadable ``step`` and moves it out of the manager's way."""
        reason = _short_reason(err)
        aside = self.directory.with_name(self.directory.name + "-damaged") / f"{step}-{int(time.time())}"
        if distributed.is_primary():
            print(f"warning: checkpoint step {step} in {self.directory} is unreadable ({reason}); "
                  f"moved it to {aside.parent} and falling back to the previous one.", flush=True)
        distributed.barrier(f"checkpoint-damaged-{step}-read")
        if distributed.is_primary():
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(aside))
        distributed.barrier(f"checkpoint-damaged-{step}-moved")
        self._manager.reload()

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def _short_reason(err):
    """What a user can act on: orbax and TensorStore messages are internals (driver names,
    byte ranges, source locations), so only the kind of damage is named."""
    if isinstance(err, FileNotFoundError):
        return "some of its files are missing"
    return "its files are damaged or incomplete"


def check_meta(stored, expected, directory):
    """Raises when checkpoint ``stored`` meta differs from ``expected`` (first differing field)."""
    flat = lambda tree: {".".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
    stored, expected = flat(stored), flat(expected)
    for key in sorted(set(stored) | set(expected)):
        there, here = stored.get(key, "(absent)"), expected.get(key, "(absent)")
        if _plain(there) != _plain(here):
            raise SafeTriageError(
                f"The checkpoints in {directory} were written with another config: {key} is "
                f"{there!r} there and {here!r} here. Resume with the config that wrote them, or "
                "start a new run in another work directory.")


def _plain(value):
    return list(map(_plain, value)) if isinstance(value, (list, tuple)) else value


def _abstract(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
