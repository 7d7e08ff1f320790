"""One step on 1 and on 8 CPU devices from the same state and batch; the 8-device state
checkpointed and restored onto the 1-device mesh; then the same with 2 micro-batches (each
device keeps its share of every slice). TINY_TRAIN at 32 px: sharding, not image size, is
under test, and XLA:CPU runs the micro-batched step (a ``lax.scan``) about 13x slower per
sample than the plain one. Run by ``train_test.py`` in a subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.eight_devices_check \
        --seed 123 --checkpoint-dir /tmp/ck

Prints the relative differences and exits non-zero when they exceed the tolerances.
"""

import argparse

import jax
import numpy as np
from jax.sharding import Mesh

from safetriage_jax.parity import relative_error
from safetriage_jax.train.backbone import Trainer
from safetriage_jax.train.checkpoints import TrainCheckpoints
from tests.conftest import tiny_train_config


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--checkpoint-dir", required=True)
    args = parser.parse_args(argv)
    assert jax.device_count() == 8, jax.devices()
    config = tiny_train_config("unused", "train.bg_start=0", "train.batch_size=8",
                                "model.image_size=32", "data.size=32")
    rng = np.random.default_rng(args.seed)
    print("numpy seed", args.seed)
    size = config.model.image_size
    images = lambda n: {k: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
                        for k in ("source", "driving")}
    batch = images(8)
    (one, state_1, metrics_1), (eight, state_8, metrics_8) = steps_on_one_and_eight(config, batch)
    errors = dict(loss=relative_error(metrics_8["loss"], metrics_1["loss"]),
                  batch_stats=relative_error(state_8.batch_stats, state_1.batch_stats),
                  params=relative_error(state_8.params, state_1.params))
    print("relative differences, 1 vs 8 devices:", errors)
    assert errors["loss"] < 1e-5 and errors["batch_stats"] < 1e-5 and errors["params"] < 2e-3, errors

    checkpoints = TrainCheckpoints(args.checkpoint_dir, async_save=False)
    checkpoints.save(1, jax.device_put(state_8, eight.replicated))
    checkpoints.wait()
    restored, step = checkpoints.restore_latest(jax.device_put(state_1, one.replicated))
    checkpoints.close()
    assert step == 1 and jax.tree.leaves(restored)[0].sharding == one.replicated
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(state_8)):
        np.testing.assert_array_equal(a, b)

    config.train.update(batch_size=16, micro_batches=2)
    batch = images(16)
    (_, state_1, metrics_1), (_, state_8, metrics_8) = steps_on_one_and_eight(config, batch)
    errors = dict(loss=relative_error(metrics_8["loss"], metrics_1["loss"]),
                  batch_stats=relative_error(state_8.batch_stats, state_1.batch_stats))
    print("relative differences with 2 micro-batches, 1 vs 8 devices:", errors)
    assert errors["loss"] < 1e-5 and errors["batch_stats"] < 1e-5, errors
    print("OK")


def steps_on_one_and_eight(config, batch):
    """[(trainer, state, metrics)] of one step on 1 and on 8 devices from the same state."""
    runs, initial = [], None
    for devices in (jax.devices()[:1], jax.devices()):
        trainer = Trainer(config, steps_per_epoch=3, mesh=Mesh(np.array(devices), ("data",)))
        initial = initial or jax.device_get(trainer.initial_state())
        state, vgg = jax.device_put(initial, trainer.replicated)
        state, metrics = trainer.step(state, trainer.global_batch(batch), *trainer.step_extras(vgg))
        runs.append((trainer, jax.device_get(state), jax.device_get(metrics)))
    return runs


if __name__ == "__main__":
    main()
