"""Timing of the op's implementations on ``specs.BENCH_CASES``: forward and forward+backward.

Runs ``xla``, every registered backend whose module's ``PLATFORM`` is the current platform (so
on a CPU only xla), and torch's ``F.grid_sample`` (NCHW, same device) when torch imports.
Columns: median time, effective GB/s (the bytes each pass must at least move: every input read
once and every output written once, over the time) and that bandwidth as a % of a
device-to-device copy measured in the same run. Library only; the CLI is
``experiments/grid_sample_bench.py``.
"""

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax.kernels.grid_sample import api, specs

PASSES = ("forward", "forward+backward")
COPY_BYTES = 256 * 2**20  # size of the buffer the copy baseline moves


def implementations_here(platform=None):
    """"xla" and the registered backends whose module ``PLATFORM`` is ``platform``."""
    platform = platform or jax.default_backend()
    names = ["xla"]
    for name, function in api.IMPLEMENTATIONS.items():
        module = sys.modules[function.__module__]
        if name != "xla" and getattr(module, "PLATFORM", None) == platform:
            names.append(name)
    return names


def pass_bytes(case, backward):
    """Bytes a pass must at least move: inputs read once, outputs written once."""
    item = jnp.dtype(case.dtype).itemsize
    image = int(np.prod(case.image_shape)) * item
    grid = int(np.prod(case.grid_shape)) * 4
    out = int(np.prod(case.grid_shape[:-1])) * case.channels * item
    forward = image + grid + out
    # The backward reads image, grid and the cotangent, and writes d_image and d_grid.
    return forward + (2 * image + 2 * grid + out if backward else 0)


def median_seconds(call, repeats):
    """Median wall time of ``call()`` (which blocks until done) after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_gbps(repeats, num_bytes=COPY_BYTES):
    """Bandwidth (GB/s, read + write) of a device-to-device copy of ``num_bytes``.

    The copy is a jitted negation: one read and one write of every byte, which XLA cannot
    elide or alias to its input (an identity would be forwarded without moving data).
    """
    buffer = jnp.ones((num_bytes // 4,), jnp.float32)
    negate = jax.jit(jnp.negative)
    seconds = median_seconds(lambda: negate(buffer).block_until_ready(), repeats)
    return 2 * num_bytes / seconds / 1e9


def _jax_pass(implementation, case, backward):
    sample = functools.partial(api.grid_sample, padding_mode=case.padding_mode,
                               align_corners=case.align_corners,
                               implementation=implementation)
    if not backward:
        return jax.jit(lambda image, grid, cotangent: sample(image, grid))

    def forward_backward(image, grid, cotangent):
        out, vjp = jax.vjp(sample, image, grid)
        return (out,) + vjp(cotangent.astype(out.dtype))
    return jax.jit(forward_backward)


def time_jax(implementation, case, backward, repeats, rng):
    """Median seconds of one pass of ``implementation`` on ``case``."""
    image, grid, cotangent = specs.make_inputs(case, rng)
    args = (jnp.asarray(image, case.dtype), jnp.asarray(grid), jnp.asarray(cotangent))
    call = _jax_pass(implementation, case, backward)
    return median_seconds(lambda: jax.block_until_ready(call(*args)), repeats)


def time_torch(case, backward, repeats, rng):
    """Median seconds of torch ``F.grid_sample`` on ``case`` (NCHW, the image repeated T
    times: torch has no grid batch over a shared image), or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, case.dtype)
    image, grid, cotangent = specs.make_inputs(case, rng)
    image_NCHW = torch.tensor(np.repeat(np.asarray(image, np.float32), case.repeats, 0),
                              device=device).permute(0, 3, 1, 2).contiguous().to(dtype)
    grid = torch.tensor(grid, device=device).to(dtype)
    cotangent_NCHW = torch.tensor(cotangent, device=device).permute(0, 3, 1, 2).to(dtype)
    image_NCHW.requires_grad_(backward)
    grid.requires_grad_(backward)

    def call():
        out = F.grid_sample(image_NCHW, grid, mode="bilinear", padding_mode=case.padding_mode,
                            align_corners=case.align_corners)
        if backward:
            out.backward(cotangent_NCHW)
        if device == "cuda":
            torch.cuda.synchronize()

    return median_seconds(call, repeats)


def run(cases, implementations=None, repeats=10, rng=None, with_torch=True,
        copy_bytes=COPY_BYTES):
    """Rows (dicts) of case x pass x implementation, with the copy bandwidth of this run."""
    rng = rng or np.random.default_rng(0)
    implementations = implementations or implementations_here()
    copy = copy_gbps(repeats, copy_bytes)
    rows = []
    for case in cases:
        for backward, pass_name in zip((False, True), PASSES):
            timers = {name: functools.partial(time_jax, name) for name in implementations}
            if with_torch:
                timers["torch"] = time_torch
            for name, timer in timers.items():
                seconds = timer(case, backward, repeats, rng)
                if seconds is None:
                    continue
                gbps = pass_bytes(case, backward) / seconds / 1e9
                rows.append({"case": str(case), "pass": pass_name, "implementation": name,
                             "ms": 1e3 * seconds, "gbps": gbps, "copy_pct": 100 * gbps / copy,
                             "copy_gbps": copy})
    return rows


def limit_batch(cases, max_batch):
    """The cases with their image batch capped at ``max_batch`` (small runs on a CPU)."""
    return [dataclasses.replace(c, batch=min(c.batch, max_batch)) for c in cases]


def format_table(rows):
    """The rows as a fixed-width text table."""
    width = max([len("case")] + [len(row["case"]) for row in rows])
    header = (f"{'case':<{width}} {'pass':<16} {'implementation':<14} {'ms':>9} {'GB/s':>7} "
              f"{'% copy':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['case']:<{width}} {row['pass']:<16} {row['implementation']:<14} "
                     f"{row['ms']:>9.2f} {row['gbps']:>7.2f} {row['copy_pct']:>7.1f}")
    return "\n".join(lines)
