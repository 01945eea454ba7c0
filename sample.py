"""Sample from a trained run's EMA weights:

    python sample.py ckpt_dir=checkpoints/stage1 num_samples=1000 cfg_scale=1.5 out=samples.npz evaluate=true

Writes `out` (.npz with `images` (N,H,W,C) uint8 and `labels`, duplicated as `arr_0`/`arr_1` for the ADM
evaluation suite) and a PNG grid next to it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from training import cli  # noqa: E402


def main(cfg):
    """One sample.py per out= (a lock beside it): two at once mixed their parts into one npz without a word (another
    seed's images under this one's request), or one deleted the parts folder under the other."""
    import contextlib

    from training.files import stale_temps
    from training.runlock import RunLock

    out = check_out(cfg.out)
    # `held`: the run's data set, held for reading to the end (data.rebuild.reading)
    with RunLock(out.parent, "choose another out=", name=f".{out.name}.lock", who="another sample.py",
                 writing=str(out)), contextlib.ExitStack() as held:
        # temporary files of a sample.py killed while writing this out= (an npz of 50k images: ~20 GB each)
        for written in (out, out.with_suffix(".png"), out.with_suffix(".eval.json")):
            for stale in stale_temps(written):
                stale.unlink(missing_ok=True)
        return _sample(cfg, out, held)


def _sample(cfg, out, held):
    import json
    import shutil
    from pathlib import Path

    import jax
    import numpy as np
    from omegaconf import OmegaConf

    from data.meta import load_meta
    from data.prepare import data_mismatch
    from data.rebuild import reading
    from models import build_model
    from training.checkpoint import Checkpointer, read_config
    from training.checksums import step_digest
    from training.errors import UserError
    from training.evaluate import evaluator_for
    from training.files import write_json
    from training.generate import generate, guide_step, load_weak
    from training.sampling import balanced_labels
    from training.tracking import grid_pick, grid_upscale, make_grid, save_png

    saved, step = read_config(cfg.ckpt_dir, cfg.step)
    stage = int(saved.get("stage", 1))
    ignored = "labels" if stage == 2 and cfg.labels is not None else \
        "prompt" if stage == 1 and cfg.get("prompt") is not None else \
        "prompts_file" if stage == 1 and cfg.get("prompts_file") is not None else None
    if ignored:   # it would be ignored: the run conditions on the other kind
        kind = "class-conditional (stage-1)" if ignored == "labels" else "text (stage-2)"
        raise UserError(f"{ignored}= is for {kind} runs, and {cfg.ckpt_dir} is a stage-{stage} run: use "
                        f"{'prompt=<caption>' if stage == 2 else 'labels=<class ids>'} instead")
    if cfg.get("prompt") is not None and cfg.get("prompts_file") is not None:
        raise UserError("prompt= and prompts_file= both name the prompts: give one of them")
    if stage == 2 and cfg.evaluate:   # the classifier scores class-conditional samples; captions have their own check
        raise UserError(f"evaluate=true scores class-conditional runs; {cfg.ckpt_dir} is a stage-2 (text) run: "
                        f"sample with evaluate=false, or run python -m training.text_eval {cfg.ckpt_dir}")
    run_cfg = OmegaConf.create(saved)
    spec = saved["model_spec"]
    sampler = sampler_for(cfg, run_cfg, step)
    k = spec["num_classes"]
    if stage == 1:   # stage 2's conditions come from the prompts, once its data set is read
        labels = class_labels(cfg.labels, k) if cfg.labels is not None else balanced_labels(cfg.num_samples, k)
        conds = labels
        if cfg.evaluate and len(labels) < 2:   # the classifier's statistics need two images: said before sampling
            raise UserError(f"evaluate=true needs at least 2 images, and {len(labels)} were asked: raise num_samples "
                            f"(or list more labels), or drop evaluate")
    if cfg.get("data_root"):   # the prepared sets moved (another disk or machine) since the run
        run_cfg.data.root = str(cfg.data_root)
    data_dir = Path(run_cfg.data.root) / run_cfg.data.name
    held.enter_context(reading(data_dir))   # a rebuild under way is waited for; none starts until the end
    try:
        meta = load_meta(data_dir)
    except UserError as err:
        raise UserError(f"{err}; or, if the prepared sets moved since the run, pass data_root=<the folder that now "
                        f"holds {run_cfg.data.name}/>") from None
    prompts = None
    if stage == 2:  # text-conditional: prompt= one string or a list (default: training captions)
        from data.prompts import check_text_matches, prompt_conds

        check_text_matches(saved, meta, cfg.ckpt_dir)
        labels, conds, prompts = prompt_conds(cfg.get("prompt"), cfg.num_samples, meta, data_dir,
                                              cfg.get("prompts_file"))
    if prompts is None and (len(labels) == 0 or labels.min() < 0 or labels.max() >= k):
        raise UserError(f"labels must be class ids in [0, {k}) and num_samples > 0")

    # Latents decode through the set's VAE and its per-channel stats: they must be the ones the run trained with.
    decoded_as = data_mismatch(saved, meta, keys=("encoder", "shape", "dtype"))
    if decoded_as:
        raise UserError(f"{cfg.ckpt_dir} was trained on another version of {meta.get('name')} ({decoded_as}): its "
                        f"samples would be decoded wrongly; sample on the data the run saw, or train again")
    if (meta.get("encoder") or {}).get("vae"):
        from data.vae import vae_for_meta

        vae_for_meta(meta)   # moved or changed since: fails now, not after sampling everything
    moved = data_mismatch(saved, meta) if cfg.evaluate and prompts is None else None
    if moved:   # its test split may hold images the run trained on, or be another set: the scores would mislead
        raise UserError(f"{cfg.ckpt_dir} was trained on another copy of {meta.get('name')} ({moved}): its "
                        f"evaluation here would mislead; sample with evaluate=false, or train again")
    # The weights (and what they are, for the parts of a stopped request) before the evaluator, which may train its
    # classifier for a minute: a run still training into ckpt_dir removes old steps (keep_ckpts) meanwhile.
    template = build_model(spec, key=jax.random.PRNGKey(0))
    with Checkpointer(cfg.ckpt_dir, create=False) as ck:
        ema = ck.restore_weights(template, step)
    weights = step_digest(cfg.ckpt_dir, step)
    # The evaluator before sampling (it may train the classifier once): a data set it cannot score fails before it.
    evaluator = evaluator_for(meta, data_dir, run_cfg.data.root) if cfg.evaluate and prompts is None else None
    weak = load_weak(cfg.ckpt_dir, sampler, template, run_cfg.train)   # before the line below: a refusal is alone
    guide = ""
    if sampler.get("guidance") == "auto":
        if not sampler.get("guide_ckpt_dir"):   # the step it read, in the line and in the npz's request
            sampler = OmegaConf.merge(sampler, {"guide_step": guide_step(sampler, run_cfg.train)})
        weak_from = sampler.get("guide_ckpt_dir") or f"step {sampler.guide_step}"
        guide = f", autoguidance {sampler.guide_scale} from {weak_from}"
    plain = "apg" if sampler.get("guidance") == "apg" else "cfg"
    star = (", scaled branches" if sampler.get("opt_scale") else "") + (
        f", first {sampler.zero_steps} step(s) zeroed" if sampler.get("zero_steps") else "")
    print(f"sampling {len(labels)} images from {cfg.ckpt_dir} step {step} ({sampler.solver}, {sampler.steps} steps, "
          f"{plain} {sampler.cfg_scale}{guide}{star})", flush=True)
    key = jax.random.PRNGKey(int(cfg.seed))

    def make(lo, hi):   # images lo..hi-1 of the request
        return generate(ema, spec, meta, take(conds, lo, hi), key, sampler, run_cfg.train, weak=weak, first=lo)
    request = {"ckpt_dir": str(Path(str(cfg.ckpt_dir)).resolve()), "step": step, "seed": int(cfg.seed),
               "sampler": OmegaConf.to_container(sampler, resolve=True), "labels": labels.tolist(), "prompts": prompts}
    # the parts of a stopped request are this checkpoint's: a run deleted and trained again into the same ckpt_dir
    # has the same path and step numbers, other weights (their recorded checksums)
    made_by = {**request, "weights": weights}
    images, parts = in_parts(out, made_by, len(labels), int(sampler.chunk), make)

    # The scores beside an npz are that npz's: those of the file being replaced go with it once it is replaced
    # (write_npz; they come back below when this one is evaluated).
    write_npz(out, images=images, labels=labels, arr_0=images, arr_1=labels,
              request=np.asarray(json.dumps(request)),   # what made these images: run, step, seed, sampler, labels
              **({"prompts": np.asarray(prompts)} if prompts else {}))  # stage 2: labels index into prompts
    if parts is not None:   # the npz is whole: the parts it was made of go
        shutil.rmtree(parts, ignore_errors=True)
    shown, nrow = grid_pick(labels)
    save_png(make_grid(images[shown], nrow=nrow), out.with_suffix(".png"), upscale=grid_upscale(images.shape[1]))
    print(f"wrote {out} and {out.with_suffix('.png')}", flush=True)
    if evaluator is not None:
        res = evaluator.evaluate(images, labels)
        res = {k2: (float(v) if isinstance(v, (float, np.floating)) else v) for k2, v in res.items()}
        print("evaluation: " + json.dumps(res), flush=True)
        write_json(out.with_suffix(".eval.json"), res)
    return images, labels


PART_CHUNKS = 16   # a request of more than this many sampler chunks is sampled, and kept, a part at a time


def in_parts(out, request: dict, n: int, chunk: int, make):
    """(images, parts folder or None): make(lo, hi) -> uint8 images lo..hi-1. A request of more than PART_CHUNKS
    chunks is sampled a part at a time, each part saved (atomically) in `.<out name>.parts/` beside `out`, so that a
    stopped sample.py (preemption, Ctrl-C, a lost node: hours into 50k images) resumes at the first missing part
    when rerun with the same request. Parts start on chunk boundaries and each image's noise comes from (seed, its
    index), so the result is the uninterrupted one, byte for byte. Another request clears the folder."""
    import hashlib
    import json
    import shutil
    from pathlib import Path

    import numpy as np

    from training.files import atomic_write

    size = PART_CHUNKS * chunk
    if n <= size:
        return make(0, n), None
    d = Path(out).parent / f".{Path(out).name}.parts"
    key = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()
    if not (d / "request").is_file() or (d / "request").read_text() != key:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / "request").write_text(key)
    held = len(list(d.glob("part-*.npy")))
    if held:   # said first: a rerun of a stopped job otherwise looked like it started over until it ended
        print(f"resuming: {held} of {-(-n // size)} parts were sampled before (in {d}; a damaged one is made again)",
              flush=True)
    images = None
    for i, lo in enumerate(range(0, n, size)):
        hi, f = min(lo + size, n), d / f"part-{i:05d}.npy"
        try:
            x = np.load(f, allow_pickle=False) if f.is_file() else None
        except (OSError, ValueError):   # cut short some other way: made again
            x = None
        if x is None or len(x) != hi - lo:
            x = make(lo, hi)
            with atomic_write(f) as tmp:
                np.save(tmp, x)
        if images is None:
            images = np.empty((n, *x.shape[1:]), x.dtype)
        images[lo:hi] = x
    return images, d


def take(conds, lo: int, hi: int):
    """Conditions lo..hi-1: class ids, stage 2's tuple of arrays, or data.prompts.PromptConds (made when asked: only
    this range's prompts are encoded)."""
    if callable(conds):
        return conds(lo, hi)
    return tuple(c[lo:hi] for c in conds) if isinstance(conds, tuple) else conds[lo:hi]


def write_npz(out, **arrays):
    """np.savez through a temporary file renamed over `out`: a write cut short (disk full, Ctrl-C) leaves the file
    `out` held before, never half of a new one, and its evaluation (<out>.eval.json), which goes only once `out` is
    replaced."""
    from pathlib import Path

    import numpy as np

    from training.errors import UserError
    from training.files import atomic_write

    out = Path(out)
    try:
        with atomic_write(out) as tmp:
            np.savez(tmp, **arrays)
    except OSError as err:   # disk full, quota, file too large: zipfile's own errors name no file (a traceback)
        raise UserError(f"writing {out} failed ({err.strerror or err}); the file that was there and its "
                        f"evaluation are unchanged: free disk space or choose another out=, then rerun") from None
    out.with_suffix(".eval.json").unlink(missing_ok=True)   # the replaced file's scores go only once it is replaced


def check_out(value):
    """out= must name an .npz whose folder can be made, before any work: np.savez appends .npz to any other name
    (and the PNG grid beside it would then replace a file of the user's: out=x.png)."""
    from pathlib import Path

    from training.errors import UserError, check_writable_dir

    out = Path(str(value))
    if out.suffix != ".npz" or out.is_dir():
        raise UserError(f"out={value} must be a file name ending in .npz (the PNG grid and the evaluation are written "
                        f"beside it): e.g. out=samples.npz")
    check_writable_dir(out.parent, f"out={value}: cannot create its folder {out.parent}, or write there",
                       "choose another path")
    return out


def sampler_for(cfg, run_cfg, step: int):
    """The run's saved sampler with this command's overrides, checked before anything slow (evaluator, weights)."""
    from pathlib import Path

    from training.checkpoint import read_config
    from training.errors import UserError
    from training.generate import GUIDE_KEYS, check_weak_step
    from training.sampling import ADAPTIVE, check_sampler

    sampler = run_cfg.sampler
    given = [k for k in ("cfg_scale", "cfg_interval", "guidance", "apg_eta", "guide_step", "guide_ckpt_dir",
                         "guide_scale", "guide_interval", "solver", "shift", "noise", "t_eps", "steps", "rtol", "atol",
                         "chunk", "opt_scale", "zero_steps") if cfg[k] is not None]
    for k in given:
        sampler[k] = cfg[k]
    # An option the chosen guidance or solver does not use would be ignored without a word: refused instead.
    g, solver = sampler.get("guidance", "cfg"), sampler.get("solver")
    for k in given:
        if k.startswith("guide_") and g != "auto" or k == "apg_eta" and g != "apg":
            raise UserError(f"{k} is for guidance={'auto' if k.startswith('guide_') else 'apg'}, and this sampler "
                            f"uses guidance={g}: add guidance={'auto' if k.startswith('guide_') else 'apg'}, or drop "
                            f"{k}")
        if k == "t_eps" and run_cfg.train.get("prediction", "v") != "x":
            raise UserError(f"t_eps clamps x-prediction's conversion to velocity, and this run predicts "
                            f"{run_cfg.train.get('prediction', 'v')}: drop t_eps")
        if k == "zero_steps" and solver in ADAPTIVE and cfg[k]:
            raise UserError(f"zero_steps is for the fixed-step solvers (euler, heun); solver={solver} ignores it")
        if k in ("rtol", "atol") and solver not in ADAPTIVE:
            raise UserError(f"{k} is for the adaptive solvers ({', '.join(ADAPTIVE)}); solver={solver} takes steps=N")
    gd = sampler.get("guide_ckpt_dir")
    if gd and Path(str(gd)).expanduser().resolve() == Path(str(cfg.ckpt_dir)).expanduser().resolve():
        sampler.guide_ckpt_dir = None   # the run itself: its own earlier EMA, under the same-run rule below
    check_sampler(sampler)
    check_weak_step(sampler, run_cfg.train, step)   # the weak EMA of this run must come before the sampled one
    if g == "auto" and sampler.get("guide_ckpt_dir"):   # another run as the weak model: it exists, before the slow part
        read_config(str(sampler.guide_ckpt_dir), sampler.get("guide_step"), keys=GUIDE_KEYS)
    return sampler


def class_labels(value, num_classes: int):
    """labels=3 or labels=[0,3,3]: class ids (N,) int32. A fraction or a string is refused, not truncated to an id."""
    import numpy as np
    from omegaconf import OmegaConf

    from training.errors import UserError

    raw = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    bad = UserError(f"labels={raw} must be class ids, whole numbers in [0, {num_classes}): e.g. labels=3 or "
                    f"labels=[0,1,2]")
    try:
        arr = np.atleast_1d(np.asarray(raw))
    except ValueError:   # ragged nested lists
        raise bad from None
    whole = arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and np.all(arr == np.round(arr)))
    if arr.ndim != 1 or not whole or (arr.size and (arr.min() < 0 or arr.max() >= num_classes)):
        raise bad
    return arr.astype(np.int32)


if __name__ == "__main__":
    cli.main("sample", main)
