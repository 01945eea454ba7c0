"""Class-conditional Diffusion Transformer (Peebles & Xie, 2023) for flow matching.

A batch in, a batch of velocity (or clean-image) predictions out; leading batch axes are optional (one example
works too), shapes below per example:
    x (H, W, C) --patchify--> tokens (N, p*p*C) --linear--> (N, D) + fixed 2-D sin-cos positions
    c = MLP(sinusoid_fp32(t)) + class_embedding[y]          (y == num_classes is the null class for CFG)
    depth x DiTBlock(tokens, c)                              (adaLN-Zero: every block starts as the identity)
    final LayerNorm + adaLN(c) + zero-initialised linear --unpatchify--> (H, W, C)
Blocks are stored stacked (leading axis = depth) so they can run under `lax.scan` (compile time independent of
depth) and optionally under `jax.checkpoint` (activation memory of one block instead of all).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from models.layers import Attention, Linear, Mlp, layer_norm, modulate, patchify, rematerialise, sincos_pos_embed_2d, \
    timestep_sinusoid, unpatchify

FREQ_DIM = 256  # width of the timestep sinusoid (DiT)


class DiTBlock(eqx.Module):
    attn: Attention
    mlp: Mlp
    ada: Linear  # c -> (shift, scale, gate) for attention and MLP; zero-init, so the block starts as identity

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, key: PRNGKeyArray, impl=None):
        k1, k2 = jax.random.split(key)
        self.attn = Attention(dim, num_heads, key=k1, impl=impl)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), key=k2)
        self.ada = Linear(dim, 6 * dim, key=k1, init="zeros")

    def __call__(self, x: Float[Array, "... n d"], c: Float[Array, "... d"]) -> Float[Array, "... n d"]:
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(jax.nn.silu(c)), 6, axis=-1)
        x = x + gate1[..., None, :] * self.attn(modulate(layer_norm(x), shift1, scale1))
        x = x + gate2[..., None, :] * self.mlp(modulate(layer_norm(x), shift2, scale2))
        return x


def route_keep(key, batch: int, num_tokens: int, share: float) -> Array:
    """The tokens each example sends through the routed blocks (train.route): `share` of them, a fresh random draw
    per example, in position order. (batch, round(share * num_tokens)) int32."""
    k = max(1, round(share * num_tokens))
    return jax.vmap(lambda kk: jnp.sort(jax.random.permutation(kk, num_tokens)[:k]))(jax.random.split(key, batch))


def run_blocks(blocks: eqx.Module, x: Array, c: Array, *, scan: bool, remat: bool | str, route=None) -> Array:
    """Apply stacked blocks in order, with lax.scan or an unrolled loop, optionally rematerialised.

    route = (start, end, keep): blocks start..end-1 see only the tokens `keep` (B, K) indexes, per example; the
    others skip those blocks unchanged and rejoin before block `end` (TREAD, Krause et al. 2025; training only)."""
    if route is not None:
        start, end, keep = route
        depth = jax.tree.leaves(eqx.filter(blocks, eqx.is_array))[0].shape[0]
        part = lambda lo, hi: jax.tree.map(lambda a: a[lo:hi] if eqx.is_array(a) else a, blocks)
        go = lambda h, lo, hi: h if hi <= lo else run_blocks(part(lo, hi), h, c, scan=scan, remat=remat)
        x = go(x, 0, start)
        idx = keep[..., None]
        sub = go(jnp.take_along_axis(x, idx, axis=-2), start, end)
        x = jnp.put_along_axis(x, jnp.broadcast_to(idx, sub.shape), sub, axis=-2, inplace=False)
        return go(x, end, depth)
    params, static = eqx.partition(blocks, eqx.is_array)

    def body(h, p):
        return eqx.combine(p, static)(h, c), None

    body = rematerialise(body, remat)
    if scan:
        return jax.lax.scan(body, x, params)[0]
    depth = jax.tree.leaves(params)[0].shape[0]
    for i in range(depth):
        x = body(x, jax.tree.map(lambda a: a[i], params))[0]
    return x


class DiT(eqx.Module):
    patch_embed: Linear
    t_mlp1: Linear
    t_mlp2: Linear
    y_embed: Float[Array, "k d"]
    blocks: DiTBlock  # stacked: every array has a leading `depth` axis
    final_ada: Linear
    final: Linear
    input_size: tuple[int, int] = eqx.field(static=True)
    in_channels: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    scan_blocks: bool = eqx.field(static=True)
    remat: bool | str = eqx.field(static=True)

    def __init__(self, *, input_size, in_channels, num_classes, hidden_size, depth, num_heads, patch_size,
                 mlp_ratio=4.0, scan_blocks=True, remat=False, attention_impl=None, key: PRNGKeyArray):
        h, w = input_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"input {h}x{w} is not divisible by patch size {patch_size}")
        keys = jax.random.split(key, 6)
        d, pdim = hidden_size, patch_size * patch_size * in_channels
        self.patch_embed = Linear(pdim, d, key=keys[0])
        self.t_mlp1 = Linear(FREQ_DIM, d, key=keys[1], init="normal:0.02")
        self.t_mlp2 = Linear(d, d, key=keys[2], init="normal:0.02")
        self.y_embed = 0.02 * jax.random.normal(keys[3], (num_classes + 1, d), jnp.float32)  # +1: null class
        block_keys = jax.random.split(keys[4], depth)
        self.blocks = eqx.filter_vmap(
            lambda k: DiTBlock(d, num_heads, mlp_ratio, key=k, impl=attention_impl))(block_keys)
        self.final_ada = Linear(d, 2 * d, key=keys[5], init="zeros")
        self.final = Linear(d, pdim, key=keys[5], init="zeros")
        self.input_size, self.in_channels, self.patch_size = (h, w), in_channels, patch_size
        self.num_classes, self.scan_blocks, self.remat = num_classes, scan_blocks, remat

    @property
    def null_class(self) -> int:
        return self.num_classes

    batched = True   # models.apply calls it on the whole batch (no vmap): 2-D matmuls, faster on CPU

    @property
    def num_tokens(self) -> int:
        return (self.input_size[0] // self.patch_size) * (self.input_size[1] // self.patch_size)

    def __call__(self, x: Float[Array, "... h w c"], t: Float[Array, "..."],
                 y: Int[Array, "..."], route=None) -> Float[Array, "... h w c"]:
        h, w = self.input_size
        p, dtype = self.patch_size, self.patch_embed.weight.dtype
        tokens = self.patch_embed(patchify(x.astype(dtype), p))  # (N, D)
        tokens = tokens + jnp.asarray(sincos_pos_embed_2d(tokens.shape[-1], h // p, w // p), dtype)
        t_emb = self.t_mlp2(jax.nn.silu(self.t_mlp1(timestep_sinusoid(t, FREQ_DIM).astype(dtype))))  # (D,)
        c = t_emb + self.y_embed[y]  # (..., D)
        tokens = run_blocks(self.blocks, tokens, c, scan=self.scan_blocks, remat=self.remat, route=route)  # (N, D)
        shift, scale = jnp.split(self.final_ada(jax.nn.silu(c)), 2, axis=-1)
        out = self.final(modulate(layer_norm(tokens), shift, scale))  # (N, p*p*C)
        return unpatchify(out, p, h, w, self.in_channels)  # (H, W, C)
