"""Train-step throughput on synthetic data, with the real train step the stage scripts call. Prints JSON.

    python bench/throughput.py model=XL-2 batch=256                       # 4x32x32 latents, 1000 classes
    python bench/throughput.py model=small shape=28,28,1 classes=10 batch=128 precision=float32 steps=20
    python bench/throughput.py model=small shape=28,28,1 classes=10 batch=128 top_ops=20   # + where the time goes
    python bench/throughput.py model=small_text shape=32,32,3 batch=64 text=16,384        # stage 2: 16 caption tokens
    python bench/throughput.py model=small shape=28,28,1 classes=10 batch=128 optim=muon  # configs/optim/<name>.yaml
    python bench/throughput.py model=small shape=28,28,1 classes=10 batch=128 optim=muon split=true  # + the update alone

The optimizer is AdamW unless `optim=muon` is given (stage 1's default is Muon: +11% step time on the small preset).

Overrides use the stage scripts' syntax: `model=<preset>` reads configs/model/<preset>.yaml, `model.<key>=v`,
`train.<key>=v` and `optim.<key>=v` change single keys. Imports only what the train step needs (no Grain, Hydra,
W&B), so it runs on a bare accelerator machine with JAX, Equinox and Optax.
FLOPs are analytic (models.forward_flops): matmuls only, per layer N*(24 d^2 + 4 N d) + adaLN; train = 3 x forward.
"""

import json
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if __name__ == "__main__":  # as the stage scripts do: glibc malloc on huge pages (training/cli.py), before JAX loads
    from training.cli import use_huge_pages  # noqa: E402

    use_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import build_model, forward_flops, model_spec, param_count  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.state import init_state, split_keys  # noqa: E402
from training.step import class_conditioning, make_train_step, text_conditioning  # noqa: E402

PEAK_BF16_TFLOPS = 989.0  # H100 SXM dense bf16


def read_yaml(path: Path) -> dict:
    """The model/train/optim presets are flat `key: value` files; parse them without PyYAML/OmegaConf."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].rstrip()
        if ":" not in line or line.startswith(" "):
            continue
        k, v = (s.strip() for s in line.split(":", 1))
        out[k] = parse(v)
    return out


def parse(v: str):
    if v in ("null", "~", ""):
        return None
    if v in ("true", "false"):
        return v == "true"
    if v.startswith("["):   # a list, e.g. train.route=[1,5,0.5]
        return json.loads(v)
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


class Cfg(SimpleNamespace):
    """Attribute access like the OmegaConf configs the train step is built from, including .get(key, default)."""

    def get(self, key, default=None):
        return getattr(self, key, default)


def profile_ops(run, top: int, reps: int = 5) -> dict:
    """Milliseconds per step of the `top` most expensive compiled ops (XLA fusions, dots) over `reps` steps, read
    from a JAX profiler trace (perfetto JSON), and of every op summed by kind (thread time: ops that run side by side
    on several cores add up to more than the step). Where the step's time goes, e.g. `top_ops=15` on CPU."""
    import collections
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(reps):
                out = run()
            jax.block_until_ready(out)
            wall = time.perf_counter() - t0
        trace = json.load(gzip.open(next(Path(d).rglob("*perfetto_trace.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, per_thread, n_ops = collections.Counter(), collections.Counter(), 0
    skip = ("$", "ThunkExecutor", "SlinkyThreadPool", "PjRt", "ThreadpoolListener", "end: ", "Wait for", "PjitFunction",
            "CommonPjRt")
    for e in events:   # skip the host-side wrappers (Python frames, the executor's own spans, thread-pool markers)
        if e.get("ph") == "X" and not e["name"].startswith(skip):
            total[e["name"]] += e.get("dur", 0)
            per_thread[e.get("tid")] += e.get("dur", 0)
            n_ops += 1
    kinds = collections.Counter()   # summed by kind: "ynn_fusion.233" and "ynn_fusion.8" are both "ynn_fusion"
    for name, dur in total.items():
        kinds[re.sub(r"\.\d+$", "", name)] += dur
    ms = lambda c, n: {k: round(v / reps / 1000, 2) for k, v in c.most_common(n)}
    # Busy time of the threads that ran ops: against step_time_s it says how idle each core is (a chain of
    # single-threaded elementwise ops leaves the other core waiting; development_log.md, twenty-fourth session).
    return {"top_ops_ms_per_step": ms(total, top), "op_kinds_ms_per_step": ms(kinds, 20),
            "profiled_step_ms": round(wall / reps * 1000, 1),
            "thread_busy_ms_per_step": sorted(ms(per_thread, 4).values(), reverse=True),
            "ops_per_step": round(n_ops / reps)}


def main(argv):
    args = dict(a.split("=", 1) for a in argv)
    model = read_yaml(ROOT / "configs/model" / f"{args.pop('model', 'XL-2')}.yaml")
    train = read_yaml(ROOT / "configs/train/stage1.yaml")
    optim = read_yaml(ROOT / "configs/optim" / f"{args.pop('optim', 'adamw')}.yaml")
    train.update(precision="bfloat16" if jax.default_backend() == "gpu" else "float32")
    for k in [k for k in args if "." in k]:
        group, key = k.split(".", 1)
        {"model": model, "train": train, "optim": optim}[group][key] = parse(args.pop(k))
    shape = [int(s) for s in args.pop("shape", "32,32,4").split(",")]
    classes, batch = int(args.pop("classes", 1000)), int(args.pop("batch", 256))
    steps, warmup = int(args.pop("steps", 20)), int(args.pop("warmup", 3))
    if "precision" in args:
        train["precision"] = args.pop("precision")
    if "grad_accum" in args:
        train["grad_accum"] = int(args.pop("grad_accum"))
    top_ops = int(args.pop("top_ops", 0))
    split = parse(args.pop("split", "false"))   # also time the optimizer update (+ apply) alone, on the step's grads
    text = [int(v) for v in args.pop("text", "16,384").split(",")]   # text models: caption tokens, feature width
    if args:
        raise SystemExit(f"error: unknown arguments {sorted(args)}")
    tc, oc = Cfg(**train), Cfg(**optim)
    meta = {"shape": shape, "num_classes": classes, "text": {"max_tokens": text[0], "dim": text[1]}}
    spec = model_spec(model, meta)
    model_key, train_key = split_keys(0)
    m = build_model(spec, key=model_key)
    opt, sched = make_optimizer(tc, oc)
    state = init_state(m, opt, train_key)
    is_text = spec.get("mixing") is not None
    step = make_train_step(tc, opt, sched, None if is_text else classes, text_conditioning if is_text else
                           class_conditioning)
    total = batch * int(tc.grad_accum)
    rng = np.random.default_rng(0)

    def make_batch():
        b = {"x": jnp.asarray(rng.standard_normal((total, *shape), np.float32))}
        if is_text:   # random caption states, each with a random number of valid tokens
            b["text"] = jnp.asarray(rng.standard_normal((total, *text), np.float32))
            b["mask"] = jnp.asarray(np.arange(text[0])[None, :] < rng.integers(1, text[0] + 1, (total, 1)))
        else:
            b["label"] = jnp.asarray(rng.integers(0, classes, total, dtype=np.int32))
        return b

    batches = [make_batch() for _ in range(2)]
    t0 = time.perf_counter()
    state, met = step(state, dict(batches[0]))
    jax.block_until_ready(met["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        state, met = step(state, dict(batches[i % 2]))
    jax.block_until_ready(met["loss"])
    t0 = time.perf_counter()
    for i in range(steps):
        state, met = step(state, dict(batches[i % 2]))
    jax.block_until_ready(met["loss"])
    dt = (time.perf_counter() - t0) / steps
    holder = [state]   # the step donates its input state: thread it through

    def run():
        holder[0], m = step(holder[0], dict(batches[0]))
        return m["loss"]

    ops = profile_ops(run, top_ops) if top_ops else None
    update_s = None
    if split:   # the optimizer's share of the step (Muon: its Newton-Schulz dots); the rest is forward + backward
        import equinox as eqx

        params = eqx.filter(holder[0].params, eqx.is_inexact_array)
        grads = jax.tree.map(lambda a: 1e-3 * jnp.ones_like(a), params)
        update = eqx.filter_jit(lambda g, s, p: eqx.apply_updates(p, opt.update(g, s, p)[0]))
        jax.block_until_ready(update(grads, holder[0].opt_state, params))
        t0 = time.perf_counter()
        for _ in range(steps):
            out = update(grads, holder[0].opt_state, params)
        jax.block_until_ready(out)
        update_s = (time.perf_counter() - t0) / steps
    fl = forward_flops(spec)
    train_flops = 3 * fl["forward_flops"] * total
    mem = None
    try:
        mem = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    except Exception:  # CPU devices have no memory stats
        pass
    out = {"model": spec["name"], "params_M": param_count(m) / 1e6, "batch": batch, "grad_accum": int(tc.grad_accum),
           "shape": shape, "precision": tc.precision, "backend": jax.default_backend(),
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
           "device": jax.devices()[0].device_kind, "images_per_s": total / dt, "step_time_s": dt,
           "tflops_per_s": train_flops / dt / 1e12, "mfu_vs_989": train_flops / dt / 1e12 / PEAK_BF16_TFLOPS,
           "peak_device_memory_GB": None if mem is None else mem / 1e9, "compile_s": compile_s,
           "forward_gflops_per_image": fl["forward_flops"] / 1e9, "flops_formula": fl["formula"],
           "loss": float(met["loss"]), **(ops or {}), **({} if update_s is None else {"optimizer_update_s": update_s})}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
