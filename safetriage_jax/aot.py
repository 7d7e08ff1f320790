"""Compile for a TPU or GPU that is not there: the real compilers, run on a CPU host.

A *target* (``v5e``, ``v6e``: one TPU chip, libtpu's XLA:TPU + Mosaic; ``h100``: one H100 SXM,
XLA:GPU + Triton + ptxas for sm_90a) gives compile-only devices. Arguments placed on them as
``jax.ShapeDtypeStruct``s make ``jax.jit(f).lower(...)`` lower for that platform and
``.compile()`` run its whole compiler; ``memory_analysis()`` then tells what the program
needs. Nothing runs and nothing is timed: compiler truth, not speed. Needs the optional extras
``tpu-aot`` / ``gpu-aot`` (``pip install -e '.[tpu-aot,gpu-aot]'``).
"""

import contextlib
import functools
import glob
import importlib.resources
import os
import re
import shutil
import subprocess
import tempfile
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from safetriage_jax.errors import SafeTriageError

# name -> (platform, libtpu topology name or the GPU target-config resource)
TARGETS = {
    "v5e": ("tpu", "v5e:1x1"),
    "v6e": ("tpu", "v6e:1x1"),
    "h100": ("cuda", "h100_sxm.txtpb"),
}
EXTRA = {"tpu": "tpu-aot", "cuda": "gpu-aot"}
# Hopper's per-SM limits, for occupancy from ptxas' registers and shared memory.
H100_SM = dict(registers=65536, threads=2048, blocks=32, shared_bytes=233472)


def _platform(target):
    if target not in TARGETS:
        raise SafeTriageError(f"unknown compile target {target!r}; use one of {sorted(TARGETS)}.")
    return TARGETS[target][0]


def missing_extra(target):
    """Why ``target`` cannot compile here (the extra to install), or None if it can."""
    platform = _platform(target)
    module = "libtpu" if platform == "tpu" else "jax_plugins.xla_cuda13"
    try:
        __import__(module)
    except ImportError:
        return (f"compiling for {target} needs the {EXTRA[platform]} extra: "
                f"pip install -e '.[{EXTRA[platform]}]'")
    if platform == "cuda" and ptxas_path() is None:
        return "compiling for h100 needs ptxas (nvidia-cuda-nvcc, in the gpu-aot extra)"
    return None


def _register_cuda_compiler():
    """The CUDA plugin registers itself (and its compile-only topologies) only after checking a
    GPU's CUDA libraries, which fails on a CPU host; register it once more with that check
    skipped (JAX's own switch for it). The host's default backend is left as it was."""
    jax.devices()  # JAX discovers its plugins once, first; the CPU stays the default backend
    import jax_plugins.xla_cuda13 as cuda_plugin
    saved = os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK")
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    try:
        cuda_plugin.initialize()
    finally:
        if saved is None:
            del os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"]
        else:
            os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = saved


@functools.cache
def device(target):
    """One compile-only device of ``target`` (raises SafeTriageError without its extra)."""
    from jax.experimental import topologies
    reason = missing_extra(target)
    if reason:
        raise SafeTriageError(reason)
    platform, name = TARGETS[target]
    if platform == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server to ask
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lock is per host
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chip_config_name="default",
            chips_per_host_bounds=(1, 1, 1), num_slices=1, wrap=(False, False, False))
        return topology.devices[0]
    spec = importlib.resources.files("safetriage_jax").joinpath("targets", name).read_text()
    describe = functools.partial(topologies.get_topology_desc, platform="cuda",
                                 topology_name="", target_config=spec, topology="1x1x1")
    try:
        topology = describe()
    except NotImplementedError:  # the plugin skipped registration (no GPU here)
        _register_cuda_compiler()
        topology = describe()
    return topology.devices[0]


def mesh(target):
    """A one-device ("data",) mesh of ``target`` (what the trainers shard over)."""
    return jax.sharding.Mesh(np.array([device(target)]), ("data",))


def abstract(shape, dtype, target, partition=PartitionSpec()):
    """A ``ShapeDtypeStruct`` on ``target``'s compile-only device: jit lowers for it."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh(target), partition))


def on_target(tree, target):
    """``tree``'s arrays or ShapeDtypeStructs as ShapeDtypeStructs on ``target``."""
    sharding = NamedSharding(mesh(target), PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        tree)


@contextlib.contextmanager
def lowering_for(target):
    """Context to lower (and compile) in: Pallas' Mosaic lowering reads the chip's facts
    (VMEM, tiling) from the current abstract mesh's device, else from the host's default
    device (the CPU here), so the mesh of the target is made current."""
    with jax.sharding.use_abstract_mesh(mesh(target).abstract_mesh):
        yield


def memory(compiled):
    """XLA's memory_analysis in bytes: arguments, outputs, temporaries, aliased, total."""
    stats = compiled.memory_analysis()
    sizes = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
             "temporaries": stats.temp_size_in_bytes, "aliased": stats.alias_size_in_bytes}
    sizes["total"] = (sizes["arguments"] + sizes["outputs"] + sizes["temporaries"]
                      - sizes["aliased"])
    return sizes


def compile_for(target, fn, *abstract_args, dump_to=None, **jit_kwargs):
    """Lowers and compiles ``jax.jit(fn, **jit_kwargs)`` for ``target``.

    Returns (lowered, compiled, seconds). ``abstract_args`` come from ``abstract``/``on_target``;
    ``dump_to`` is a folder for XLA's dumps (the PTX of GPU kernels, for ``ptxas_report``).
    """
    start = time.perf_counter()
    with lowering_for(target):
        lowered = jax.jit(fn, **jit_kwargs).lower(*abstract_args)
        options = {"xla_dump_to": dump_to} if dump_to else None
        compiled = lowered.compile(compiler_options=options)
    return lowered, compiled, time.perf_counter() - start


# --- GPU: ptxas' figures for the kernels XLA generated -----------------------------------------
def ptxas_path():
    """The CUDA 13 ptxas of the gpu-aot extra (nvidia-cuda-nvcc), else one on PATH."""
    try:
        import nvidia.cu13
        for folder in nvidia.cu13.__path__:
            candidate = os.path.join(folder, "bin", "ptxas")
            if os.path.exists(candidate):
                return candidate
    except ImportError:
        pass
    return shutil.which("ptxas")


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_FIGURES = {
    "registers": re.compile(r"Used (\d+) registers"),
    "smem": re.compile(r"(\d+) bytes smem"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_LAUNCH = re.compile(r"\]\s+(\S+) grid: \[[\d, ]+\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+)")


def _launch_threads(dump_dir):
    """{kernel: (threads per block, launch shared memory)} from XLA's thunk dumps."""
    launches = {}
    for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence*.txt")):
        with open(path) as lines:
            for match in _LAUNCH.finditer(lines.read()):
                threads = int(np.prod([int(v) for v in match.group(2).split(",")]))
                launches[match.group(1)] = (threads, int(match.group(3)))
    return launches


def occupancy(registers, threads, shared_bytes, sm=H100_SM):
    """Fraction of an SM's warps resident, from the first-order CUDA occupancy rules."""
    warps = -(-threads // 32)
    registers_per_warp = -(-registers * 32 // 256) * 256  # allocated in units of 256
    limits = [sm["threads"] // threads, sm["blocks"]]
    if registers:
        limits.append(sm["registers"] // (registers_per_warp * warps))
    if shared_bytes:
        limits.append(sm["shared_bytes"] // (shared_bytes + 1024))  # 1 KiB reserved a block
    return min(limits) * warps / (sm["threads"] // 32)


def ptxas_report(dump_dir, kernel_filter="grid_sample"):
    """{kernel: registers, spill_stores, spill_loads, stack, smem, threads, occupancy} for
    the kernels (names containing ``kernel_filter``) in the PTX an XLA dump holds, from
    ``ptxas -v`` for sm_90a (what XLA itself runs to make the cubin)."""
    report = {}
    launches = _launch_threads(dump_dir)
    for ptx in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
        if os.path.getsize(ptx) == 0:  # XLA writes empty files for modules without kernels
            continue
        result = subprocess.run([ptxas_path(), "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                                capture_output=True, text=True, timeout=600, check=True)
        text = result.stdout + result.stderr
        for chunk in re.split(r"(?=ptxas info\s+: Compiling entry function)", text):
            name = _ENTRY.search(chunk)
            if not name or kernel_filter not in name.group(1):
                continue
            row = {key: int(m.group(1)) if (m := pattern.search(chunk)) else 0
                   for key, pattern in _FIGURES.items()}
            threads, launch_smem = launches.get(name.group(1), (0, 0))
            row.update(threads=threads, smem=row["smem"] + launch_smem)
            row["occupancy"] = occupancy(row["registers"], threads, row["smem"]) if threads \
                else None
            report[name.group(1)] = row
    return report


def compile_with_ptxas(fn, *abstract_args, **jit_kwargs):
    """``compile_for("h100", ...)`` plus ``ptxas_report`` of its dumped PTX."""
    with tempfile.TemporaryDirectory(prefix="safetriage-xla-dump-") as dump:
        lowered, compiled, seconds = compile_for("h100", fn, *abstract_args, dump_to=dump,
                                                 **jit_kwargs)
        return lowered, compiled, seconds, ptxas_report(dump)
