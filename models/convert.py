"""Stage 1 -> stage 2: transplant a class-conditional DiT into a freshly built TextDiT (eqx.tree_at surgery).

Copied as is: patch embedding, timestep MLP, every block's attention (QKV, output, QK-norm scales) and MLP, the
final adaLN and output layer (the positional embedding is a fixed function, identical by construction).

Folded: stage 1 conditions on c = t_emb(t) + y_emb[null] and each block i computes m_i = W_i silu(c) + b_i.
  1. The null-class embedding goes into the timestep MLP's last bias, so the stage-2 c is the stage-1 null-class c
     for every t (the final layer is then exact for every t too).
  2. adaLN-single has ONE map (W, b) for all blocks plus a per-block table E_i. We take W = mean_i W_i,
     b = mean_i b_i, and E_i = (W_i u* + b_i) - (W u* + b) with u* = silu(c(t*)) -- keeping the SiLU and with the sign
     that gives block i exactly m_i at t = t* (the seed dropped the SiLU and had E_i = S_bar - S_i: the wrong sign).
     At other t the modulation differs by (W_i - W)(u(t) - u*): one shared map cannot reproduce depth different ones.
New text parts keep their initial values, which add nothing (see models/mmdit.py), so with the null caption the
stage-2 model equals the stage-1 model for the null class at t = t* to fp32 rounding.
"""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from models import ARCH_KEYS
from models.dit import FREQ_DIM, DiT
from models.layers import timestep_sinusoid
from models.mmdit import TextDiT
from training.errors import UserError


def check_compatible(s1: DiT, s2: TextDiT) -> None:
    pairs = {"patch embedding": (s1.patch_embed.weight.shape, s2.patch_embed.weight.shape),
             "blocks": (s1.blocks.attn.qkv.weight.shape, s2.blocks.attn.qkv.weight.shape),
             "MLP": (s1.blocks.mlp.fc1.weight.shape, s2.blocks.mlp.fc1.weight.shape),
             # equal widths can still split into other heads: the copied QKV weights and QK-norm scales are per head
             "num_heads": (s1.blocks.attn.num_heads, s2.blocks.attn.num_heads),
             "head dim": (s1.blocks.attn.q_scale.shape[-1], s2.blocks.attn.q_scale.shape[-1]),
             "input size": (s1.input_size, s2.input_size), "patch size": (s1.patch_size, s2.patch_size)}
    bad = [f"{k}: stage 1 {a} vs stage 2 {b}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise UserError("train.init_from checkpoint does not match the stage-2 model (" + "; ".join(bad) +
                        "): use the stage-1 run's model preset (hidden size, depth, heads, patch size) and a data set "
                        "of the same image shape")


def stage1_to_stage2(s1: DiT, s2: TextDiT, fold_t: float = 0.5) -> TextDiT:
    """Return `s2` with every stage-1 weight that has a counterpart copied in and adaLN folded into adaLN-single."""
    check_compatible(s1, s2)
    y_null = s1.y_embed[s1.null_class]
    t_mlp2 = eqx.tree_at(lambda l: l.bias, s1.t_mlp2, s1.t_mlp2.bias + y_null)
    c = t_mlp2(jax.nn.silu(s1.t_mlp1(timestep_sinusoid(jnp.float32(fold_t), FREQ_DIM))))  # = t_emb + y_null
    u = jax.nn.silu(c)
    w_i, b_i = s1.blocks.ada.weight, s1.blocks.ada.bias          # (depth, D, 6D), (depth, 6D)
    w, b = w_i.mean(0), b_i.mean(0)
    table = (jnp.einsum("d,ide->ie", u, w_i) + b_i) - (u @ w + b)  # E_i = S_i - S_bar
    # The attention's arrays, not the module: its static fields (head count, kernel) stay those of the stage-2 spec.
    a1 = s1.blocks.attn
    where = lambda m: (m.patch_embed, m.t_mlp1, m.t_mlp2, m.t_ada.weight, m.t_ada.bias, m.blocks.attn.qkv,
                       m.blocks.attn.proj, m.blocks.attn.q_scale, m.blocks.attn.k_scale, m.blocks.mlp,
                       m.blocks.table, m.final_ada, m.final)
    return eqx.tree_at(where, s2, (s1.patch_embed, s1.t_mlp1, t_mlp2, w, b, a1.qkv, a1.proj, a1.q_scale, a1.k_scale,
                                   s1.blocks.mlp, table, s1.final_ada, s1.final))


def load_init(ckpt_dir: str, step=None, prediction: str | None = None, stage1: bool = False
              ) -> tuple[DiT | TextDiT, dict, dict]:
    """(EMA weights, spec, saved config) of a run, stage 1 or stage 2 (its spec rebuilt from the checkpoint's saved
    config). With `prediction` (the new run's train.prediction), a run that predicts another quantity is refused: its
    weights would output a velocity where the new run reads a clean image, or the reverse, and train on from there
    without a word. `stage1`: a stage-2 run is refused (before its weights are read)."""
    from models import build_model
    from training.checkpoint import Checkpointer, read_config

    if not Path(ckpt_dir).is_dir():   # read_config's own hint (ckpt_dir=...) is sample.py's key, not this one
        raise UserError(f"train.init_from={ckpt_dir} is no directory: give the train.ckpt_dir of a stage-1 or stage-2 "
                        "run (e.g. checkpoints/stage1), or train.init_from=null to start from scratch")
    saved, step = read_config(ckpt_dir, step)
    spec = saved.get("model_spec", {})
    if spec.get("mixing") is None and "num_classes" not in spec:
        raise UserError(f"train.init_from={ckpt_dir} is not a DiT run (stage 1 or stage 2)")
    if stage1 and spec.get("mixing") is not None:
        raise UserError(f"{ckpt_dir} is a stage-2 (text-conditional) run, not a stage-1 one")
    was = str(saved.get("train", {}).get("prediction", "v"))   # runs saved before train.prediction existed: v
    if prediction is not None and was != str(prediction):
        raise UserError(f"train.init_from={ckpt_dir} was trained with train.prediction={was}, and this run uses "
                        f"{prediction}: pass train.prediction={was}, or initialise from a run that predicts "
                        f"{prediction}")
    template = build_model(spec, key=jax.random.PRNGKey(0))
    with Checkpointer(ckpt_dir, create=False) as ck:
        return ck.restore_weights(template, step), spec, saved


def load_stage1(ckpt_dir: str, step=None, prediction: str | None = None) -> tuple[DiT, dict]:
    """EMA weights and spec of a stage-1 run (load_init); a stage-2 run is refused."""
    model, spec, _ = load_init(ckpt_dir, step, prediction, stage1=True)
    return model, spec


def init_from(ckpt_dir: str, model: TextDiT, spec: dict, meta: dict, prediction: str, fold_t: float) -> TextDiT:
    """train.init_from: `model` (freshly built for this stage-2 run from `spec`) with the weights of the run in
    `ckpt_dir`: a stage-1 run's transplanted (stage1_to_stage2), or a stage-2 run's copied whole, to fine-tune it on
    another captioned set (copy_stage2)."""
    old, old_spec, saved = load_init(ckpt_dir, prediction=prediction)
    if old_spec.get("mixing") is None:
        model = stage1_to_stage2(old, model, fold_t)   # refuses a stage-1 model that does not fit
        print(f"initialised from stage 1 {ckpt_dir} (adaLN folded at t={fold_t})", flush=True)
        return model
    model = copy_stage2(old, model, saved, spec, meta, ckpt_dir)
    print(f"initialised from stage-2 run {ckpt_dir}: every weight copied (its EMA)", flush=True)
    return model


# What a stage-2 model's weights are shaped and mean by, other than num_classes (a captioned set's class count does
# not reach the weights). input_size / in_channels: the same image (or latent) shape.
STAGE2_ARCH = tuple(k for k in ARCH_KEYS if k != "num_classes")


def copy_stage2(old: TextDiT, new: TextDiT, saved: dict, spec: dict, meta: dict, ckpt_dir: str) -> TextDiT:
    """`new` (built from `spec`) with `old`'s arrays: the same architecture (this run's model keys and data shape) and
    caption features from the same text encoder (the same width from another encoder would be read as noise).
    Static fields (scan, remat, attention kernel) stay this run's."""
    was_spec, now_spec = saved["model_spec"], spec
    key = {"input_size": "data.size", "in_channels": "image channels", "text_dim": "text encoder width",
           "max_tokens": "data.max_tokens"}   # the override that sets each; the rest are model.<key>
    bad = [f"{key.get(k, 'model.' + k)}: run {was_spec.get(k)} vs now {now_spec.get(k)}" for k in STAGE2_ARCH
           if k in now_spec and _norm(was_spec.get(k)) != _norm(now_spec.get(k))]
    if bad:
        raise UserError(f"train.init_from={ckpt_dir} is another stage-2 model ({'; '.join(bad)}): pass the run's "
                        f"values (its model keys, and a data set of the same image size, token count and encoder)")
    from data.prepare import data_identity

    # latents: the VAE that made them (its name; the set's own statistics may differ) or pixels, as the run's
    was_vae = ((saved.get("data_identity") or {}).get("encoder") or {}).get("vae")
    now_vae = (data_identity(meta).get("encoder") or {}).get("vae")
    if was_vae != now_vae and "data_identity" in saved:
        what = lambda v: f"latents of the VAE {v}" if v else "pixels"
        raise UserError(f"train.init_from={ckpt_dir} was trained on {what(was_vae)}, and this data set holds "
                        f"{what(now_vae)}: fine-tune it on data of the same kind")
    was_text = (saved.get("data_identity") or {}).get("text") or {}
    now_text = {"encoder": meta["text"].get("encoder"),
                "text_encoder_weights": (meta["text"].get("request") or {}).get("text_encoder_weights")}
    diff = [f"{k}: run {str(was_text[k])[:12]} vs now {str(now_text[k])[:12]}" for k in now_text
            if was_text.get(k) and now_text[k] and was_text[k] != now_text[k]]
    if diff:
        raise UserError(f"train.init_from={ckpt_dir} was trained on caption features of another text encoder "
                        f"({', '.join(diff)}): prepare this data set with that run's data.text_encoder (and "
                        "data.text_encoder_path)")
    arrays, static = eqx.partition(new, eqx.is_array)
    loaded = eqx.filter(old, eqx.is_array)
    shapes = lambda t: [a.shape for a in jax.tree.leaves(t)]   # static fields (kernel, remat) may differ: new's stay
    assert shapes(loaded) == shapes(arrays), "same architecture keys, other arrays"   # a bug here, not the user's
    return eqx.combine(loaded, static)


def _norm(value):
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else value
