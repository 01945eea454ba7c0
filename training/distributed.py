"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from the config or the environment.

JAX does the work (coordinator, device discovery, collectives); this module only decides whether and how to call it,
and must run before anything touches devices (`jax.devices()`, `jax.process_index()`, the first array).

Where the parameters come from, first match wins, per parameter:
  1. the config: distributed.coordinator_address / num_processes / process_id / local_device_ids
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS
  3. Slurm (inside `srun`): JAX's own Slurm detection (first node of the step, SLURM_NTASKS, SLURM_PROCID, and one
     GPU per task, SLURM_LOCALID, unless local_device_ids says otherwise; port from JAX_COORDINATOR_PORT or the job id)
`distributed.enabled: auto` initialises when more than one process is asked for (config, JAX_NUM_PROCESSES or
SLURM_NTASKS > 1) and otherwise stays single-process; `true` always initialises; `false` never does.
"""

import os

from training.errors import UserError

SHUTDOWN_TIMEOUT_S = 3600   # how long a finished process waits at exit for the others (process 0's evaluation)
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _int(value, what: str):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be an integer, got {value!r}") from None


def in_slurm_step() -> bool:
    return all(v in os.environ for v in SLURM_VARS)


def resolve(cfg, environ=None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single-process run."""
    env = os.environ if environ is None else environ
    enabled = str(_get(cfg, "enabled", "auto")).lower()
    if enabled not in ("auto", "true", "false"):
        raise UserError(f"distributed.enabled must be auto, true or false, got {enabled!r}")
    if enabled == "false":
        return None
    address = _get(cfg, "coordinator_address") or env.get("JAX_COORDINATOR_ADDRESS")
    num = _get(cfg, "num_processes", env.get("JAX_NUM_PROCESSES"))
    pid = _get(cfg, "process_id", env.get("JAX_PROCESS_ID"))
    num = None if num is None else _int(num, "distributed.num_processes (or JAX_NUM_PROCESSES)")
    pid = None if pid is None else _int(pid, "distributed.process_id (or JAX_PROCESS_ID)")
    slurm = in_slurm_step() and all(v is None for v in (address, num, pid))
    slurm_tasks = _int(env["SLURM_NTASKS"], "SLURM_NTASKS") if slurm else 1
    if enabled == "auto" and (num or 1) <= 1 and slurm_tasks <= 1:
        return None
    if not slurm:
        missing = [k for k, v in (("coordinator_address", address), ("num_processes", num), ("process_id", pid))
                   if v is None]
        if missing:
            raise UserError(f"multi-process run without {', '.join('distributed.' + m for m in missing)}: set them "
                            f"(e.g. distributed.coordinator_address=host0:1234 distributed.num_processes=2 "
                            f"distributed.process_id=0) or the JAX_* environment variables, or launch with srun")
        if not 0 <= pid < num:
            raise UserError(f"distributed.process_id={pid} must be in [0, {num}) for num_processes={num}")
    kwargs = {"coordinator_address": address, "num_processes": num, "process_id": pid,
              "initialization_timeout": _int(_get(cfg, "timeout_s", 300), "distributed.timeout_s")}
    ids = _get(cfg, "local_device_ids")
    if ids is not None:
        # "all": every device this process can see (one process per node); else a list/comma string of local ids
        kwargs["local_device_ids"] = [] if str(ids) == "all" else (
            [_int(i, "distributed.local_device_ids") for i in str(ids).split(",")] if isinstance(ids, (str, int))
            else [_int(i, "distributed.local_device_ids") for i in ids])
    return kwargs


def check_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    """What JAX would otherwise report by aborting the process from C++ (SIGABRT, no Python error), checked first
    where Python can: process 0 can open the coordinator's port, and every other process reaches it (retrying while
    process 0 starts, up to timeout_s). Peers that never join remain JAX's to time out."""
    import socket
    import time

    host, _, port = str(address).rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"distributed.coordinator_address={address!r} must be host:port (e.g. host0:1234)")
    if process_id == 0:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind(("", int(port)))
        except OSError as err:
            raise UserError(f"process 0 cannot open the coordinator's port {port} ({err.strerror}): another run may "
                            f"hold it; pick a free one in distributed.coordinator_address") from None
        return
    deadline = time.monotonic() + float(timeout_s)
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))).close()
            return
        except socket.gaierror as err:
            raise UserError(f"distributed.coordinator_address={address!r}: unknown host ({err.strerror})") from None
        except OSError:
            if time.monotonic() >= deadline:
                raise UserError(f"process {process_id} could not reach the coordinator at {address} within "
                                f"distributed.timeout_s={timeout_s} s: start process 0 on that host and port, and "
                                f"check that the port is open between the hosts") from None
            time.sleep(0.5)


def initialize(cfg=None) -> bool:
    """Start jax.distributed if the config/environment asks for several processes; True when it did (or had)."""
    import jax

    kwargs = resolve(cfg)
    if kwargs is None:
        return False
    if jax.distributed.is_initialized():
        return True
    # CPU devices need a collectives backend to talk across processes (gloo; ignored by GPU computations)
    jax.config.update("jax_cpu_collectives_implementation", str(_get(cfg, "cpu_collectives", "gloo")))
    # An unreachable coordinator is not an exception: after initialization_timeout JAX aborts the whole process from
    # C++ (a DEADLINE_EXCEEDED check failure, exit by SIGABRT) and Python never sees it. Say first what is awaited,
    # and check what can be checked (the port, the route to it) before JAX tries.
    print(f"process {kwargs['process_id'] if kwargs['process_id'] is not None else '?'}: joining the coordinator at "
          f"{kwargs['coordinator_address'] or '(from Slurm)'} (waits up to distributed.timeout_s="
          f"{kwargs['initialization_timeout']} s; if a process never joins, JAX then aborts this one)", flush=True)
    if kwargs["coordinator_address"] is not None:
        check_coordinator(kwargs["coordinator_address"], kwargs["process_id"], kwargs["initialization_timeout"])
    import inspect

    if "shutdown_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        # Only process 0 samples the final grid and evaluates; the others finish first and wait for it at JAX's
        # shutdown barrier, which aborts every process after its default 5 minutes (an evaluation on a GPU can take
        # longer). An hour; a process that died is still found by the heartbeat (100 s).
        kwargs = {**kwargs, "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S}
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"jax.distributed.initialize failed ({err}): check the distributed.* settings") from err
    if kwargs.get("local_device_ids") and jax.default_backend() == "cpu":
        # JAX applies the ids to GPUs only; on CPU they would be dropped without a word
        print(f"note: distributed.local_device_ids={_get(cfg, 'local_device_ids')} has no effect on CPU devices; "
              f"each process gets {jax.local_device_count()} (XLA_FLAGS=--xla_force_host_platform_device_count=N "
              f"sets how many)", flush=True)
    return True


def shutdown() -> None:
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
