"""One device mesh per run, built from config, and the rules that place batches and parameters on it.

Mesh axes ("data", "fsdp"). The batch is split over both axes. Parameters, optimizer state and EMA are sharded over
"fsdp" by a shape rule (the largest axis divisible by the fsdp size, for arrays big enough to matter) and
replicated when fsdp = 1. XLA (GSPMD/Shardy) inserts the all-gathers and reduce-scatters.
"""

import math

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from training.errors import UserError

MIN_SHARD_SIZE = 2 ** 14  # smaller arrays are replicated: sharding them costs more in collectives than it saves


def make_mesh(mesh_cfg) -> Mesh:
    devices = np.array(jax.devices())
    data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
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
