"""Shared test fixtures: the shared/ folder beside the project, small configs, ported weights."""

import atexit
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

from safetriage_jax.models.config import TPSMMConfig, from_upstream_yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("SAFETRIAGE_SHARED", ROOT.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "tpsmm_small"
SAMPLES = SHARED / "samples"

# One persistent XLA cache for the session (subprocesses too): the training tests compile the
# same step several times, and on two CPU cores compiling costs more than running.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # else a parent session's, or the user's
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="safetriage-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

# Compile without LLVM's optimisations (same HLO, same float semantics: XLA:CPU uses no
# fast-math) and with XLA:CPU's older elemental emitters (the tiny train step's compile: 37 -> 27
# CPU-seconds, its steps ~10% slower): on two cores the suite spends more time compiling than
# running. Both flags exist in jaxlib 0.10.2 and 0.11.2 (XLA aborts on an unknown one).
# Subprocesses inherit them; set before the first computation creates the CPU backend.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def cpu_devices_env(count):
    """os.environ for a subprocess on ``count`` host CPU devices (keeping the flags above)."""
    flags = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={count}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


# The smallest model that still exercises every code path (all five networks, four masks).
TINY = TPSMMConfig(image_size=64, num_tps=2, encoder_width=16, generator_block_expansion=8,
                   generator_max_features=16, dense_block_expansion=8, dense_max_features=16,
                   dense_num_blocks=3, id_bottle_size=8, pose_bottle_size=8)


# The one training config of every training test (configs/train.py:small with these overrides):
# the TINY networks, a small synthetic set and the perceptual loss at relu1_1 only (VGG's first
# conv: the deeper layers would cost most of a step at this size). The compiled step takes
# steps_per_epoch as an argument, so tests that train with this config at the same batch share
# one compiled step (through the persistent cache above).
TINY_TRAIN = ("small,model.num_tps=2,model.encoder_width=16,model.generator_block_expansion=8,"
              "model.generator_max_features=16,model.dense_block_expansion=8,"
              "model.dense_max_features=16,model.id_bottle_size=8,model.pose_bottle_size=8,"
              "data.synthetic.train_identities=6,data.synthetic.test_identities=2,"
              "data.synthetic.frames_per_clip=8,train.batch_size=4,train.scales=1.0,"
              "train.loss_weights.perceptual=10.0;0.0;0.0;0.0;0.0")


def tiny_train_config(data_dir, *overrides):
    """TINY_TRAIN reading its dataset from ``data_dir``, with further ``key=value`` overrides."""
    from configs.train import get_config
    return get_config(",".join([TINY_TRAIN, f"data.data_dir={data_dir}", *overrides]))


# The files that take longest (docs/development.md, "Durations"), longest first: pytest-xdist
# hands whole files to its two workers in collection order, so the long ones overlap the rest
# and the short ones fill the end (both workers finish close together).
SLOWEST_FIRST = ("distributed_test.py", "train_test.py", "precision_test.py",
                 "deid_evaluation_test.py", "deid_test.py", "safety_test.py",
                 "grid_sample_pallas_mosaic_tpu_test.py", "grid_sample_pallas_triton_test.py",
                 "prompt_test.py", "deid_face_backend_test.py", "animate_test.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)
    items.sort(key=rank)  # stable: the order within and among the other files is kept


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """TINY_TRAIN's synthetic dataset, built once for every test (and subprocess) that trains."""
    from safetriage_jax.train.backbone import open_dataset
    data_dir = tmp_path_factory.mktemp("tfds")
    open_dataset(tiny_train_config(data_dir), "train")
    return data_dir


@pytest.fixture(scope="session")
def fixture_config():
    return from_upstream_yaml(FIXTURE / "config.yaml")


@pytest.fixture(scope="session")
def fixture_variables(fixture_config):
    from safetriage_jax.porting import port_checkpoint
    return port_checkpoint(FIXTURE / "checkpoint.pth.tar", fixture_config)


@pytest.fixture(scope="session")
def fixture_model_dir(tmp_path_factory, fixture_config, fixture_variables):
    from safetriage_jax.model_dir import save_model
    return save_model(tmp_path_factory.mktemp("model") / "small", fixture_config, fixture_variables)


@pytest.fixture(scope="session")
def tiny_variables():
    from safetriage_jax.models.tpsmm import init_variables
    return init_variables(TINY, jax.random.PRNGKey(0))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_variables):
    """A model directory of the TINY model (random weights): fast to load and run."""
    from safetriage_jax.model_dir import save_model
    return save_model(tmp_path_factory.mktemp("model") / "tiny", TINY, tiny_variables)


@pytest.fixture
def rng(request):
    """A numpy generator per test, seeded from the test's name and $SAFETRIAGE_TEST_SEED
    (default 0), so a failure reproduces; set another seed to draw fresh inputs."""
    import zlib

    import numpy as np
    base = int(os.environ.get("SAFETRIAGE_TEST_SEED", "0"))
    seed = (base * 1_000_003 + zlib.crc32(request.node.nodeid.encode())) % 2 ** 32
    print(f"numpy seed {seed} (SAFETRIAGE_TEST_SEED={base})")
    return np.random.default_rng(seed)
