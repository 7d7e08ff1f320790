"""``train(config, workdir)``: builds data, model and optimizer, then runs the jitted backbone
step over a device mesh (the shared skeleton of ``train/trainer.py``) with checkpoints, logs and
sample grids; ends by writing ``workdir/model``.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.tpsmm import initialize
from safetriage_jax.train import distributed
from safetriage_jax.train import step as train_lib
from safetriage_jax.train.trainer import (RUN_ONCE, MeshTrainer, fit, owned_workdir,
                                          write_from_primary)


def open_dataset(config, split):
    """The prepared tfds builder's random-access source for ``split`` and its cache folder.
    Prepared by process 0 first; the others then open the finished files."""
    return distributed.primary_first(lambda: _open_dataset(config, split),
                                      f"dataset-prepared-{split}")


def _open_dataset(config, split):
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


class Trainer(MeshTrainer):
    """The backbone trainer: model, optimizers and the jitted upstream train step.

    ``steps_per_epoch`` is an argument of the compiled step (:meth:`step_extras`), so a trainer
    is reused for another dataset size by setting the attribute."""

    def __init__(self, config, steps_per_epoch, mesh=None):
        super().__init__(config, mesh, micro_batches=config.train.micro_batches)
        self.model, self.vgg = train_lib.networks(config)  # both under train.precision / remat
        self.model_config = self.model.config
        self.steps_per_epoch = steps_per_epoch
        self.txs = train_lib.optimizers(config.train, steps_per_epoch, self.model_config.bg)
        self.step = self.jit_step(functools.partial(
            train_lib.train_step, model=self.model, vgg=self.vgg, cfg=config), num_extras=2)
        self.predict = self.jit_predict(self._predict_impl)
        self._init_state = jax.jit(self._init_state_impl, out_shardings=self.replicated,
                                   compiler_options=RUN_ONCE)

    def _init_state_impl(self, model_key, step_key):
        variables = initialize(self.model_config, model_key)
        return train_lib.create_state(variables, self.txs, step_key)

    def initial_state(self):
        """(train state, VGG variables) from the config's seed, replicated over the mesh."""
        model_key, vgg_key, step_key = jax.random.split(jax.random.PRNGKey(self.config.train.seed), 3)
        return self._init_state(model_key, step_key), self.vgg_variables(vgg_key)

    def step_extras(self, vgg):
        return (vgg, np.int32(self.steps_per_epoch))

    def predict_extras(self):
        return ()

    def checkpoint_meta(self):
        return {"model": json.loads(self.model_config.to_json())}

    def _predict_impl(self, state, images):
        out = self.model.apply(self.variables(state), images["source"], images["driving"])
        return (images["source"], images["driving"], out["prediction"].astype(jnp.float32),
                out["dense_motion"]["occlusion_map"][-1].astype(jnp.float32))

    def variables(self, state):
        return {"params": state.params, "batch_stats": state.batch_stats, "buffers": state.buffers}


def total_steps(config, steps_per_epoch):
    return config.train.num_steps or config.train.num_epochs * steps_per_epoch


def train(config, workdir, *, resume=False, progress=True, trainer=None):
    """Runs (or with ``resume``, continues) training; returns (final state, last metrics).

    ``trainer``: a :class:`Trainer` of the same config to reuse (its compiled step) across calls.
    """
    workdir = pathlib.Path(workdir).expanduser().absolute()
    with owned_workdir(workdir):
        return _train(config, workdir, resume, progress, trainer)


def _train(config, workdir, resume, progress, trainer):
    from safetriage_jax.data import pipeline
    from safetriage_jax.model_dir import save_model
    clips, cache_dir = open_dataset(config, "train")
    steps_per_epoch = pipeline.steps_per_epoch(clips, global_batch_size=config.train.batch_size,
                                               options=pair_options(config), cache_dir=cache_dir)
    if trainer is None:
        trainer = Trainer(config, steps_per_epoch)
    trainer.steps_per_epoch = steps_per_epoch  # a step argument: the compiled step is reused
    num_steps = total_steps(config, steps_per_epoch)
    batches = lambda start_step: pipeline.training_pairs(
        clips, global_batch_size=config.train.batch_size, seed=config.train.seed,
        options=pair_options(config), start_step=start_step, num_steps=num_steps,
        worker_count=config.data.worker_count, cache_dir=cache_dir)
    state, metrics = fit(trainer, workdir, batches, config=config, num_steps=num_steps,
                         resume=resume, progress=progress, desc="train")
    variables = jax.device_get(trainer.variables(state))
    write_from_primary(lambda: save_model(workdir / "model", trainer.model_config, variables,
                                          overwrite=True), "model-written")
    return state, metrics
