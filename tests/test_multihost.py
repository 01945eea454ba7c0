"""Two processes on localhost (jax.distributed, CPU gloo collectives) train like one process.

Each process is a child (this file run as a script, or train_stage1.py) with 2 CPU devices: 4 global devices on a
(data 2, fsdp 2) mesh, so parameters are split across devices and the batch across processes. Each process supplies
only its own rows; the global batch is assembled with jax.make_array_from_process_local_data.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS, ROWS = 3, 16
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_overrides  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    return env


def launch(cmds: list[list[str]], devices: int, timeout: int = 900) -> list[str]:
    """Start the processes together (they wait for each other), return their stdout; fail with their output."""
    procs = [subprocess.Popen(c, env=_env(devices), cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    return outs


def test_two_processes_train_like_one_and_checkpoint(tmp_path):
    me = str(Path(__file__))
    port = free_port()
    launch([[sys.executable, me, "child", str(tmp_path / "one"), "0", "1", "0"]], devices=1)
    launch([[sys.executable, me, "child", str(tmp_path / "two"), str(i), "2", str(port)] for i in range(2)], devices=2)
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2 and two["devices"] == 4 and two["mesh"] == [2, 2]
    assert two["sharded_leaves"] > 0  # parameters really were split (over fsdp, across each process's devices)
    np.testing.assert_allclose(two["losses"], one["losses"], atol=1e-5, rtol=0)
    # the checkpoint the two processes wrote together restores in this single-device process (no data iterator
    # state for 1 process: a fresh pass) and holds the same params, AdamW state and EMA as the one-process run
    import equinox as eqx
    import grain
    import jax

    from training.checkpoint import Checkpointer

    _, _, _, template = _setup()
    ckpt = Checkpointer(str(tmp_path / "two" / "ckpt"), create=False)
    restored = ckpt.restore(template, iter(grain.MapDataset.range(64).to_iter_dataset()))
    ckpt.close()
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(eqx.filter(restored, eqx.is_array))]
    a = np.load(tmp_path / "one" / "state.npz", allow_pickle=False)
    assert len(a.files) == len(leaves) > 10 and int(restored.step) == STEPS
    assert max(float(np.max(np.abs(a[f"a{i}"] - x))) for i, x in enumerate(leaves) if x.size) < 1e-5
    assert sorted(p.name for p in (tmp_path / "two" / "ckpt" / str(STEPS) / "data").iterdir()
                  if p.suffix == ".json") == ["process_0-of-2.json", "process_1-of-2.json"]


def test_train_stage1_runs_as_two_processes(tmp_path, digits_root):
    """The real entry point and loop: distributed init from config, per-process Grain shards, sharded step with
    accumulation, one log/sample writer, a checkpoint both processes contribute to."""
    port = free_port()
    ckpt_dir = tmp_path / "ck"
    # The default autoguidance and evaluation: the final grid restores the weak EMA, which Orbax synchronises over
    # all processes (process 0 alone waited there until JAX's shutdown barrier aborted both), as global arrays that
    # process 0 alone cannot compute with once the others have left (a gloo "connection closed" at the grid).
    over = tiny_overrides(digits_root, str(ckpt_dir), steps=4, **{"train.grad_accum": 2, "train.batch_size": 8,
                                                                     "mesh.fsdp": 2, "sampler.chunk": 16,
                                                                     "sampler.guidance": "auto", "eval.at_end": True,
                                                                     "eval.num_samples": 20,
                                                                     # MLP 64 x 256: arrays large enough to be sharded
                                                                     "model.hidden_size": 64})
    cmds = [[sys.executable, "train_stage1.py", *over, "distributed.coordinator_address=127.0.0.1:%d" % port,
             "distributed.num_processes=2", f"distributed.process_id={i}", "distributed.local_device_ids=0"]
            for i in range(2)]
    outs = launch(cmds, devices=2)
    # JAX applies local_device_ids to GPUs only: on CPU each process still has both its devices, and is told so
    assert all("local_device_ids=0 has no effect on CPU devices; each process gets 2" in o for o in outs)
    assert "effective batch 16 = batch_size 8 x grad_accum 2" in outs[0]
    assert "mesh data=2 x fsdp=2 over 2 process(es)" in outs[0]
    assert "effective batch" not in outs[1] and "evaluation: {" in outs[0]  # only process 0 reports, evaluates
    assert sorted(p.name for p in (ckpt_dir / "4" / "data").iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert (ckpt_dir / "samples" / "step0000004.png").is_file() and (ckpt_dir / "2").is_dir()   # 2: the weak EMA


def test_coordinator_mistakes_are_one_line_not_an_abort():
    """JAX aborts from C++ when the coordinator is unreachable; the checks before it turn the usual mistakes into one
    UserError: a process > 0 that cannot reach the address within the timeout, a port process 0 cannot open, an
    address without a port. A reachable coordinator passes."""
    import time

    import pytest

    from training.distributed import check_coordinator
    from training.errors import UserError

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(UserError, match=f"process 1 could not reach the coordinator at 127.0.0.1:{port} within"):
        check_coordinator(f"127.0.0.1:{port}", 1, 1)
    assert time.monotonic() - t0 < 10
    with socket.socket() as held:
        held.bind(("", port))
        held.listen()
        check_coordinator(f"127.0.0.1:{port}", 1, 1)                 # reachable: passes at once
        with pytest.raises(UserError, match=f"cannot open the coordinator's port {port}"):
            check_coordinator(f"127.0.0.1:{port}", 0, 1)
    with pytest.raises(UserError, match="must be host:port"):
        check_coordinator("host0", 1, 1)


# ----------------------------------------------------------------------------------------------- child process

def _setup():
    from models import build_model, model_spec
    from training.cli import compose
    from training.optim import make_optimizer
    from training.state import init_state, split_keys

    cfg = compose("config", ["model=tiny", "model.depth=2", "train.precision=float32", f"train.batch_size={ROWS}",
                             "optim.warmup_steps=1", "train.steps=10"])
    spec = model_spec(cfg.model, {"shape": [8, 8, 4], "num_classes": 10})
    model_key, train_key = split_keys(0)
    optimizer, schedule = make_optimizer(cfg.train, cfg.optim)
    return cfg, optimizer, schedule, init_state(build_model(spec, key=model_key), optimizer, train_key)


def child(out: str, pid: int, nproc: int, port: int) -> None:
    from training import distributed

    distributed.initialize({"coordinator_address": f"127.0.0.1:{port}", "num_processes": nproc, "process_id": pid,
                            "timeout_s": 120})
    import equinox as eqx
    import grain
    import jax

    from training import sharding
    from training.checkpoint import Checkpointer
    from training.step import make_train_step

    mesh = sharding.make_mesh({"data": -1, "fsdp": 2 if jax.device_count() > 1 else 1})
    cfg, optimizer, schedule, state = _setup()
    state = sharding.place(state, mesh)
    step = make_train_step(cfg.train, optimizer, schedule, 10, mesh=mesh)
    rng = np.random.default_rng(0)
    per = ROWS // nproc
    losses = []
    for _ in range(STEPS):
        x = rng.standard_normal((ROWS, 8, 8, 4)).astype(np.float32)
        y = rng.integers(0, 10, ROWS).astype(np.int32)
        local = {"x": x[pid * per:(pid + 1) * per], "label": y[pid * per:(pid + 1) * per]}  # this process's rows
        state, m = step(state, sharding.global_batch(local, mesh))
        losses.append(float(sharding.host_value(m["loss"])))
    sharded = sum("fsdp" in str(a.sharding.spec) for a in jax.tree.leaves(eqx.filter(state.params, eqx.is_array)))
    Path(out).mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(str(Path(out) / "ckpt"), keep=1)
    ckpt.save(state, iter(grain.MapDataset.range(64)[pid::nproc].to_iter_dataset()), {"processes": nproc})
    ckpt.close()
    if nproc == 1:
        leaves = [np.asarray(a) for a in jax.tree.leaves(eqx.filter(state, eqx.is_array))]
        np.savez(Path(out) / "state.npz", **{f"a{i}": a for i, a in enumerate(leaves)})
    if pid == 0:
        (Path(out) / "result.json").write_text(json.dumps({
            "processes": jax.process_count(), "devices": jax.device_count(), "losses": losses,
            "mesh": [mesh.shape["data"], mesh.shape["fsdp"]], "sharded_leaves": sharded}))
    distributed.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    sys.path.insert(0, str(ROOT))
    child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
