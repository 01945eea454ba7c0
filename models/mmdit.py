"""Text-conditional Diffusion Transformer for flow matching, with two ways of mixing text in (`mixing`):

  cross (PixArt-alpha):  self-attention -> cross-attention to the caption tokens -> MLP; adaLN-single: ONE global
                         timestep map s = W silu(c) + b (6 x D) shared by all blocks, plus a learned per-block table.
  joint (SD3 MMDiT):     image and text tokens keep separate weights (QKV, output, MLP, modulation table) and meet in
                         ONE attention over the concatenation [image; text].

Both share everything else with stage 1 (models/dit.py): patch embedding, fixed 2-D sin-cos positions, timestep MLP,
QK-RMSNorm attention, GELU MLP, final adaLN + linear. Caption states (e.g. MiniLM, 384-d, cached at data preparation)
pass through a caption MLP (Linear, GELU, Linear) to the model width. Padding tokens are masked everywhere.

Classifier-free guidance: `drop=True` replaces the caption by a learned null caption (`null_text`, all tokens valid).

New text parts start so that they add nothing, which is what makes the stage-1 transplant exact (models/convert.py):
  cross: the cross-attention output projection is zero-initialised;
  joint: text keys enter the attention with a per-head weight |g| (softmax numerator and denominator), g = 0 at init,
         so image tokens attend only to image tokens until the text gate opens (the gradient at 0 is non-zero).
A batch in, a batch out (leading batch axes are optional, as in models/dit.py); shapes below are per example.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from models.dit import FREQ_DIM
from models.layers import Attention, Linear, Mlp, layer_norm, modulate, patchify, rematerialise, rms_norm, \
    sincos_pos_embed_2d, timestep_sinusoid, unpatchify

MIXING = ("cross", "joint")


def _heads(a: Array, h: int) -> Array:
    return a.reshape(a.shape[:-1] + (h, a.shape[-1] // h))


class CrossAttention(eqx.Module):
    """Image queries attend to caption keys/values (QK-RMSNorm, key padding mask); zero-init output."""

    q: Linear
    kv: Linear
    proj: Linear
    q_scale: Array
    k_scale: Array
    num_heads: int = eqx.field(static=True)

    def __init__(self, dim: int, num_heads: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.q, self.kv = Linear(dim, dim, key=k1), Linear(dim, 2 * dim, key=k2)
        self.proj = Linear(dim, dim, key=k2, init="zeros")
        self.q_scale = jnp.ones((dim // num_heads,), jnp.float32)
        self.k_scale = jnp.ones((dim // num_heads,), jnp.float32)
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "... n d"], ctx: Float[Array, "... m d"], mask: Bool[Array, "... m"]) -> Array:
        lead, (n, d), m = x.shape[:-2], x.shape[-2:], ctx.shape[-2]
        flat = lambda a, length: a.reshape((-1, length) + a.shape[-2:])   # (B, L, H, Dh)
        q = flat(rms_norm(_heads(self.q(x), self.num_heads), self.q_scale), n)
        k, v = jnp.split(self.kv(ctx), 2, axis=-1)
        k, v = flat(rms_norm(_heads(k, self.num_heads), self.k_scale), m), flat(_heads(v, self.num_heads), m)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask.reshape(-1, m)[:, None, None, :])
        return self.proj(o.reshape(lead + (n, d)))


def joint_attention(qi, ki, vi, qt, kt, vt, mask: Array, text_weight: Array) -> tuple[Array, Array]:
    """Softmax attention over [image; text] keys for [image; text] queries, text keys weighted by `text_weight` (H,).

    weights_j = w_j exp(s_j) / sum_k w_k exp(s_k), w = 1 for image keys, |g_h| * mask for text keys: with g = 0 this
    is exactly image-only self-attention. Inputs (..., N|T, H, Dh), mask (..., T); returns (..., N, H, Dh),
    (..., T, H, Dh).
    """
    q, k, v = (jnp.concatenate(p, axis=-3) for p in ((qi, qt), (ki, kt), (vi, vt)))
    dh, h, n = q.shape[-1], q.shape[-2], ki.shape[-3]
    s = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(dh))  # (..., H, Q, K)
    lead, maskf = mask.shape[:-1], mask.astype(jnp.float32)
    w = jnp.concatenate([jnp.ones(lead + (h, n), jnp.float32),
                         text_weight.astype(jnp.float32)[:, None] * maskf[..., None, :]], axis=-1)  # (..., H, K)
    valid = jnp.concatenate([jnp.ones(lead + (n,), bool), mask], axis=-1)
    s = jnp.where(valid[..., None, None, :], s, -jnp.inf)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True))) * w[..., :, None, :]
    p = (e / e.sum(-1, keepdims=True)).astype(v.dtype)
    o = jnp.einsum("...hqk,...khd->...qhd", p, v)
    return o[..., :n, :, :], o[..., n:, :, :]


class TextBlock(eqx.Module):
    attn: Attention          # image self-attention (the image stream's QKV/out in joint mode)
    mlp: Mlp
    table: Array             # (6D,) adaLN-single per-block shift table
    cross: CrossAttention | None
    txt_attn: Attention | None
    txt_mlp: Mlp | None
    txt_table: Array | None
    txt_gain: Array | None   # (H,) text-key weight in joint attention, 0 at init
    mixing: str = eqx.field(static=True)

    def __init__(self, dim, num_heads, mlp_ratio, mixing, *, key, impl=None):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        self.attn = Attention(dim, num_heads, key=k1, impl=impl)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), key=k2)
        # PixArt initialises the table with randn / sqrt(D); the global map is zero-init, so modulations start small.
        self.table = jax.random.normal(k3, (6 * dim,), jnp.float32) / jnp.sqrt(jnp.float32(dim))
        self.mixing = mixing
        self.cross = CrossAttention(dim, num_heads, key=k4) if mixing == "cross" else None
        if mixing == "joint":
            self.txt_attn = Attention(dim, num_heads, key=k4, impl=impl)
            self.txt_mlp = Mlp(dim, int(dim * mlp_ratio), key=k5)
            self.txt_table = jnp.zeros((6 * dim,), jnp.float32)
            self.txt_gain = jnp.zeros((num_heads,), jnp.float32)
        else:
            self.txt_attn = self.txt_mlp = self.txt_table = self.txt_gain = None

    def __call__(self, x, txt, mask, s):
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(s + self.table.astype(s.dtype), 6, axis=-1)
        g1, g2 = g1[..., None, :], g2[..., None, :]   # per-example gates, applied to every token
        if self.mixing == "cross":
            x = x + g1 * self.attn(modulate(layer_norm(x), sh1, sc1))
            x = x + self.cross(layer_norm(x), txt, mask)
            x = x + g2 * self.mlp(modulate(layer_norm(x), sh2, sc2))
            return x, txt
        th1, tc1, tg1, th2, tc2, tg2 = jnp.split(s + self.txt_table.astype(s.dtype), 6, axis=-1)
        tg1, tg2 = tg1[..., None, :], tg2[..., None, :]
        h = self.attn.num_heads

        def qkv(a: Attention, z):
            q, k, v = (_heads(p, h) for p in jnp.split(a.qkv(z), 3, axis=-1))
            return rms_norm(q, a.q_scale), rms_norm(k, a.k_scale), v

        qi, ki, vi = qkv(self.attn, modulate(layer_norm(x), sh1, sc1))
        qt, kt, vt = qkv(self.txt_attn, modulate(layer_norm(txt), th1, tc1))
        gain = jnp.where(self.txt_gain >= 0, self.txt_gain, -self.txt_gain)  # |g| with gradient 1 at g = 0
        oi, ot = joint_attention(qi, ki, vi, qt, kt, vt, mask, gain)
        x = x + g1 * self.attn.proj(oi.reshape(x.shape))
        txt = txt + tg1 * self.txt_attn.proj(ot.reshape(txt.shape))
        x = x + g2 * self.mlp(modulate(layer_norm(x), sh2, sc2))
        txt = txt + tg2 * self.txt_mlp(modulate(layer_norm(txt), th2, tc2))
        return x, txt


class TextDiT(eqx.Module):
    patch_embed: Linear
    t_mlp1: Linear
    t_mlp2: Linear
    t_ada: Linear            # adaLN-single: silu(c) -> 6D, shared by every block
    cap1: Linear             # caption MLP: text_dim -> D -> D
    cap2: Linear
    null_text: Array         # (max_tokens, text_dim) learned null caption for CFG
    blocks: TextBlock        # stacked (leading axis = depth)
    final_ada: Linear
    final: Linear
    input_size: tuple[int, int] = eqx.field(static=True)
    in_channels: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    mixing: str = eqx.field(static=True)
    text_dim: int = eqx.field(static=True)
    max_tokens: int = eqx.field(static=True)
    scan_blocks: bool = eqx.field(static=True)
    remat: bool | str = eqx.field(static=True)

    def __init__(self, *, input_size, in_channels, hidden_size, depth, num_heads, patch_size, text_dim, max_tokens,
                 mixing="cross", mlp_ratio=4.0, scan_blocks=True, remat=False, attention_impl=None,
                 num_classes=None, key: PRNGKeyArray):
        if mixing not in MIXING:
            raise ValueError(f"unknown mixing {mixing!r} ({' | '.join(MIXING)})")
        h, w = input_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"input {h}x{w} is not divisible by patch size {patch_size}")
        keys = jax.random.split(key, 9)
        d, pdim = hidden_size, patch_size * patch_size * in_channels
        self.patch_embed = Linear(pdim, d, key=keys[0])
        self.t_mlp1 = Linear(FREQ_DIM, d, key=keys[1], init="normal:0.02")
        self.t_mlp2 = Linear(d, d, key=keys[2], init="normal:0.02")
        self.t_ada = Linear(d, 6 * d, key=keys[3], init="zeros")
        self.cap1 = Linear(text_dim, d, key=keys[4])
        self.cap2 = Linear(d, d, key=keys[5])
        self.null_text = jax.random.normal(keys[6], (max_tokens, text_dim), jnp.float32) / jnp.sqrt(float(text_dim))
        self.blocks = eqx.filter_vmap(lambda k: TextBlock(d, num_heads, mlp_ratio, mixing, key=k, impl=attention_impl))(
            jax.random.split(keys[7], depth))
        self.final_ada = Linear(d, 2 * d, key=keys[8], init="zeros")
        self.final = Linear(d, pdim, key=keys[8], init="zeros")
        self.input_size, self.in_channels, self.patch_size = (h, w), in_channels, patch_size
        self.mixing, self.text_dim, self.max_tokens = mixing, text_dim, max_tokens
        self.scan_blocks, self.remat = scan_blocks, remat

    batched = True   # models.apply calls it on the whole batch (see models/dit.py)

    def __call__(self, x: Float[Array, "... h w c"], t: Float[Array, "..."], text: Float[Array, "... m e"],
                 mask: Bool[Array, "... m"], drop: Bool[Array, "..."]) -> Float[Array, "... h w c"]:
        h, w = self.input_size
        p, dtype = self.patch_size, self.patch_embed.weight.dtype
        drop = jnp.asarray(drop)
        text = jnp.where(drop[..., None, None], self.null_text.astype(dtype), text.astype(dtype))
        mask = jnp.where(drop[..., None], True, mask.astype(bool))
        tokens = self.patch_embed(patchify(x.astype(dtype), p))
        tokens = tokens + jnp.asarray(sincos_pos_embed_2d(tokens.shape[-1], h // p, w // p), dtype)
        c = self.t_mlp2(jax.nn.silu(self.t_mlp1(timestep_sinusoid(t, FREQ_DIM).astype(dtype))))  # (..., D)
        s = self.t_ada(jax.nn.silu(c))  # (..., 6D) adaLN-single
        txt = self.cap2(jax.nn.gelu(self.cap1(text), approximate=True))  # (M, D)

        params, static = eqx.partition(self.blocks, eqx.is_array)

        def body(carry, bp):
            return eqx.combine(bp, static)(carry[0], carry[1], mask, s), None

        body = rematerialise(body, self.remat)
        if self.scan_blocks:
            tokens, txt = jax.lax.scan(body, (tokens, txt), params)[0]
        else:
            for i in range(jax.tree.leaves(params)[0].shape[0]):
                (tokens, txt), _ = body((tokens, txt), jax.tree.map(lambda a: a[i], params))
        shift, scale = jnp.split(self.final_ada(jax.nn.silu(c)), 2, axis=-1)
        out = self.final(modulate(layer_norm(tokens), shift, scale))
        return unpatchify(out, p, h, w, self.in_channels)
