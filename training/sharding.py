"""One device mesh per run, built from config, and the rules that place batches and parameters on it.

Mesh axes ("data", "fsdp"). The batch is split over both axes. Parameters, optimizer state and EMA are sharded over
"fsdp" by a shape rule (the largest axis divisible by the fsdp size, for arrays big enough to matter) and
replicated when fsdp = 1. XLA (GSPMD/Shardy) inserts the all-gathers and reduce-scatters.
"""

import functools
import math

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from training.errors import UserError

MIN_SHARD_SIZE = 2 ** 14  # smaller arrays are replicated: sharding them costs more in collectives than it saves


def make_mesh(mesh_cfg) -> Mesh:
    devices = np.array(jax.devices())
    get = (lambda k: mesh_cfg[k]) if isinstance(mesh_cfg, dict) else (lambda k: getattr(mesh_cfg, k))
    data, fsdp = int(get("data")), int(get("fsdp"))
    if data == -1 and fsdp == -1:
        raise UserError("mesh.data and mesh.fsdp cannot both be -1")
    if data == -1:
        data = len(devices) // max(fsdp, 1)
    if fsdp == -1:
        fsdp = len(devices) // max(data, 1)
    if data * fsdp != len(devices):
        raise UserError(f"mesh {data}x{fsdp} does not match the {len(devices)} devices: set mesh.data and mesh.fsdp "
                        f"so that their product is {len(devices)} (-1 = the rest)")
    # jax.sharding.Mesh uses Auto axes, so ordinary model code needs no explicit sharding annotations.
    return Mesh(devices.reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    if fsdp == 1 or math.prod(shape) < MIN_SHARD_SIZE:
        return P()
    candidates = [i for i, s in enumerate(shape) if s % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def state_shardings(tree, mesh: Mesh):
    """A NamedSharding for every array leaf of a pytree (None for non-arrays), by the rule above."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda a: NamedSharding(mesh, param_spec(a.shape, fsdp)) if eqx.is_array(a) else None, tree)


def place(tree, mesh: Mesh):
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, state_shardings(arrays, mesh)), static)


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """Assemble the global batch from this process's rows (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def constrain(tree, mesh: Mesh | None):
    """Inside jit: pin every array leaf to its rule sharding (params, optimizer state, EMA stay sharded over fsdp)."""
    if mesh is None:
        return tree
    arrays, static = eqx.partition(tree, eqx.is_array)
    arrays = jax.tree.map(jax.lax.with_sharding_constraint, arrays, state_shardings(arrays, mesh))
    return eqx.combine(arrays, static)


def constrain_batch(tree, mesh: Mesh | None, axis: int = 0):
    """Inside jit: split `axis` of every array over all devices (the batch axis)."""
    if mesh is None:
        return tree
    spec = lambda a: NamedSharding(mesh, P(*([None] * axis + [("data", "fsdp")])))
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec(a)), tree)


def host_value(x):
    """A replicated (e.g. scalar) array as numpy, from this process's own copy: works when the array spans processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def host_local(tree, mesh: Mesh):
    """Every array leaf as a whole host (numpy) array on every process; unchanged in a single-process run.

    A collective when there are several processes: all of them must call it (e.g. before process 0 samples). The
    gather runs as one program on the run's own mesh, whose gloo communicator the train step has already formed
    (multihost_utils.process_allgather would form a new one per call and compile one program per leaf)."""
    if jax.process_count() == 1:
        return tree
    barrier("host_local")  # line the processes up first: gloo gives a collective 30 s to start on all of them
    arrays, static = eqx.partition(tree, eqx.is_array)
    replicated = _replicator(mesh)(arrays)
    return eqx.combine(jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), replicated), static)


@functools.lru_cache(maxsize=4)
def _replicator(mesh: Mesh):
    """One jitted identity per mesh that replicates its input: made inside host_local, it compiled again at every
    sample grid."""
    return jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))


_BARRIERS = {}


def barrier(name: str, timeout_s: int = 600) -> None:
    """Wait until every process gets here (the coordination service's barrier, no device collective)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _dist  # the client jax.distributed.initialize started

    _BARRIERS[name] = _BARRIERS.get(name, 0) + 1
    _dist.global_state.client.wait_at_barrier(f"{name}-{_BARRIERS[name]}", timeout_in_ms=timeout_s * 1000)
