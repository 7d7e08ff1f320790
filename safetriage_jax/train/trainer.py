"""The skeleton every trainer shares: :class:`MeshTrainer` (mesh, shardings, the jitted step
and sample function, global batches) and :func:`fit` (checkpoints, resume, device prefetch and
the loop). One process per host; join a multi-host run first (``train.distributed.initialize``).
The global batch is split over all devices of all hosts along the mesh's ``data`` axis; each
process feeds its slice of the global batch, which is a function of (seed, step) alone, so runs
reproduce across topologies at equal global batch.
"""

import collections
import contextlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from safetriage_jax import outputs
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.vgg import VGG19Features, random_vgg19_variables
from safetriage_jax.train import distributed
from safetriage_jax.train.checkpoints import TrainCheckpoints
from safetriage_jax.train.logbook import Logbook, sample_grid


# For functions that run once per run (state initialisation): without LLVM's optimisations XLA
# compiles them about three times faster (the small config's init on a 2-core CPU: 27 s -> 9 s)
# and the run barely notices.
RUN_ONCE = {"xla_backend_optimization_level": 0}


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def perceptual_variables(spec, rng):
    """VGG-19 variables from torchvision's weights file, or random ones when spec == 'random'."""
    if spec == "random":
        return random_vgg19_variables(rng)
    from safetriage_jax.porting import port_vgg19
    return port_vgg19(pathlib.Path(spec).expanduser())


class MeshTrainer:
    """What every trainer shares: the mesh over all devices of all processes, the batch-size
    check, shardings (state replicated, batch split along ``data``), the jitted step and sample
    function, and global batches from per-process ones. Subclasses set ``image_keys``, ``step``
    and ``predict`` and implement ``initial_state()`` (state, VGG variables),
    ``step_extras(vgg)`` and ``predict_extras()`` (the jitted functions' arguments after the
    batch) and ``checkpoint_meta()`` (what a checkpoint must match to be resumed)."""

    image_keys = ("source", "driving")

    def __init__(self, config, mesh=None, micro_batches=1):
        self.config = config
        self.mesh = mesh or data_mesh()
        if config.train.batch_size % (micro_batches * self.mesh.size):
            slices = f"{micro_batches} micro-batches x " if micro_batches > 1 else ""
            raise SafeTriageError(f"train.batch_size {config.train.batch_size} must be a multiple "
                                  f"of {slices}the device count {self.mesh.size}: every device "
                                  "needs the same share of every batch.")
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        used = [i for i, w in enumerate(config.train.loss_weights.perceptual) if w]
        self.vgg = VGG19Features(num_slices=used[-1] + 1 if used else 1)

    def float_images(self, batch):
        return {k: batch[k].astype(jnp.float32) / 255.0 for k in self.image_keys}

    def jit_step(self, step_fn, num_extras):
        """``step_fn(state, float_batch, *extras) -> (state, metrics)`` jitted over the mesh:
        state and extras replicated, the uint8 batch split, the state donated."""
        return jax.jit(lambda state, batch, *extras: step_fn(state, self.float_images(batch), *extras),
                       in_shardings=(self.replicated, self.batch_sharding)
                       + (self.replicated,) * num_extras,
                       out_shardings=(self.replicated, self.replicated), donate_argnums=0)

    def jit_predict(self, predict_fn):
        """``predict_fn(state, float_batch, *extras)`` jitted with replicated outputs, so every
        process can fetch the sample images."""
        return jax.jit(lambda state, batch, *extras: predict_fn(state, self.float_images(batch), *extras),
                       out_shardings=self.replicated)

    def vgg_variables(self, key):
        """The perceptual loss's VGG-19 variables (``train.perceptual_weights``), replicated."""
        return jax.device_put(perceptual_variables(self.config.train.perceptual_weights, key),
                              self.replicated)

    def global_batch(self, local_batch):
        """Per-process numpy batch -> global arrays split over the mesh's data axis."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, local_batch[k])
                for k in self.image_keys}


class DevicePrefetch:
    """Keeps the next ``depth`` batches already sent to the device while the current step runs."""

    def __init__(self, batches, to_device, depth=2):
        self._batches, self._to_device, self._depth = batches, to_device, depth
        self._queue = collections.deque()

    def __iter__(self):
        return self

    def __next__(self):
        while len(self._queue) < self._depth:
            try:
                self._queue.append(self._to_device(next(self._batches)))
            except StopIteration:
                break
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()


@contextlib.contextmanager
def owned_workdir(workdir):
    """Claims ``workdir`` for this run before any work: a new or empty folder gets the tool's
    mark, a folder without it is refused (never written into), and a lock refuses a second run
    in it at the same time. Process 0 checks and locks; the others share its folder."""
    if not distributed.is_primary():
        yield
        return
    outputs.claim_folder(workdir)
    try:
        with outputs.folder_lock(workdir):
            yield
    except Exception as err:
        code = outputs.os_error_code(err)
        if code is None or isinstance(err, SafeTriageError):
            raise
        raise SafeTriageError(f"Training stopped: could not write in {workdir} "
                              f"({outputs.describe_os_error(code)}). The checkpoints written "
                              "before are kept: make room and continue with --resume.") from None


def write_from_primary(write, name):
    """Runs ``write`` on process 0 only, then waits for it on every process."""
    if distributed.is_primary():
        write()
    distributed.barrier(name)


def fit(trainer, workdir, batches, *, config, num_steps, resume=False, progress=True,
        desc="train"):
    """The run sequence every trainer shares: checkpoints (refusing to mix runs), the initial or
    resumed state, the data stream ``batches(start_step)`` (this process's numpy batches from
    that step on) prefetched to the devices, then :func:`run_steps` with the run's ``config``
    (its log and checkpoint schedule; the trainer may be reused from a run that differs only
    there). Returns (state, metrics)."""
    checkpoints = open_checkpoints(workdir, config, resume)
    state, vgg = trainer.initial_state()
    if resume:
        restored = checkpoints.restore_latest(state, trainer.checkpoint_meta())
        state = restored[0] if restored is not None else state
    start = int(jax.device_get(state.step))
    batches = DevicePrefetch(batches(start), trainer.global_batch)
    step_extras, predict_extras = trainer.step_extras(vgg), trainer.predict_extras()
    return run_steps(lambda s, b: trainer.step(s, b, *step_extras),
                     lambda s, b: trainer.predict(s, b, *predict_extras), state, batches,
                     config=config, workdir=workdir, checkpoints=checkpoints,
                     meta=trainer.checkpoint_meta(), num_steps=num_steps,
                     progress=progress and distributed.is_primary(), desc=desc)


def open_checkpoints(workdir, config, resume):
    """The run's checkpoint manager; refuses to start over existing checkpoints unless resuming."""
    checkpoints = TrainCheckpoints(workdir / "checkpoints", keep=config.log.keep_checkpoints)
    if checkpoints.steps() and not resume:
        raise SafeTriageError(f"{workdir} already has checkpoints (steps {checkpoints.steps()}); "
                              "resume them or choose another work directory.")
    return checkpoints


def run_steps(step, predict, state, batches, *, config, workdir, checkpoints, num_steps,
              meta=None, progress=True, desc="train"):
    """The loop every trainer shares: ``step(state, batch) -> (state, metrics)`` until
    ``num_steps``, logging every ``config.log.every_steps``, sample grids from
    ``predict(state, batch)`` (images for :func:`sample_grid`; none if
    ``config.log.sample_every_steps`` is 0) and checkpoints (state and ``meta``) on the
    config's schedule; logs from process 0 only. Closes ``checkpoints``; returns (state, metrics)."""
    start = int(jax.device_get(state.step))
    book = Logbook(workdir, enabled=distributed.is_primary())
    _write_config(workdir, config)
    metrics = {}
    bar = tqdm(total=num_steps, initial=start, desc=desc, unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        for index in range(start + 1, num_steps + 1):
            batch = next(batches)
            state, metrics = step(state, batch)
            bar.update(1)
            if index % config.log.every_steps == 0 or index == num_steps:
                values = jax.device_get(metrics)
                book.scalars(index, values)
                bar.set_postfix(loss=f"{float(values['loss']):.4f}")
            every = config.log.sample_every_steps  # 0: no sample grids
            if every and (index % every == 0 or index == num_steps):
                book.samples(index, sample_grid(*jax.device_get(predict(state, batch))))
            if index % config.log.checkpoint_every_steps == 0 or index == num_steps:
                checkpoints.save(index, state, meta)
    finally:
        bar.close()
        checkpoints.close()
        book.close()
    return state, jax.device_get(metrics)


def _write_config(workdir, config):
    """The run's config as ``workdir/config.json`` (atomically, marked; replaces only an earlier
    run's)."""
    if distributed.is_primary():
        outputs.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()),
                           overwrite=True)

