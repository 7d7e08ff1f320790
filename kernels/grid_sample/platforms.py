"""Kernel or interpreter, decided by the platform a program is lowered for.

``interpret=None`` must not mean "interpret unless the host's default backend is the kernel's":
a program traced on a CPU host and compiled ahead of time for a TPU or GPU would then carry the
interpreter, not the kernel. ``kernel_or_interpreter`` traces both and binds one primitive
whose lowering keeps the kernel where the program is lowered for the kernel's platform and
the interpreter everywhere else, so one jitted function gets the real kernel for each target.

(``jax.lax.platform_dependent`` does the same for effect-free branches; TPU interpret mode
has ordered I/O effects, whose tokens jax 0.10's platform-dependent ``cond`` drops when it
lowers only the kernel branch. Here the tokens pass through the kernel unchanged.)
"""

import jax
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

kernel_or_interpreter_p = jex_core.Primitive("kernel_or_interpreter")
kernel_or_interpreter_p.multiple_results = True


@kernel_or_interpreter_p.def_effectful_abstract_eval
def _abstract_eval(*avals, kernel, interpreter, platforms):
    del avals, platforms
    return interpreter.out_avals, interpreter.effects | kernel.effects


def _lowering_for(platform):
    """The lowering rule for ``platform``: the kernel if it is one of the call's kernel
    platforms, else the interpreter (tokens of the interpreter's effects pass through)."""
    def rule(ctx, *args, kernel, interpreter, platforms):
        chosen = kernel if platform in platforms else interpreter
        return mlir.lower_fun(jex_core.jaxpr_as_fun(chosen), multiple_results=True)(ctx, *args)
    return rule


def _batching(args, dims, *, kernel, interpreter, platforms):
    batched = [jax.make_jaxpr(jax.vmap(jex_core.jaxpr_as_fun(closed), in_axes=dims))(*args)
               for closed in (kernel, interpreter)]
    outs = kernel_or_interpreter_p.bind(*args, kernel=batched[0], interpreter=batched[1],
                                        platforms=platforms)
    return outs, [0] * len(outs)


mlir.register_lowering(kernel_or_interpreter_p, _lowering_for(None))  # CPU and the rest
for _platform in ("tpu", "cuda", "rocm"):
    mlir.register_lowering(kernel_or_interpreter_p, _lowering_for(_platform), platform=_platform)
batching.primitive_batchers[kernel_or_interpreter_p] = _batching


def kernel_or_interpreter(make_call, kernel_platforms, interpret, *args):
    """``make_call(interpret: bool)(*args)``, the interpret flag chosen by ``interpret``:
    True/False as given; None: False where the program is lowered for one of
    ``kernel_platforms`` ("tpu"; "cuda", "rocm"), True elsewhere."""
    if interpret is not None:
        return make_call(bool(interpret))(*args)
    kernel, out_shapes = jax.make_jaxpr(make_call(False), return_shape=True)(*args)
    interpreter = jax.make_jaxpr(make_call(True))(*args)
    outs = kernel_or_interpreter_p.bind(*args, kernel=kernel, interpreter=interpreter,
                                        platforms=tuple(kernel_platforms))
    return jax.tree.unflatten(jax.tree.structure(out_shapes), outs)
