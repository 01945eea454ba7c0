"""Checkpoint checksums (training/checksums.py): every one-element change is seen, and a checkpoint whose array bytes
were damaged on disk, or whose files were mixed with another step's, is refused at restore in one line, and that line
is all the real script prints on stderr.
(That the sum does not depend on the mesh is covered by tests/test_sharding.py: a checkpoint saved from a 2x4 mesh
restores, checksums verified, onto 1x8 and 8x1.)"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_stage1
from conftest import tiny_overrides
from faults_helpers import run_cli
from models import build_model
from training import checksums
from training.checkpoint import Checkpointer, read_config
from training.cli import compose
from training.errors import UserError


def test_every_one_element_change_changes_the_sum():
    rng = np.random.RandomState(0)
    arrays = {"f32": jnp.asarray(rng.randn(3, 5, 7), jnp.float32), "bf16": jnp.asarray(rng.randn(4, 6), jnp.bfloat16),
              "i32": jnp.asarray(rng.randint(-9, 9, (11,)), jnp.int32), "key": jax.random.PRNGKey(3),
              "typed_key": jax.random.key(3), "flag": jnp.asarray(rng.rand(9) > 0.5), "scalar": jnp.float32(2.5)}
    names = list(arrays)   # a list keeps this order in the tree (a dict's keys would be sorted)
    base = checksums.checksums({"x": list(arrays.values())})["x"]
    assert len(base) == len(names)
    assert base == checksums.checksums({"x": [jnp.copy(a) for a in arrays.values()]})["x"]   # same content, same sums
    for i, (name, a) in enumerate(arrays.items()):
        raw = np.asarray(jax.random.key_data(a) if name == "typed_key" else a)
        for pos in rng.choice(raw.size, min(raw.size, 4), replace=False):
            flat = raw.reshape(-1).copy()
            if flat.dtype == np.bool_:
                flat[pos] = ~flat[pos]
            else:   # one random bit of the element
                bits = flat.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[flat.dtype.itemsize])
                bits[pos] ^= bits.dtype.type(1 << rng.randint(8 * flat.dtype.itemsize))
            changed = flat.reshape(raw.shape)
            changed = jax.random.wrap_key_data(jnp.asarray(changed)) if name == "typed_key" else jnp.asarray(changed)
            sums = checksums.checksums({"x": list({**arrays, name: changed}.values())})["x"]
            assert sums[i] != base[i] and sums[:i] + sums[i + 1:] == base[:i] + base[i + 1:], (name, pos)
    # Positions count, not just the multiset of values: two unequal elements swapped.
    a = arrays["f32"]
    swapped = a.at[0, 0, 0].set(a[2, 4, 6]).at[2, 4, 6].set(a[0, 0, 0])
    assert checksums.checksums({"x": [swapped]})["x"] != checksums.checksums({"x": [a]})["x"]


def _data_files(item_dir):
    return sorted(item_dir.rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def test_damaged_or_mixed_checkpoint_files_are_refused(digits_root, tmp_path, monkeypatch, capsys):
    ck = tmp_path / "run"
    over = tiny_overrides(digits_root, str(ck), steps=8)   # checkpoints at steps 4 and 8
    train_stage1.main(compose("config", over))
    saved, step = read_config(str(ck))
    model = build_model(saved["model_spec"], key=jax.random.PRNGKey(0))
    assert step == 8 and (ck / "8" / "checksums").is_dir()
    good = ck.parent / "good"
    shutil.copytree(ck, good)

    # Another step's weights in this step's folder: every file intact and decodable, the values finite, the tree
    # right; only the checksums tell. Resume names the arrays and the step before; sampling's restore refuses too.
    shutil.rmtree(ck / "8" / "params")
    shutil.copytree(ck / "4" / "params", ck / "8" / "params")
    line = run_cli(monkeypatch, capsys, over + ["train.is_restore=true"])
    assert f"checkpoint {ck / '8'} cannot be read" in line and "checksum mismatch in params" in line, line
    assert "the latest checkpoint is then step 4" in line, line
    with Checkpointer(str(ck), create=False) as c:
        with pytest.raises(UserError, match="checksum mismatch in params"):
            c.restore_weights(model, 8, item="params")
        c.restore_weights(model, 8, item="ema")   # the EMA item is intact and restores

    # Bytes flipped inside the EMA's compressed array data: most such flips still decode, to other finite numbers.
    # None may restore as other values: each is refused (the checksum catches those that decode) or, where the byte
    # was one the decoder does not use, reads back the very same weights.
    shutil.rmtree(ck)
    shutil.copytree(good, ck)
    with Checkpointer(str(ck), create=False) as c:
        clean = [np.asarray(a) for a in jax.tree.leaves(c.restore_weights(model, 8))]
    data = _data_files(ck / "8" / "ema")[-1]
    original = data.read_bytes()
    outcomes = []
    for pos in range(7, len(original), max(1, len(original) // 12)):
        damaged = bytearray(original)
        damaged[pos] ^= 0x5A
        data.write_bytes(bytes(damaged))
        try:
            with Checkpointer(str(ck), create=False) as c:
                got = [np.asarray(a) for a in jax.tree.leaves(c.restore_weights(model, 8))]
            assert all(np.array_equal(a, b) for a, b in zip(got, clean, strict=True)), f"byte {pos}: other weights"
            outcomes.append("same")
        except UserError as e:
            assert "cannot be read" in str(e), e
            outcomes.append("checksum" if "checksum mismatch" in str(e) else "decode error")
    data.write_bytes(original)
    # A checkpoint written before checksums existed (no `checksums` item) restores as before.
    shutil.rmtree(ck / "8" / "checksums")
    with Checkpointer(str(ck), create=False) as c:
        assert all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(c.restore_weights(model, 8)),
                                                                   clean, strict=True))
    assert len(outcomes) >= 10 and outcomes.count("checksum") >= 3, outcomes


def test_damaged_checkpoint_is_one_line_on_stderr(digits_root, tmp_path):
    """A restore that fails on damaged files leaves Orbax's other reads in flight; their errors (unraisable
    "Event loop is closed", asyncio's "exception was never retrieved") used to print tens of traceback lines around
    the one-line message, some before it. The real script, in a subprocess: stderr is that one line."""
    import logging
    import sys
    import types

    from faults_helpers import run_script
    from training import errors

    ck = tmp_path / "run"
    over = tiny_overrides(digits_root, str(ck), steps=8)
    train_stage1.main(compose("config", over))
    for f in (ck / "8" / "params").rglob("ocdbt.process_0/d/*"):
        f.write_bytes(f.read_bytes()[:16])   # truncated: every read of the step fails
    rc, s = run_script(over + ["train.is_restore=true"], timeout=300)
    lines = s.stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: checkpoint {ck / '8'} cannot be read"), \
        s.output()

    # The filters themselves, deterministically: those errors are dropped, any other passes through.
    seen, previous = [], sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(str(u.exc_value))
    try:
        errors.quiet_abandoned_reads()
        errors.quiet_abandoned_reads()   # once only: the hook is not stacked
        for err in (RuntimeError("Event loop is closed"), RuntimeError("something else")):
            sys.unraisablehook(types.SimpleNamespace(exc_value=err))
        assert seen == ["something else"]
    finally:
        sys.unraisablehook = previous
    log = logging.getLogger("asyncio")
    records = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None) for msg in (
        'Future exception was never retrieved\nfuture: <Future finished exception=ValueError(\'OUT_OF_RANGE: Error '
        'reading "w/0.0" in OCDBT database at local file "x"\')>', "Task exception was never retrieved\nfuture: other")]
    assert [bool(log.filter(r)) for r in records] == [False, True]
