"""Interpret mode's Triton ``atomic_add`` made to add, only while one call is lowered.

JAX bug (jax 0.10.2 and 0.11.2): the state-discharge rule of Pallas Triton's ``atomic_rmw``
(``jax/_src/pallas/triton/primitives.py``; used only in interpret mode) writes an add at
gathered indices as ``ref.at[idx].set(ref[idx] + val)``, so of several lanes hitting one
element only the last write survives, and it raises NotImplementedError for any mask. The
d_image kernel needs both.

Interpret mode discharges a ``pallas_call`` when the program is *lowered*, not when it is
traced, so the fix is scoped to a lowering: ``scatter_add_scope(call)`` wraps ``call`` in a
primitive whose lowering rule opens ``scatter_add_discharge()`` (the rule swapped in, the
upstream one put back on exit) around the lowering of ``call`` alone. Nothing else in the
process sees the changed rule.
"""

import contextlib
import inspect

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import primitives as triton_primitives
from jax._src.state import discharge as state_discharge
from jax._src.state import indexing as state_indexing
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

ATOMIC_RMW = triton_primitives.atomic_rmw_p
# The rule's signature: (in_avals, out_avals, *args) in jax 0.10, (ctx, *args) in jax 0.11.
_RULE_TAKES_CONTEXT = next(iter(inspect.signature(
    state_discharge._discharge_rules[ATOMIC_RMW]).parameters)) == "ctx"


def _scatter_add_rule(upstream):
    """A discharge rule for ``atomic_rmw``: gathered-index adds (masked or not) scatter-add;
    every other case goes to ``upstream``."""
    def rule(*args, args_tree, atomic_type):
        if _RULE_TAKES_CONTEXT:
            num_inputs, flat_args = len(args[0].in_avals), args[1:]
        else:
            num_inputs, flat_args = len(args[0]), args[2:]
        ref, transforms, value, mask = args_tree.unflatten(flat_args)
        *outer_transforms, indexer = transforms
        gathered = not any(isinstance(index, state_indexing.Slice) for index in indexer.indices)
        if (atomic_type != triton_primitives.AtomicOpType.ADD or outer_transforms
                or not gathered):
            return upstream(*args, args_tree=args_tree, atomic_type=atomic_type)
        index = tuple(indexer.indices)
        if mask is not None:
            value = jnp.where(mask, value, jnp.zeros_like(value))
        return ((ref.at[index].add(value, mode="drop"),) + (None,) * (num_inputs - 1),
                ref[index])
    return rule


@contextlib.contextmanager
def scatter_add_discharge():
    """While open, interpret mode discharges Triton atomic adds as scatter-adds."""
    upstream = state_discharge._discharge_rules[ATOMIC_RMW]
    state_discharge.register_discharge_rule(ATOMIC_RMW)(_scatter_add_rule(upstream))
    try:
        yield
    finally:
        state_discharge.register_discharge_rule(ATOMIC_RMW)(upstream)


# One primitive carrying the wrapped call's jaxpr; its lowering opens the scope.
scoped_call_p = jex_core.Primitive("grid_sample_interpret_scatter_add")
scoped_call_p.multiple_results = True
scoped_call_p.def_abstract_eval(lambda *avals, jaxpr: jaxpr.out_avals)
scoped_call_p.def_impl(lambda *args, jaxpr: jax.jit(
    lambda *a: scoped_call_p.bind(*a, jaxpr=jaxpr))(*args))


def _lowering(ctx, *args, jaxpr):
    with scatter_add_discharge():
        return mlir.lower_fun(jex_core.jaxpr_as_fun(jaxpr), multiple_results=True)(ctx, *args)


def _batching(args, dims, *, jaxpr):
    batched = jax.vmap(jex_core.jaxpr_as_fun(jaxpr), in_axes=dims)
    outs = _bind(jax.make_jaxpr(batched)(*args), args)
    return outs, [0] * len(outs)


def _bind(closed_jaxpr, args):
    return scoped_call_p.bind(*args, jaxpr=closed_jaxpr)


mlir.register_lowering(scoped_call_p, _lowering)
batching.primitive_batchers[scoped_call_p] = _batching


def scatter_add_scope(call):
    """``call`` (an interpret-mode ``pallas_call``), lowered with the scatter-add rule."""
    def scoped(*args):
        closed_jaxpr, out_shapes = jax.make_jaxpr(call, return_shape=True)(*args)
        return jax.tree.unflatten(jax.tree.structure(out_shapes), _bind(closed_jaxpr, args))
    return scoped
