"""Content checksums of a checkpoint's arrays, written beside them and compared at restore.

TensorStore keeps no checksum of the array bytes it writes, and most damage inside its compressed chunks still
decodes: flipping one byte at a time across a saved array's data file, most positions read back as *other finite
numbers* without any error (11 of 13 in tests/test_checksums.py; development_log.md, twenty-ninth session). A resume
from such a checkpoint would go on training from silently wrong weights. So every save records, per array, a 32-bit
sum of its bits, and every restore recomputes it.

The sum is  sum_i bits[i] * (2 i + 1)  mod 2^32  over the array's elements in row-major order (bits: the element's
raw bits as an unsigned integer; 8-byte types as two 32-bit words). Any change of one element changes it (the weight
2 i + 1 is odd, so invertible mod 2^32); integer addition is exact in any order, so the sum is the same whatever the
mesh, sharding or device count that wrote or reads the array. It runs on the devices in one jitted pass per save or
restore and moves one word per array to the host.
"""

import jax
import jax.numpy as jnp
import numpy as np

from training.sharding import host_value

FORMAT = {"version": 1, "sum": "uint32: sum_i bits[i] * (2 i + 1) mod 2^32, row-major, per array"}


def _bits(a):
    """The elements' raw bits as uint32 (bool as 0/1; 8-byte types get a trailing axis of two words)."""
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    if a.dtype == jnp.bool_:
        return a.astype(jnp.uint32)
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[a.dtype.itemsize]
    return jax.lax.bitcast_convert_type(a, word).astype(jnp.uint32)


def _one(a):
    bits = _bits(a)
    index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):   # the row-major position, built per axis: no reshape of a sharded array
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _sums(leaves):
    return jnp.stack([_one(a) for a in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def named_leaves(tree, prefix: str = "") -> list[tuple[str, jax.Array]]:
    """(name, array) for every array of a pytree, in tree order: 'params.final.weight', "train['step']"."""
    return [(f"{prefix}{jax.tree_util.keystr(path)}", a) for path, a in jax.tree_util.tree_leaves_with_path(tree)
            if isinstance(a, (jax.Array, np.ndarray))]


def checksums(items: dict) -> dict:
    """{item: [checksum per array, in tree order]} for a dict of pytrees. A collective when arrays span processes:
    every process calls it (as every process saves and restores)."""
    per_item = {name: named_leaves(tree) for name, tree in items.items()}
    values = [int(v) for v in host_value(_sums([jnp.asarray(a) for leaves in per_item.values() for _, a in leaves]))]
    out, i = {}, 0
    for name, leaves in per_item.items():
        out[name], i = values[i:i + len(leaves)], i + len(leaves)
    return out


def mismatches(items: dict, saved: dict) -> list[str]:
    """The names of the arrays of `items` whose checksum differs from `saved` (checksums()' output for the same
    items); an item whose number of arrays differs is named whole."""
    now, bad = checksums(items), []
    for name, tree in items.items():
        if len(saved.get(name, [])) != len(now[name]):
            bad.append(name)
            continue
        bad += [k for (k, _), a, b in zip(named_leaves(tree, name), now[name], saved[name]) if int(a) != int(b)]
    return bad


def step_digest(ckpt_dir, step: int) -> str | None:
    """sha256 of the array checksums a step of `ckpt_dir` recorded: which weights it holds, cheaply (a small JSON
    file); None for a checkpoint from before checksums were recorded."""
    import hashlib
    from pathlib import Path

    try:
        return hashlib.sha256((Path(str(ckpt_dir)) / str(step) / "checksums" / "metadata").read_bytes()).hexdigest()
    except OSError:
        return None
