"""Generate images from a model for grids, evaluation and sample.py (one code path for all three)."""

import numpy as np

from data.meta import to_uint8
from training.errors import UserError
from data.vae import decode_to_uint8, is_latent
from training.sampling import balanced_labels, sample


def generate(model, spec: dict, meta: dict, labels: np.ndarray, key, sampler_cfg, train_cfg, weak=None,
             decode: bool = True, first: int = 0) -> np.ndarray:
    """Images as uint8 (N, H, W, C) for the given labels (`to_images`); decode=False: the model-space samples.
    weak: the weaker model for autoguidance (sampler.guidance = auto; see load_weak). first: sampling.sample's."""
    h, w = spec["input_size"]
    null = text_null if spec.get("mixing") else spec["num_classes"]  # stage 2: labels = text_conds(...)
    finish = (lambda x: to_images(x, meta, sampler_cfg)) if decode else None   # chunk by chunk, as they come
    return sample(model, labels, key, null_cond=null, shape=(h, w, spec["in_channels"]),
                  sampler_cfg=sampler_cfg, prediction=train_cfg.prediction, t_eps=float(train_cfg.t_eps),
                  precision=train_cfg.precision, weak=weak, finish=finish, first=first)


def to_images(x_model, meta: dict, sampler_cfg=None) -> np.ndarray:
    """Model space -> uint8 images; latent data sets are decoded by the VAE named in their meta.json (data/vae.py:
    torch, in chunks of sampler.chunk, on the CPU unless $DIT_VAE_DEVICE names another device)."""
    if is_latent(meta):
        chunk = int((sampler_cfg or {}).get("chunk", 64) or 64)
        return decode_to_uint8(np.asarray(x_model), meta, chunk=chunk)
    return to_uint8(x_model, meta)


OLD_GUIDE_FRACTION = 5 / 12   # runs saved before sampler.guide_fraction existed kept the EMA at 5/12 of the run


def guide_step(sampler_cfg, train_cfg) -> int | None:
    """The step whose EMA is autoguidance's weak model: sampler.guide_step, or sampler.guide_fraction of train.steps
    when it is null (step 800 of the default 1600); None when the sampler does not autoguide. Training saves that
    step and keeps it whatever keep_ckpts says."""
    if sampler_cfg.get("guidance", "cfg") != "auto":
        return None
    step = sampler_cfg.get("guide_step", None)
    if step is not None:
        return int(step)
    return max(1, round(float(sampler_cfg.get("guide_fraction", OLD_GUIDE_FRACTION)) * int(train_cfg.steps)))


def check_guide_step(sampler_cfg, train_cfg) -> None:
    """Autoguidance reads its weak model from an earlier checkpoint of the run: it must come before the last step."""
    step, total = guide_step(sampler_cfg, train_cfg), int(train_cfg.steps)
    if step is not None and not 0 < step < total:
        what = (f"sampler.guide_step={step}" if sampler_cfg.get("guide_step", None) is not None else
                f"sampler.guide_fraction={sampler_cfg.get('guide_fraction')} (step {step})")
        raise UserError(f"sampler.guidance=auto guides away from the EMA saved at an earlier step, but {what} is not "
                        f"between 0 and train.steps={total}: set a guide_fraction in (0, 1), a guide_step before the "
                        f"last, or sampler.guidance=cfg")


GUIDE_KEYS = ("guide_ckpt_dir", "guide_step")   # what a user typed to name another run's weak model


def load_weak(ckpt_dir, sampler_cfg, template, train_cfg):
    """The weak model of autoguidance (None for other guidance): the EMA saved at guide_step in this run's ckpt_dir,
    or, when sampler.guide_ckpt_dir names another run (e.g. a smaller model trained for less, as in Karras et al.),
    the EMA of that run at guide_step (null: its latest), rebuilt from the config saved there."""
    if sampler_cfg.get("guidance", "cfg") != "auto":
        return None
    from training.checkpoint import Checkpointer, read_config

    other = sampler_cfg.get("guide_ckpt_dir", None)
    if other:
        import jax

        from models import build_model

        saved, step = read_config(other, sampler_cfg.get("guide_step", None), keys=GUIDE_KEYS)
        check_weak_run(saved, template, train_cfg, other)
        template, ckpt_dir = build_model(saved["model_spec"], key=jax.random.PRNGKey(0)), other
    else:
        step = guide_step(sampler_cfg, train_cfg)

    with Checkpointer(ckpt_dir, create=False) as ckpt:
        steps = sorted(ckpt.manager.all_steps())
        if step not in steps:
            raise UserError(f"sampler.guidance=auto needs the checkpoint at guide_step={step} in {ckpt_dir}, which "
                            f"holds steps {steps}: pass guide_step=<one of them> (an early one), or guidance=cfg")
        return ckpt.restore_weights(template, step)


def check_weak_step(sampler_cfg, train_cfg, step: int) -> None:
    """Autoguidance from this run's own checkpoints guides away from an EARLIER EMA: from a later one it would guide
    away from a stronger model, and from the same step it is plain guidance with extra cost. Another run's weak
    model (guide_ckpt_dir) may be at any step: it is weaker by its size or training, not by its step."""
    weak = guide_step(sampler_cfg, train_cfg)
    if weak is None or sampler_cfg.get("guide_ckpt_dir", None) or weak < int(step):
        return
    raise UserError(f"sampler.guidance=auto guides away from an earlier EMA of the run, but guide_step={weak} is not "
                    f"before the sampled step {step}: pass guide_step=<a step before {step}>, or guidance=cfg")


def model_inputs(model) -> dict:
    """The inputs a model takes, from its static fields: images, and class ids (the DiT) or caption features of a
    width and length (the TextDiT; it has no num_classes)."""
    return spec_inputs({k: getattr(model, k, None) for k in ("input_size", "in_channels", "mixing", "text_dim",
                                                              "max_tokens", "num_classes")})


def spec_inputs(spec: dict) -> dict:
    """`model_inputs` of the model a saved spec builds (without building it)."""
    mine = {"input_size": list(spec.get("input_size") or []), "in_channels": spec.get("in_channels")}
    if spec.get("mixing") is not None:
        return {**mine, "conditioning": "captions", "text_dim": spec.get("text_dim"),
                "max_tokens": spec.get("max_tokens")}
    return {**mine, "conditioning": "class labels", "num_classes": spec.get("num_classes")}


def check_weak_run(saved: dict, strong, train_cfg, where) -> None:
    """A weak model from another run must take the same inputs and predict the same quantity as the strong one."""
    tc = saved.get("train", {})
    mine = {**model_inputs(strong), "prediction": train_cfg.prediction, "t_eps": float(train_cfg.t_eps)}
    theirs = {**spec_inputs(saved["model_spec"]), "prediction": tc.get("prediction"),
              "t_eps": float(tc.get("t_eps", -1))}
    bad = [f"{k} {theirs.get(k)} vs {mine[k]}" for k in mine if theirs.get(k) != mine[k]]
    if bad:
        raise UserError(f"guide_ckpt_dir={where} holds a run that does not match this one ({'; '.join(bad)}): "
                        f"train the weak model on the same data with the same train.prediction")


GRID_CLASSES = 16   # at most this many rows in a sample grid (ImageNet's 1000 classes: 8000 decoded images a grid)


def grid_labels(num_classes: int, per_class: int = 8) -> np.ndarray:
    """Rows of one class each, for sample grids: every class, or GRID_CLASSES spread evenly over many classes."""
    if num_classes <= GRID_CLASSES:
        return balanced_labels(num_classes * per_class, num_classes)
    return np.repeat(np.linspace(0, num_classes - 1, GRID_CLASSES).round().astype(np.int32), per_class)


def text_conds(text: np.ndarray, mask: np.ndarray) -> tuple:
    """Stage-2 per-example conditions for `generate`/`sample`: caption states (N,T,E), mask (N,T), drop=False."""
    return (np.asarray(text, np.float32), np.asarray(mask, bool), np.zeros(len(text), bool))


def text_null(cond: tuple) -> tuple:
    """The null condition of a stage-2 batch: same arrays, drop=True (the model swaps in its learned null caption)."""
    import jax.numpy as jnp

    text, mask, drop = cond
    return text, mask, jnp.ones_like(drop)
