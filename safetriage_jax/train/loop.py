"""``train(config, workdir)``: builds data, model and optimizer, then runs the jitted step over a
device mesh with checkpoints, logs and sample grids; ends by writing ``workdir/model``.

One process per host; call ``jax.distributed.initialize()`` first on multi-host runs (the CLI's
``--distributed``). The global batch is split over all devices of all hosts along the mesh's
``data`` axis; each host feeds its own shard of the sampler's stream.
"""

import collections
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.config import TPSMMConfig
from safetriage_jax.models.tpsmm import initialize
from safetriage_jax.models.vgg import random_vgg19_variables
from safetriage_jax.train import step as train_lib
from safetriage_jax.train.checkpoints import TrainCheckpoints
from safetriage_jax.train.logbook import Logbook, sample_grid


def model_config(config) -> TPSMMConfig:
    return TPSMMConfig.from_dict(config.model.to_dict())


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def perceptual_variables(spec, rng):
    """VGG-19 variables from torchvision's weights file, or random ones when spec == 'random'."""
    if spec == "random":
        return random_vgg19_variables(rng)
    from safetriage_jax.porting import port_vgg19
    return port_vgg19(pathlib.Path(spec).expanduser())


def open_dataset(config, split):
    """The prepared tfds builder's random-access source for ``split`` and its cache folder."""
    from safetriage_jax.data import builders
    data = config.data
    data_dir = pathlib.Path(data.data_dir).expanduser()
    if data.builder == "synthetic":
        builder = builders.build("synthetic", data_dir, size=data.size, **data.synthetic)
    else:
        builder = builders.build("folder", data_dir, manual_dir=pathlib.Path(data.folder).expanduser()
                                 if data.folder else None, size=data.size,
                                 max_frames=data.max_frames)
    sources = builder.as_data_source()
    if split not in sources:
        raise SafeTriageError(f"The dataset has no {split!r} split (it has {sorted(sources)}).")
    return sources[split], pathlib.Path(builder.data_dir)


def pair_options(config):
    from safetriage_jax.data.pipeline import PairOptions
    d = config.data
    return PairOptions(id_sampling=d.id_sampling, num_repeats=d.num_repeats,
                       horizontal_flip=d.horizontal_flip, time_flip=d.time_flip)


def to_float_images(batch):
    return {k: batch[k].astype(jnp.float32) / 255.0 for k in ("source", "driving")}


class Trainer:
    """Everything a run needs, built from the config: mesh, model, optimizers, jitted step."""

    def __init__(self, config, steps_per_epoch, mesh=None):
        self.config = config
        self.mesh = mesh or data_mesh()
        if config.train.batch_size % self.mesh.size:
            raise SafeTriageError(f"train.batch_size {config.train.batch_size} must be a multiple "
                                  f"of the device count {self.mesh.size}.")
        self.model, self.vgg = train_lib.networks(config)
        self.model_config = self.model.config
        self.steps_per_epoch = steps_per_epoch
        self.txs = train_lib.optimizers(config.train, steps_per_epoch, self.model_config.bg)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        step_fn = functools.partial(train_lib.train_step, model=self.model, vgg=self.vgg,
                                    txs=self.txs, cfg=config, steps_per_epoch=steps_per_epoch)
        self.step = jax.jit(lambda state, batch, vgg: step_fn(state, to_float_images(batch), vgg),
                            in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                            out_shardings=(self.replicated, self.replicated), donate_argnums=0)
        self.predict = jax.jit(self._predict_impl)
        self._init_state = jax.jit(self._init_state_impl, out_shardings=self.replicated)

    def _init_state_impl(self, model_key, step_key):
        variables = initialize(self.model_config, model_key)
        return train_lib.create_state(variables, self.txs, step_key)

    def initial_state(self):
        """(train state, VGG variables) from the config's seed, replicated over the mesh."""
        seed = self.config.train.seed
        model_key, vgg_key, step_key = jax.random.split(jax.random.PRNGKey(seed), 3)
        vgg = perceptual_variables(self.config.train.perceptual_weights, vgg_key)
        return self._init_state(model_key, step_key), jax.device_put(vgg, self.replicated)

    def global_batch(self, local_batch):
        """Per-process numpy batch -> global arrays split over the mesh's data axis."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, local_batch[k])
                for k in ("source", "driving")}

    def _predict_impl(self, state, batch):
        images = to_float_images(batch)
        variables = {"params": state.params, "batch_stats": state.batch_stats,
                     "buffers": state.buffers}
        out = self.model.apply(variables, images["source"], images["driving"])
        return (images["source"], images["driving"], out["prediction"].astype(jnp.float32),
                out["dense_motion"]["occlusion_map"][-1].astype(jnp.float32))

    def variables(self, state):
        return {"params": state.params, "batch_stats": state.batch_stats, "buffers": state.buffers}


class DevicePrefetch:
    """Keeps the next ``depth`` batches already sent to the device while the current step runs.
    ``get_state()`` is the loader's state as of the batches handed out, so a checkpoint resumes
    with the first batch not yet trained on."""

    def __init__(self, batches, to_device, depth=2):
        self._batches, self._to_device, self._depth = batches, to_device, depth
        self._queue = collections.deque()
        self._state = batches.get_state()

    def __iter__(self):
        return self

    def __next__(self):
        while len(self._queue) < self._depth:
            self._queue.append((self._to_device(next(self._batches)), self._batches.get_state()))
        batch, self._state = self._queue.popleft()
        return batch

    def get_state(self):
        return self._state


def total_steps(config, steps_per_epoch):
    return config.train.num_steps or config.train.num_epochs * steps_per_epoch


def train(config, workdir, *, resume=False, progress=True, trainer=None):
    """Runs (or with ``resume``, continues) training; returns (final state, last metrics).

    ``trainer``: a :class:`Trainer` of the same config to reuse (its compiled step) across calls.
    """
    from safetriage_jax.checkpoint import save_model
    from safetriage_jax.data import pipeline
    workdir = pathlib.Path(workdir).expanduser().absolute()
    clips, cache_dir = open_dataset(config, "train")
    options = pair_options(config)
    steps_per_epoch = pipeline.steps_per_epoch(clips, global_batch_size=config.train.batch_size,
                                               options=options, cache_dir=cache_dir)
    if trainer is None or trainer.steps_per_epoch != steps_per_epoch:
        trainer = Trainer(config, steps_per_epoch)
    num_steps = total_steps(config, steps_per_epoch)
    checkpoints = open_checkpoints(workdir, config, resume)
    state, vgg_params = trainer.initial_state()
    loader = pipeline.training_pairs(clips, global_batch_size=config.train.batch_size,
                                     seed=config.train.seed, options=options,
                                     worker_count=config.data.worker_count, cache_dir=cache_dir)
    batches = iter(loader)
    state = restore_latest(checkpoints, state, batches) if resume else state
    batches = DevicePrefetch(batches, trainer.global_batch)
    state, metrics = run_steps(functools.partial(_step_with, trainer.step, vgg_params),
                               trainer.predict, state, batches, config=config, workdir=workdir,
                               checkpoints=checkpoints, num_steps=num_steps, progress=progress)
    if jax.process_index() == 0:
        save_model(workdir / "model", trainer.model_config, jax.device_get(trainer.variables(state)),
                   overwrite=True)
    return state, metrics


def open_checkpoints(workdir, config, resume):
    """The run's checkpoint manager; refuses to start over existing checkpoints unless resuming."""
    checkpoints = TrainCheckpoints(workdir / "checkpoints", keep=config.log.keep_checkpoints)
    if checkpoints.steps() and not resume:
        raise SafeTriageError(f"{workdir} already has checkpoints (steps {checkpoints.steps()}); "
                              "pass --resume to continue them or choose another --workdir.")
    return checkpoints


def restore_latest(checkpoints, state, batches):
    """The newest readable checkpoint's state (``state`` when there is none); moves the loader
    ``batches`` to where that checkpoint left it."""
    restored = checkpoints.restore_latest(state)
    if restored is None:
        return state
    state, data_state, _ = restored
    batches.set_state(data_state)
    return state


def _step_with(step, extra, state, batch):
    return step(state, batch, extra)


def run_steps(step, predict, state, batches, *, config, workdir, checkpoints, num_steps,
              progress=True, desc="train"):
    """The loop every trainer shares: ``step(state, batch) -> (state, metrics)`` until
    ``num_steps``, logging every ``config.log.every_steps``, sample grids from
    ``predict(state, batch)`` (images for :func:`sample_grid`; none if
    ``config.log.sample_every_steps`` is 0) and checkpoints (state and
    loader state) on the config's schedule. Closes ``checkpoints``; returns (state, metrics)."""
    start = int(jax.device_get(state.step))
    book = Logbook(workdir, enabled=jax.process_index() == 0)
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
                checkpoints.save(index, state, batches.get_state())
    finally:
        bar.close()
        checkpoints.close()
        book.close()
    return state, jax.device_get(metrics)


def _write_config(workdir, config):
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
