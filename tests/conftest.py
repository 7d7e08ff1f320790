"""Shared test fixtures: the shared/ folder beside the project, small configs, ported weights."""

import os
import pathlib
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
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="safetriage-xla-"))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# The smallest model that still exercises every code path (all five networks, four masks).
TINY = TPSMMConfig(image_size=64, num_tps=2, generator_block_expansion=8,
                   generator_max_features=16, dense_block_expansion=8, dense_max_features=16,
                   dense_num_blocks=3, id_bottle_size=8, pose_bottle_size=8)


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
