"""Building blocks shared by the class- and text-conditional DiTs.

Every module acts on the trailing axes (tokens, channels) and accepts any leading batch axes: both DiTs run on a
whole batch directly (`models.apply`), which XLA:CPU trains ~1.5x faster than one example at a time under vmap.
Normalisations compute their statistics in float32 whatever the compute dtype, because bf16 has only 8
mantissa bits and variance reductions over hundreds of channels lose most of them.
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


REMAT_MODES = (False, True, "dots")                 # model.remat (null = false)
ATTENTION_IMPLS = (None, "auto", "xla", "cudnn")     # model.attention_impl


def rematerialise(body, remat):
    """`body` under jax.checkpoint per `model.remat`: false (keep every activation), true (keep only each block's
    input; the backward pass reruns the block: +1 forward of compute) or "dots" (also keep the outputs of the
    token-wise matmuls, which have no batch axis after Linear's flattening, and rerun only the cheap elementwise
    work and attention in between)."""
    if remat not in REMAT_MODES + (None,):
        raise ValueError(f"model.remat={remat!r} unknown: use one of {', '.join(str(m).lower() for m in REMAT_MODES)}")
    if not remat:
        return body
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
    return jax.checkpoint(body, policy=policy)


class Linear(eqx.Module):
    """y = x @ W + b over the last axis; any leading axes. Weight stored (in, out) so no transpose is needed."""

    weight: Float[Array, "din dout"]
    bias: Float[Array, " dout"] | None

    def __init__(self, d_in: int, d_out: int, *, key: PRNGKeyArray, init: str = "xavier", bias: bool = True):
        if init == "xavier":  # DiT initialises every linear layer with xavier_uniform
            lim = math.sqrt(6.0 / (d_in + d_out))
            self.weight = jax.random.uniform(key, (d_in, d_out), jnp.float32, -lim, lim)
        elif init == "zeros":  # adaLN-Zero modulations and the output layer start at zero
            self.weight = jnp.zeros((d_in, d_out), jnp.float32)
        elif init.startswith("normal"):  # e.g. "normal:0.02"
            self.weight = float(init.split(":")[1]) * jax.random.normal(key, (d_in, d_out), jnp.float32)
        else:
            raise ValueError(f"unknown init {init!r}")
        self.bias = jnp.zeros((d_out,), jnp.float32) if bias else None

    def __call__(self, x: Array) -> Array:
        # Flatten the leading axes: XLA:CPU runs the weight gradient of a (B, N, D) x (D, E) product twice as slowly
        # as that of the same (B*N, D) x (D, E) product (two contracting axes; development_log.md, sixth session).
        y = (x.reshape(-1, x.shape[-1]) @ self.weight).reshape(x.shape[:-1] + (self.weight.shape[1],))
        return y if self.bias is None else y + self.bias


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """LayerNorm without affine parameters (adaLN supplies shift and scale), statistics in fp32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x: Array, scale: Array, eps: float = 1e-6) -> Array:
    """RMSNorm over the last axis with a learned scale, statistics in fp32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def modulate(x: Float[Array, "... n d"], shift: Float[Array, "... d"], scale: Float[Array, "... d"]) -> Array:
    """adaLN: per-example shift and scale (from the conditioning vector) applied to every token."""
    return x * (1 + scale[..., None, :]) + shift[..., None, :]


def attention_kernel(impl: str | None, q: Array, mask: Array | None) -> str | None:
    """`model.attention_impl` -> jax.nn.dot_product_attention's `implementation`. "auto" takes cuDNN's fused
    (flash) kernel where it applies: a GPU, bf16/fp16 inputs, no mask, head dim a multiple of 8 up to 128; else XLA.
    On an H200, cuDNN made DiT-B/2 at batch 256 1.34x faster than XLA's attention (development_log.md, 21st session);
    None lets JAX choose, which is XLA today."""
    if impl != "auto":
        return impl
    dh = q.shape[-1]
    fused = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and mask is None
             and dh % 8 == 0 and dh <= 128)
    return "cudnn" if fused else "xla"


class Attention(eqx.Module):
    """Multi-head self-attention with per-head RMSNorm on queries and keys (SD3 / ViT-22B QK-norm).

    QK-norm bounds the attention logits, which is what kept the seed's bf16 runs from diverging.
    The softmax scale stays the usual 1/sqrt(head_dim); the learned norm scales can grow if sharper attention pays.
    """

    qkv: Linear
    proj: Linear
    q_scale: Float[Array, " dh"]
    k_scale: Float[Array, " dh"]
    num_heads: int = eqx.field(static=True)
    impl: str | None = eqx.field(static=True)

    def __init__(self, dim: int, num_heads: int, *, key: PRNGKeyArray, impl: str | None = None):
        k1, k2 = jax.random.split(key)
        self.qkv = Linear(dim, 3 * dim, key=k1)  # fused: one matmul instead of three
        self.proj = Linear(dim, dim, key=k2)
        self.q_scale = jnp.ones((dim // num_heads,), jnp.float32)
        self.k_scale = jnp.ones((dim // num_heads,), jnp.float32)
        self.num_heads, self.impl = num_heads, impl

    def __call__(self, x: Float[Array, "... n d"], mask: Array | None = None) -> Float[Array, "... n d"]:
        lead, (n, d) = x.shape[:-2], x.shape[-2:]
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        q, k, v = (a.reshape(-1, n, self.num_heads, d // self.num_heads) for a in (q, k, v))  # (B, N, H, Dh)
        q, k = rms_norm(q, self.q_scale), rms_norm(k, self.k_scale)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=attention_kernel(self.impl, q, mask))
        return self.proj(o.reshape(lead + (n, d)))


class Mlp(eqx.Module):
    fc1: Linear
    fc2: Linear

    def __init__(self, dim: int, hidden: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.fc1, self.fc2 = Linear(dim, hidden, key=k1), Linear(hidden, dim, key=k2)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))  # GELU-tanh as in DiT


def timestep_sinusoid(t: Float[Array, "..."], dim: int = 256, max_period: float = 10_000.0) -> Float[Array, "... dim"]:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, the DDPM range the frequencies were designed for).

    Always float32: in bf16, t*1000 is quantised in steps of 4-8 units, so neighbouring times would get the
    same embedding (a bug of the seed repository); callers cast the result to the compute dtype afterwards.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@functools.lru_cache(maxsize=32)
def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos positional embedding (MAE / DiT): half the channels encode the row, half the column.

    A numpy constant (not a parameter): nothing can train or weight-decay it, and XLA folds it into the graph.
    """
    assert dim % 4 == 0, "hidden size must be divisible by 4 for 2-D sin-cos embeddings"

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, gh), one_axis(dim // 2, gw)], axis=1)
    return emb.astype(np.float32)  # (grid_h * grid_w, dim)


def patchify(x: Float[Array, "... h w c"], p: int) -> Float[Array, "... n ppc"]:
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    x = x.reshape((-1, h // p, p, w // p, p, c)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(lead + ((h // p) * (w // p), p * p * c))


def unpatchify(x: Float[Array, "... n ppc"], p: int, h: int, w: int, c: int) -> Float[Array, "... h w c"]:
    lead = x.shape[:-2]
    x = x.reshape((-1, h // p, w // p, p, p, c)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(lead + (h, w, c))
