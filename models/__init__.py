"""Model construction: `build_model(spec, key=...)` is the only constructor, used by training, sampling and tests.

A *spec* is a flat dict: the model preset from `configs/model/*.yaml` plus what the data set decides (input size,
channels, number of classes). The spec is saved with every checkpoint, so sample.py rebuilds exactly the model
that was trained.
"""

import inspect
from typing import Any

import equinox as eqx
import jax

from models.dit import DiT
from models.layers import ATTENTION_IMPLS, REMAT_MODES

SPEC_KEYS = ("name", "hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "scan_blocks", "remat",
             "attention_impl", "input_size", "in_channels", "num_classes", "mixing")
# Keys that change the function the weights compute; the others (scan, remat, attention kernel, name) do not,
# so a checkpoint restores across them.
ARCH_KEYS = ("hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "input_size", "in_channels",
             "num_classes", "mixing", "text_dim", "max_tokens")


def model_spec(model_cfg, meta: dict) -> dict[str, Any]:
    """Merge the model preset with the data set's shape and class count."""
    h, w, c = meta["shape"]
    spec = {k: model_cfg[k] for k in SPEC_KEYS if k in model_cfg}
    spec.update(input_size=[int(h), int(w)], in_channels=int(c), num_classes=int(meta["num_classes"]))
    if spec.get("mixing") is not None:  # stage 2: the text features' width and length come from the prepared data
        if not meta.get("text"):
            from training.errors import UserError
            raise UserError(f"data set {meta.get('name')!r} has no cached text features: prepare a captioned set "
                            "(data=emoji, data=fashion_mnist_text, or a folder + JSONL) for stage 2")
        spec.update(text_dim=int(meta["text"]["dim"]), max_tokens=int(meta["text"]["max_tokens"]))
    for key, allowed in (("attention_impl", ATTENTION_IMPLS), ("remat", REMAT_MODES + (None,))):
        if spec.get(key) not in allowed:
            from training.errors import UserError
            raise UserError(f"model.{key}={spec[key]!r} unknown: use one of "
                            + ", ".join("null" if a is None else str(a).lower() for a in allowed))
    check_attention_impl(spec.get("attention_impl"))
    check_shape(spec, h, w)
    return spec


def check_shape(spec: dict, h: int, w: int) -> None:
    """Sizes the model cannot be built with, named now rather than as a ZeroDivisionError or an assert mid-run."""
    from training.errors import UserError, check_whole

    for key in ("hidden_size", "num_heads", "patch_size", "depth"):
        check_whole(f"model.{key}", spec.get(key, 1))
    d, heads, p = spec["hidden_size"], spec["num_heads"], spec["patch_size"]
    if d % heads:
        raise UserError(f"model.hidden_size={d} is not divisible by model.num_heads={heads}: pick sizes that are")
    if d % 4:   # the 2-D sin-cos positions give a quarter of the channels to each of sin/cos of row/column
        raise UserError(f"model.hidden_size={d} must be a multiple of 4 (2-D sin-cos positional embedding)")
    if h % p or w % p:
        raise UserError(f"the data ({h}x{w}) is not divisible by model.patch_size={p}: pick another patch size")


def check_attention_impl(impl) -> None:
    """`cudnn` forces cuDNN's kernel, which only a GPU has: JAX would say so only at the first step."""
    if impl == "cudnn" and jax.default_backend() != "gpu":
        from training.errors import UserError
        raise UserError(f"model.attention_impl=cudnn needs a GPU, and JAX runs on {jax.default_backend()} here: "
                        "use model.attention_impl=auto (cuDNN where it applies) or xla")


def build_model(spec: dict[str, Any], *, key) -> DiT:
    kw = {k: v for k, v in spec.items() if k != "name"}
    kw["input_size"] = tuple(kw["input_size"])
    if kw.get("attention_impl") == "cudnn" and jax.default_backend() != "gpu":
        # A spec saved by a GPU run, rebuilt here to sample from: cuDNN's kernel would fail at the first call, and the
        # kernel does not change the function (not an ARCH_KEY). A new run is refused instead (model_spec).
        kw["attention_impl"] = "xla"
    if kw.get("mixing") is not None:  # stage 2: text-conditional (models/mmdit.py)
        from models.mmdit import TextDiT as cls
    else:
        kw.pop("mixing", None)
        cls = DiT
    # A fresh spec only holds SPEC_KEYS (model_spec); a key the constructor does not take can only come from a spec
    # saved by another version of the code (sample.py and the autoguidance weak model rebuild from the saved spec).
    unknown = sorted(set(kw) - set(inspect.signature(cls.__init__).parameters))
    if unknown:
        from training.errors import OTHER_VERSION, UserError
        raise UserError(f"the model spec of this checkpoint names {', '.join(unknown)}, which this code's "
                        f"{cls.__name__} does not build: {OTHER_VERSION}")
    return cls(**kw, key=key)


def apply(model, x, t, *cond, route=None):
    """The model on a batch: x (B, ...), t a scalar or (B,), cond per-example arrays (B, ...). Models that take a batch
    directly (`batched = True`: both DiTs) get it whole; any other (e.g. a per-example callable, as the
    sampler tests' analytic models) is vmapped one example at a time. Same numbers
    either way up to float rounding; the whole-batch call is ~2x faster to train on CPU (development_log.md)."""
    import jax.numpy as jnp

    t = jnp.broadcast_to(t, x.shape[:1])
    route_kw = {} if route is None else {"route": route}   # token routing (training only): the class DiT takes it
    if getattr(model, "batched", False):
        return model(x, t, *cond, **route_kw)
    if route is not None:
        raise ValueError(f"token routing needs a model that takes the whole batch; {type(model).__name__} does not")
    return jax.vmap(model)(x, t, *cond)


def param_count(model: eqx.Module) -> int:
    return sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))


def forward_flops(spec: dict[str, Any]) -> dict[str, float]:
    """Analytic forward FLOPs per image (2 x multiply-adds), matmuls only.

    Per token per layer: 24 d^2 (qkv 6, proj 2, MLP 16 with mlp_ratio 4) + 4 N d (QK^T and AV);
    plus per image: adaLN 12 d^2 per layer, patch embedding and output layer 2 N p^2 C d each. Train = 3 x forward.
    """
    d, depth, p = spec["hidden_size"], spec["depth"], spec["patch_size"]
    h, w = spec["input_size"]
    n, pc = (h // p) * (w // p), p * p * spec["in_channels"]
    mlp = 2 * 2 * spec.get("mlp_ratio", 4.0) * d * d
    per_layer = n * (8 * d * d + mlp + 4 * n * d) + 12 * d * d
    total = depth * per_layer + 2 * 2 * n * pc * d + 4 * d * d
    formula = "per layer: N*(24 d^2 + 4 N d) + 12 d^2 (adaLN); + 4 N p^2 C d (patch in/out); train = 3 x forward"
    if spec.get("mixing") is not None:   # stage 2: L caption tokens, projected text_dim -> d -> d once
        L = spec["max_tokens"]
        total += 2 * L * spec["text_dim"] * d + 2 * L * d * d
        if spec["mixing"] == "cross":    # q and out on image tokens, k/v on caption tokens, N x L scores
            total += depth * (4 * n * d * d + 4 * L * d * d + 4 * n * L * d)
        else:                            # joint: caption tokens get their own qkv/proj/MLP; attention over N + L
            total += depth * (L * (8 * d * d + mlp) + 4 * ((n + L) ** 2 - n * n) * d)
        formula += "; text: cross + L (4 N d^2 + 4 L d^2 + 4 N L d), joint + L (24 d^2) + 4 ((N+L)^2 - N^2) d per layer"
    return {"tokens": n, "forward_flops": float(total), "formula": formula}
