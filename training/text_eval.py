"""Stage-2 check: do samples for training captions look like the captioned image?

For n captions spread over the training set: one EMA sample each (CFG, the run's sampler), then the nearest real
training images in pooled-pixel space (data/emoji.py `features`: the rationale is there); a hit when the captioned
image is among the k nearest. Latent sets are ranked in the model's latent space instead (decoding every training
image through the VAE would cost more than the run; the grid's real row is the VAE's reconstruction). Written to
<ckpt_dir>/eval-step<step>.json with a PNG grid (sample above real); a command-line re-check adds its settings to
the name (eval-step<step>-n<N>-cfg<S>-steps<K>.json).
"""

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from data.emoji import target_ranks
from data.meta import to_model
from data.vae import is_latent
from training.errors import UserError
from training.files import write_json
from training.generate import generate, load_weak, text_conds, to_images
from training.tracking import grid_upscale, make_grid, save_png


def caption_topk(model, spec: dict, meta: dict, captions, real, cfg, step: int, k: int = 5, tag: str = "") -> dict:
    """captions: record indices -> load_text's dict for those records only (the split's features can exceed memory);
    real: the split's images as data.loader.StoredImages (streamed, for the same reason).
    Written as <ckpt_dir>/eval-step<step><tag>.json and .png: the end of training uses no tag; a re-check from the
    command line tags its settings, so it never replaces the run's own result."""
    n = min(int(cfg.eval.num_samples), len(real))
    idx = np.linspace(0, len(real) - 1, n).astype(int)
    c = captions(idx)
    t0 = time.perf_counter()
    x = generate(model, spec, meta, text_conds(c["text"], c["mask"]),
                 jax.random.PRNGKey(int(cfg.train.seed) + 2), cfg.sampler, cfg.train,
                 weak=load_weak(cfg.train.ckpt_dir, cfg.sampler, model, cfg.train), decode=False)
    imgs = to_images(x, meta, cfg.sampler)
    targets = real.take(idx)   # the split itself is streamed in chunks: it may not fit in memory
    if is_latent(meta):   # one pass for both k
        rank = target_ranks(x, (to_model(c, meta) for c in real.chunks()), idx,
                            features=lambda z: z.reshape(len(z), -1), targets=to_model(targets, meta))
    else:
        rank = target_ranks(imgs, real.chunks(), idx, targets=targets)
    # chance: a sample that resembles no image in particular finds its own among k of num_real by luck (5/48 on a
    # folder of 48: the untrained model's 0.167 there was barely above it)
    res = {f"top{k}_hit_rate": float(np.mean(rank < k)), "top1_hit_rate": float(np.mean(rank < 1)),
           f"chance_top{k}": min(1.0, k / len(real)), "chance_top1": 1.0 / len(real),
           "num_captions": int(n), "num_real": int(len(real)), "cfg_scale": float(cfg.sampler.cfg_scale),
           "sampler_steps": int(cfg.sampler.steps), "sample_seconds": time.perf_counter() - t0}
    out = Path(cfg.train.ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"eval-step{step:07d}{tag}.json", res)
    m = min(n, 32)   # rows of 8: generated, then the captioned real image
    shown = to_images(to_model(targets[:m], meta), meta, cfg.sampler) if is_latent(meta) else targets[:m]
    pairs = np.concatenate([np.stack([imgs[i:i + 8], shown[i:i + 8]]).reshape(-1, *imgs.shape[1:])
                            for i in range(0, m - m % 8, 8)]) if m >= 8 else imgs
    save_png(make_grid(pairs, nrow=8), out / f"eval-step{step:07d}{tag}.png",
             upscale=grid_upscale(imgs.shape[1]))
    print("evaluation: " + json.dumps(res), flush=True)
    return res


KEYS = {"step": int, "num_samples": int, "cfg_scale": float, "steps": int}
AT_LEAST = {"num_samples": 1, "steps": 1, "step": 0, "seed": 0}   # the keys' smallest values, in every tool
USAGE = "usage: python -m training.text_eval <ckpt_dir> [step=N] [num_samples=N] [cfg_scale=X] [steps=N]"


def parse_args(argv: list[str], keys: dict = KEYS, usage: str = USAGE) -> tuple[str, dict]:
    """<ckpt_dir> key=value ...: the run's directory and the known `keys`, typed; anything else one UserError (also
    for bench/text_class_eval.py, which took a misspelt key silently and a missing directory as an IndexError)."""
    if not argv or "=" in argv[0]:
        raise UserError(f"name the stage-2 run's checkpoint directory first: {usage}")
    kv = {}
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq or key not in keys:
            raise UserError(f"{arg!r} is not key=value with one of the keys {', '.join(keys)}: {usage}")
        try:
            kv[key] = keys[key](value)
        except ValueError:
            what = "a whole number" if keys[key] is int else "a number"
            raise UserError(f"{arg}: {key} must be {what}: {usage}") from None
        if kv[key] < AT_LEAST.get(key, kv[key]):
            raise UserError(f"{arg}: {key} must be >= {AT_LEAST[key]}: {usage}")
    return argv[0], kv


def load_run(ckpt_dir, step=None, held=None, **sampler) -> tuple:
    """(saved config, cfg, step, meta, data_dir, EMA model) of a saved stage-2 run, with `sampler` overrides
    (cfg_scale, steps ...), checked before anything slow: a stage-1 run, a sampler the run cannot use, or data
    re-prepared since (other caption features, other images) are refused in one line."""
    from omegaconf import OmegaConf

    from data.prompts import check_text_matches
    from data.meta import load_meta
    from data.prepare import data_mismatch
    from data.rebuild import reading
    from models import build_model
    from training.checkpoint import Checkpointer, read_config
    from training.generate import check_weak_step
    from training.sampling import check_sampler

    saved, step = read_config(ckpt_dir, step)
    if saved.get("model_spec", {}).get("mixing") is None:
        raise UserError(f"{ckpt_dir} is a class-conditional (stage-1) run: text_eval checks stage-2 runs; score "
                        f"stage 1 with python sample.py ckpt_dir={ckpt_dir} evaluate=true")
    cfg = OmegaConf.create(saved)
    cfg.train.ckpt_dir = ckpt_dir   # the run may have moved: read the weak model (autoguidance) and write results here
    for k, v in sampler.items():
        cfg.sampler[k] = v
    check_sampler(cfg.sampler)
    check_weak_step(cfg.sampler, cfg.train, step)
    data_dir = Path(cfg.data.root) / cfg.data.name
    if held is not None:   # an ExitStack: the set is held for reading until it closes (data.rebuild.reading)
        held.enter_context(reading(data_dir))
    meta = load_meta(data_dir)
    check_text_matches(saved, meta, ckpt_dir)
    moved = data_mismatch(saved, meta)
    if moved:   # other images or captions: the hit rate would score the run against data it never saw
        raise UserError(f"{ckpt_dir} was trained on another copy of {meta.get('name')} ({moved}): score it on the data "
                        f"it saw, or train again")
    with Checkpointer(ckpt_dir, create=False) as ck:
        ema = ck.restore_weights(build_model(saved["model_spec"], key=jax.random.PRNGKey(0)), step)
    return saved, cfg, step, meta, data_dir, ema


def main(argv: list[str]) -> dict:
    """python -m training.text_eval <ckpt_dir> [key=value ...]: the check on a saved run (e.g. one stopped early).
    Keys: step, num_samples, cfg_scale, steps (sampler)."""
    import contextlib

    from data.loader import StoredImages, load_text

    ckpt_dir, kv = parse_args(argv)
    with contextlib.ExitStack() as held:
        saved, cfg, step, meta, data_dir, ema = load_run(ckpt_dir, kv.get("step"), held, **{
            k: kv[k] for k in ("cfg_scale", "steps") if k in kv})
        cfg.eval.num_samples = kv.get("num_samples", cfg.eval.num_samples)
        # The run's own eval-step<N>.json (written at the end of training) stays: this one is named by its settings.
        tag = f"-n{int(cfg.eval.num_samples)}-cfg{float(cfg.sampler.cfg_scale):g}-steps{int(cfg.sampler.steps)}"
        return caption_topk(ema, saved["model_spec"], meta, lambda idx: load_text(meta, data_dir, "train", idx),
                            StoredImages(meta, data_dir, "train"), cfg, step, tag=tag)


def run(argv: list[str]) -> None:
    """The command line: a user mistake ends in one line and exit code 2, as in every script (cli.main itself composes
    a Hydra config, which this positional directory is not)."""
    from training.cli import one_line_errors

    with one_line_errors():
        main(argv)


if __name__ == "__main__":
    run(sys.argv[1:])
