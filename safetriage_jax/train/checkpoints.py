"""Training checkpoints: orbax ``CheckpointManager`` (async) holding the train state and the grain
iterator state together, so ``--resume`` continues the exact sample stream.

Orbax commits a step only once all of it is written, so a run killed mid-save leaves no partial
step behind; a committed step that later became unreadable is reported and skipped in favour of
the previous one. State restores onto the current mesh whatever device count wrote it.
"""

import json
import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from safetriage_jax.errors import SafeTriageError

log = logging.getLogger(__name__)


class TrainCheckpoints:
    def __init__(self, directory, *, keep=3, async_save=True):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def steps(self):
        return sorted(self._manager.all_steps())

    def save(self, step, state, data_state):
        """Starts writing ``step`` in the background (returns at once when async).
        ``data_state``: the loader's state, JSON bytes (grain DataLoader) or a dict (grain
        dataset iterators); restored as the same type."""
        wrapped = ({"bytes": json.loads(data_state)} if isinstance(data_state, (bytes, str))
                   else {"dict": data_state})
        self._manager.save(int(step), force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(wrapped)))

    def restore_latest(self, state_like):
        """(state, data_state, step) of the newest readable step, laid out like
        ``state_like`` (arrays or ShapeDtypeStructs with shardings); None when there is none."""
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(state_like)),
                    data=ocp.args.JsonRestore()))
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                log.warning("Checkpoint step %d in %s is unreadable (%s); trying the one before.",
                            step, self.directory, reason)
                print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
                      f"({reason}); falling back to the previous one.")
                continue
            data = restored["data"]
            data = json.dumps(data["bytes"]).encode() if "bytes" in data else data["dict"]
            return restored["state"], data, step
        if self.steps():
            raise SafeTriageError(f"No checkpoint in {self.directory} is readable (steps "
                                  f"{self.steps()}); delete the folder to start over.")
        return None

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
