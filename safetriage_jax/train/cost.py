"""Where a lowered/compiled step spends its FLOPs and bytes: convolutions per dtype, memory, fusions.

Reads the text XLA prints, so it needs no device: StableHLO of a ``jax.stages.Lowered`` for
the convolutions (counted through the call graph, so an outlined function called twice counts
twice) and the optimised HLO of a ``Compiled`` for its largest fusions.
"""

import collections
import math
import re

from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.policy import Policy

_NAME = r'@("[^"]+"|[\w.$-]+)'  # symbol names: quoted when not identifiers (@"<lambda>")
_FUNC = re.compile(r"func\.func\s+(?:public\s+|private\s+)?" + _NAME)
_CALL = re.compile(r"(?:func\.)?call\s+" + _NAME)
_CONV = re.compile(r"stablehlo\.convolution.*?dim_numbers\s*=\s*\[([^\]]*)\]x\[([^\]]*)\]->\[([^\]]*)\]"
                   r".*:\s*\(tensor<([^>]*)>,\s*tensor<([^>]*)>\)\s*->\s*tensor<([^>]*)>")
_HLO_SHAPE = re.compile(r"\b(pred|[fsu]\d+|bf16|c\d+)\[([\d,]*)\]")
_HLO_FUSION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*(.*?)\s+fusion\((.*?)\),\s*kind=(\w+)")
_BITS = {"pred": 8, "bf16": 16}


# XLA:CPU's instruction scheduler that minimises live memory (its default favours concurrency
# and may keep much more live); pass as ``compile(compiler_options=...)``.
CPU_MEMORY_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def parse_variant(text):
    """'precision[:remat[:micro_batches]]' -> train overrides, e.g. 'bfloat16:conv_outputs:2'."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"variant {text!r}: expected precision[:remat[:micro_batches]]")
    precision, remat, micro_batches = parts + [""] * (3 - len(parts))
    if micro_batches and (not micro_batches.isdigit() or int(micro_batches) < 1):
        raise ValueError(f"variant {text!r}: micro_batches must be a positive integer")
    try:
        Policy(precision, remat or "none")  # known names
    except SafeTriageError as error:
        raise ValueError(f"variant {text!r}: {error}") from None
    return {"precision": precision, "remat": remat or "none",
            "micro_batches": int(micro_batches or 1)}


def _tensor(spec):
    """'28x256x256x64xbf16' -> ((28, 256, 256, 64), 'bf16')."""
    *dims, dtype = spec.split("x")
    return tuple(int(d) for d in dims), dtype


def _conv_flops(kernel_layout, kernel_type, out_type):
    """2 x output elements x (kernel window x kernel input features) of one convolution."""
    kernel_shape, _ = _tensor(kernel_type)
    out_shape, _ = _tensor(out_type)
    layout = [d.strip() for d in kernel_layout.split(",")]
    per_output = math.prod(size for size, d in zip(kernel_shape, layout) if d.isdigit())
    per_output *= kernel_shape[layout.index("i")]
    return 2 * math.prod(out_shape) * per_output


def conv_flops_by_dtype(stablehlo_text):
    """{operand dtype: FLOPs} of every ``stablehlo.convolution`` reachable from ``@main``.

    A convolution whose two operands differ in dtype counts under 'lhs_dtype*rhs_dtype'.
    """
    direct = collections.defaultdict(lambda: collections.Counter())
    calls = collections.defaultdict(list)
    function = None
    for line in stablehlo_text.splitlines():
        if (match := _FUNC.search(line)):
            function = match.group(1)
            continue
        if (match := _CONV.search(line)):
            _, kernel_layout, _, lhs, rhs, out = match.groups()
            lhs_dtype, rhs_dtype = _tensor(lhs)[1], _tensor(rhs)[1]
            key = lhs_dtype if lhs_dtype == rhs_dtype else f"{lhs_dtype}*{rhs_dtype}"
            direct[function][key] += _conv_flops(kernel_layout, rhs, out)
        for callee in _CALL.findall(line):
            calls[function].append(callee)

    totals = {}

    def total(name):
        if name not in totals:
            counter = collections.Counter(direct[name])
            for callee in calls[name]:
                counter.update(total(callee))
            totals[name] = counter
        return totals[name]

    return dict(total("main"))


def conv_share(flops_by_dtype, dtype):
    """Fraction of convolution FLOPs whose operands are both ``dtype``."""
    return flops_by_dtype.get(dtype, 0) / max(sum(flops_by_dtype.values()), 1)


def _shapes_bytes(text):
    total = 0
    for dtype, dims in _HLO_SHAPE.findall(text):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype))
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def largest_fusions(hlo_text, top=10):
    """The ``top`` fusions of optimised HLO text by bytes touched (output + operands), as
    dicts with name, kind, output (its shape text) and bytes."""
    fusions = []
    for line in hlo_text.splitlines():
        if (match := _HLO_FUSION.match(line)):
            name, output, operands, kind = match.groups()
            fusions.append({"name": name, "kind": kind, "output": output.split("{")[0],
                            "bytes": _shapes_bytes(output) + _shapes_bytes(operands)})
    return sorted(fusions, key=lambda f: -f["bytes"])[:top]


def memory(compiled):
    """XLA's compiled memory estimate in bytes: arguments, outputs, temporaries, aliased
    (donated arguments reused as outputs) and their total, the peak the step needs."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    sizes = {"arguments": analysis.argument_size_in_bytes,
             "outputs": analysis.output_size_in_bytes,
             "temporaries": analysis.temp_size_in_bytes,
             "aliased": analysis.alias_size_in_bytes}
    sizes["total"] = sizes["arguments"] + sizes["outputs"] + sizes["temporaries"] - sizes["aliased"]
    return sizes
