"""Sharded training on 8 fake CPU devices equals one device; a sharded checkpoint restores onto another mesh.

`--xla_force_host_platform_device_count=8` must be set before JAX starts and slows ordinary 1-device tests, so the
checks run in one child process (this file run as a script); the pytest side only starts it and reads its verdict.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
MESHES = [(8, 1), (2, 4), (1, 8)]
STEPS = 3
ROWS = 32  # global batch (rows per step, all micro-batches together)


def _child_env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    return env


def run_child(script: Path, args: list[str], devices: int, timeout: int = 240) -> dict:
    proc = subprocess.run([sys.executable, str(script), *args], env=_child_env(devices), capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_meshes_match_one_device_and_checkpoints_move_between_meshes(tmp_path):
    out = run_child(Path(__file__), ["child", str(tmp_path)], devices=8)
    assert out["devices"] == 8
    for name, r in out["runs"].items():
        # same loss at every step and the same params / optimizer state / EMA after STEPS steps, within 1e-5 (fp32)
        assert r["loss_diff"] < 1e-5, (name, r)
        assert r["state_diff"] < 1e-5, (name, r)
        assert r["steps"] == STEPS
        fsdp = int(name.split("x")[1].split("-")[0])
        if fsdp > 1:  # the big matrices (params, Adam moments, EMA) really are split over fsdp, and stay so
            assert r["sharded_leaves"] > 0 and r["sharded_leaves"] == r["expected_sharded_leaves"], (name, r)
        else:
            assert r["sharded_leaves"] == 0, (name, r)
    ck = out["checkpoint"]
    assert ck["max_diff"] == 0.0, ck  # bit-exact values after the move
    assert ck["restored_on_target_mesh"], ck  # each array carries the target mesh's rule sharding
    assert ck["train_continues_diff"] < 1e-5, ck  # and training goes on from it as on the source mesh


# ----------------------------------------------------------------------------------------------- child process

def _setup(accum: int = 1):
    from models import build_model, model_spec
    from training.cli import compose
    from training.optim import make_optimizer
    from training.state import init_state, split_keys

    cfg = compose("config", ["model=tiny", "model.depth=2", f"train.grad_accum={accum}", "train.precision=float32",
                             f"train.batch_size={ROWS // accum}", "optim.warmup_steps=1", "train.steps=10"])
    spec = model_spec(cfg.model, {"shape": [8, 8, 4], "num_classes": 10})
    model_key, train_key = split_keys(0)
    optimizer, schedule = make_optimizer(cfg.train, cfg.optim)
    state = init_state(build_model(spec, key=model_key), optimizer, train_key)
    return cfg, optimizer, schedule, state


def _batches(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((ROWS, 8, 8, 4)).astype(np.float32),
             "label": rng.integers(0, 10, ROWS).astype(np.int32)} for _ in range(n)]


_STEPS = {}  # one jitted step per (mesh, accum): each compiles once per child process


def _train(mesh, accum: int, steps: int = STEPS, state=None):
    import jax

    from training import sharding
    from training.step import make_train_step

    cfg, optimizer, schedule, fresh = _setup(accum)
    state = fresh if state is None else state
    if mesh is not None:
        state = sharding.place(state, mesh)
    key = (None if mesh is None else tuple(mesh.shape.values()), accum)
    if key not in _STEPS:
        _STEPS[key] = make_train_step(cfg.train, optimizer, schedule, 10, mesh=mesh)
    step = _STEPS[key]
    losses = []
    for b in _batches(steps):
        batch = sharding.global_batch(b, mesh) if mesh is not None else jax.tree.map(jax.numpy.asarray, b)
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


def _arrays(state):
    import equinox as eqx
    import jax
    import numpy as np

    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


def _max_diff(a, b) -> float:
    import numpy as np

    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
               for x, y in zip(_arrays(a), _arrays(b), strict=True))


def _sharded(state, mesh):
    """(leaves split over fsdp, leaves the rule says to split) among params, optimizer state and EMA."""
    import equinox as eqx
    import jax

    from training.sharding import param_spec

    leaves = jax.tree.leaves(eqx.filter((state.params, state.opt_state, state.ema), eqx.is_array))
    fsdp = mesh.shape["fsdp"]
    got = sum("fsdp" in str(a.sharding.spec) for a in leaves)
    want = sum("fsdp" in str(param_spec(a.shape, fsdp)) for a in leaves)
    return got, want


def child(tmp: str) -> dict:
    import grain
    import jax

    from training import sharding
    from training.checkpoint import Checkpointer

    mk = lambda d, f: sharding.make_mesh(SimpleNamespace(data=d, fsdp=f))
    ref_state, ref_losses = _train(None, 1)  # one device, no mesh
    runs = {}
    for (d, f), accum in [(m, 1) for m in MESHES] + [((2, 4), 2)]:
        mesh = mk(d, f)
        state, losses = _train(mesh, accum)
        got, want = _sharded(state, mesh)
        runs[f"{d}x{f}-accum{accum}"] = {
            "steps": len(losses), "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "state_diff": _max_diff(state, ref_state), "sharded_leaves": got, "expected_sharded_leaves": want}

    # checkpoint written from a (2,4) mesh, restored onto (1,8) and onto (8,1) templates
    src_mesh = mk(2, 4)
    state, _ = _train(src_mesh, 1, steps=2)
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    ckpt = Checkpointer(str(Path(tmp) / "ckpt"), keep=1)
    ckpt.save(state, it, {"note": "test"})
    ckpt.close()
    saved = _arrays(state)
    cont_src, _ = _train(src_mesh, 1, steps=1, state=state)
    ok, diffs, cont = True, [], []
    for d, f in [(1, 8), (8, 1)]:
        mesh = mk(d, f)
        _, _, _, fresh = _setup(1)
        template = sharding.place(fresh, mesh)
        ckpt = Checkpointer(str(Path(tmp) / "ckpt"), keep=1, create=False)
        restored = ckpt.restore(template, iter(grain.MapDataset.range(100).to_iter_dataset()))
        ckpt.close()
        leaves = jax.tree.leaves(eqx_arrays(restored.params, restored.opt_state, restored.ema))
        ok &= all(a.sharding.is_equivalent_to(w, a.ndim) and a.sharding.mesh.shape == w.mesh.shape
                  for a, w in zip(leaves, jax.tree.leaves(sharding.state_shardings(leaves, mesh)), strict=True))
        diffs.append(max(float(abs(x - y).max()) if x.size else 0.0 for x, y in zip(_arrays(restored), saved)))
        cont_state, _ = _train(mesh, 1, steps=1, state=restored)
        cont.append(_max_diff(cont_state, cont_src))
    return {"devices": jax.device_count(), "runs": runs,
            "checkpoint": {"max_diff": max(diffs), "restored_on_target_mesh": bool(ok),
                           "train_continues_diff": max(cont)}}


def eqx_arrays(*trees):
    import equinox as eqx

    return eqx.filter(trees, eqx.is_array)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    sys.path.insert(0, str(ROOT))
    print(json.dumps(child(sys.argv[2])), flush=True)
