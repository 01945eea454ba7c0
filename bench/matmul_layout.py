"""Why the DiTs take the whole batch instead of running one example at a time under vmap. Prints JSON.

    python bench/matmul_layout.py [batch=128] [tokens=16] [dim=192] [reps=20]

Times (ms, jitted, on the default device) the gradient of an MLP block gelu(a @ W1) @ W2 with its activations laid out
as (B*N, D) and as (B, N, D) -- what a vmapped per-example model hands XLA -- and the small preset's forward and
gradient called on the batch vs vmapped, and the GFLOP/s of the largest matmul alone (fp32, and with bf16 inputs).
On XLA:CPU the (B, N, D) weight gradients (two contracting axes) ran at about half speed (development_log.md, sixth
session).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models import build_model  # noqa: E402


def ms(f, *args, reps: int) -> float:
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return round((time.perf_counter() - t0) / reps * 1000, 2)


def main(argv):
    a = {k: int(v) for k, v in (s.split("=", 1) for s in argv)}
    b, n, d, reps = a.get("batch", 128), a.get("tokens", 16), a.get("dim", 192), a.get("reps", 20)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x2 = jax.random.normal(k[0], (b * n, d))
    w1, w2 = 0.05 * jax.random.normal(k[1], (d, 4 * d)), 0.05 * jax.random.normal(k[2], (4 * d, d))
    mlp = lambda w1, w2, x: jnp.sum(jnp.square(jax.nn.gelu(x @ w1) @ w2))
    grad = jax.grad(mlp, argnums=(0, 1, 2))
    out = {"device": jax.devices()[0].device_kind,
           "mlp_grad_2d_ms": ms(grad, w1, w2, x2, reps=reps),
           "mlp_grad_3d_ms": ms(grad, w1, w2, x2.reshape(b, n, d), reps=reps)}
    # The model's largest matmul alone ((B*N, D) x (D, 4D)): the FLOP rate that bounds the train step on this CPU.
    gflops = lambda f, x, w: round(2 * b * n * d * 4 * d / ms(f, x, w, reps=5 * reps) / 1e6, 1)
    out["matmul_gflops"] = gflops(lambda x, w: x @ w, x2, w1)
    # The same matmul with bf16 inputs: bf16 out (what train.precision=bfloat16 runs) and fp32 accumulate/out
    # (AVX512-BF16's dot product where the CPU has it; development_log.md, twenty-fourth session).
    xb, wb = x2.astype(jnp.bfloat16), w1.astype(jnp.bfloat16)
    out["matmul_gflops_bf16_out"] = gflops(lambda x, w: x @ w, xb, wb)
    f32_out = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
    out["matmul_gflops_bf16_in_f32_out"] = gflops(f32_out, xb, wb)
    spec = dict(input_size=(28, 28), in_channels=1, num_classes=10, hidden_size=d, depth=6, num_heads=d // 32,
                patch_size=7, mlp_ratio=4.0, scan_blocks=False)
    model = build_model(spec, key=jax.random.PRNGKey(0))
    x = jax.random.normal(k[0], (b, 28, 28, 1))
    t, y = jax.random.uniform(k[1], (b,)), jnp.zeros((b,), jnp.int32)
    p, static = eqx.partition(model, eqx.is_array)
    for name, call in (("batch", lambda m: m(x, t, y)), ("vmap", lambda m: jax.vmap(m)(x, t, y))):
        loss = lambda p: jnp.mean(jnp.square(call(eqx.combine(p, static)) - x))
        out[f"model_forward_{name}_ms"] = ms(loss, p, reps=reps)
        out[f"model_grad_{name}_ms"] = ms(jax.grad(loss), p, reps=reps)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
