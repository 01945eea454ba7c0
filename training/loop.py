"""The training loop both stages share: set-up, resume, the step loop, logging, checkpoints, final evaluation.

A stage script only decides what differs (its `Task`: data, model spec, conditioning); everything else is here.
Resume order: build a fresh state from the config -> restore arrays + counters + PRNG key + data iterator from the
latest checkpoint in train.ckpt_dir -> continue at the restored step with the same per-step randomness.
"""

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from omegaconf import OmegaConf

from data.prepare import data_identity, data_mismatch
from models import build_model, forward_flops, param_count
from training import distributed, flow, sharding
from training.sampling import check_sampler
from training.settings import check_resume_settings, check_same_model, check_train_settings, describe
from training.checkpoint import Checkpointer, read_config
from training.errors import UserError
from training.files import write_json, write_text
from training.generate import check_guide_step, generate, grid_labels, guide_step, load_weak
from training.optim import make_optimizer, state_layout
from training.state import init_state, split_keys
from training.step import check_route, class_conditioning, make_train_step
from training.tracking import Tracker, grid_upscale, make_grid, save_png


@dataclasses.dataclass
class Task:
    """What a stage decides; the loop does the rest."""
    spec: dict                      # model spec (models.model_spec), saved with every checkpoint
    meta: dict                      # prepared data set metadata
    data_dir: str
    make_iterator: Callable         # (batch_size, process_index, process_count) -> checkpointable iterator
    null_cond: int                  # the null condition (class id) used for CFG
    conditioning: Callable = class_conditioning
    evaluator: Callable | None = None  # () -> object with .evaluate(images, labels) -> dict, or None
    init_model: Callable | None = None  # fresh model -> model (stage 2: transplant stage-1 weights, train.init_from)
    grid_conds: Callable | None = None  # () -> conditions for the sample grid (default: 8 per class)
    grid_rows: Callable | None = None   # () -> what each grid row shows, written to samples/rows.txt (default: classes)
    final_eval: Callable | None = None  # (ema model, step) -> dict: end-of-run check when there is no `evaluator`
    check_eval: Callable | None = None  # () -> None, raising UserError when the end-of-run evaluation cannot run


class StopFlag:
    """SIGTERM / SIGINT (preemption, Ctrl-C): finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.signal = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        """Give SIGTERM / SIGINT back to the handlers they had (after the loop: a Ctrl-C during the final sampling or
        evaluation interrupts it, instead of being swallowed with a promise of a checkpoint)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: finishing the current step and writing a checkpoint", flush=True)


def run(cfg, task: Task) -> dict:
    from training.schema import check_values

    check_values("config", cfg)   # cli.main checks too; this covers Python callers of a stage's main(cfg)
    tc = cfg.train
    distributed.initialize(cfg.get("distributed"))  # before anything touches devices
    is_main = jax.process_index() == 0
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model_spec"] = task.spec
    config["data_identity"] = data_identity(task.meta)   # a resume or an evaluation on other data is refused
    mesh = sharding.make_mesh(cfg.mesh)
    global_batch = int(tc.batch_size) * int(tc.grad_accum)
    if global_batch % mesh.size or global_batch % jax.process_count():
        raise UserError(f"batch {global_batch} (batch_size x grad_accum) must be divisible by the {mesh.size} devices "
                        f"and the {jax.process_count()} processes")
    check_train_settings(tc)
    flow.check_objective(tc)
    check_route(tc, task.spec)
    check_sampler(cfg.sampler)   # a bad solver or guidance interval fails now, not at the first sample grid
    check_guide_step(cfg.sampler, tc)
    if is_main and (task.meta.get("encoder") or {}).get("vae"):
        from data.vae import vae_for_meta   # (torch: imported only for latent sets)

        vae_for_meta(task.meta)   # grids and the evaluation decode through it: moved or changed, it fails now
    if is_main and cfg.eval.at_end and task.check_eval is not None:
        task.check_eval()         # a set the end-of-run evaluation cannot score is refused before training
    if is_main:
        print(f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over {jax.process_count()} process(es); "
              f"effective batch {global_batch} = batch_size {int(tc.batch_size)} x grad_accum {int(tc.grad_accum)}",
              flush=True)

    # ---- model, optimizer, state ----
    model_key, train_key = split_keys(tc.seed)
    model = build_model(task.spec, key=model_key)
    if task.init_model is not None:
        model = task.init_model(model)
    flops = forward_flops(task.spec)
    if is_main:
        print(f"model {task.spec.get('name')}: {param_count(model) / 1e6:.2f}M parameters, "
              f"{flops['forward_flops'] / 1e9:.3f} GFLOPs forward per image ({flops['tokens']} tokens)", flush=True)
    optimizer, schedule = make_optimizer(tc, cfg.optim)
    state = sharding.place(init_state(model, optimizer, train_key), mesh)

    # ---- data and checkpoints (resume) ----
    it = task.make_iterator(global_batch // jax.process_count(), jax.process_index(), jax.process_count())
    # Disk full or unwritable: fail now, not at the first save (room for one checkpoint of the state's arrays).
    weak_step = guide_step(cfg.sampler, tc)   # autoguidance: this step's checkpoint is saved and kept for sampling
    kept = _kept_steps(tc, weak_step)
    ckpt = Checkpointer(tc.ckpt_dir, keep=tc.keep_ckpts, preserve=kept,
                        need_bytes=sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(state)))
    try:  # a refusal here must still shut Orbax's background threads down, or they print at exit
        latest = ckpt.latest_step()
        run_id, history = None, []
        if tc.is_restore:
            if latest is None:
                raise UserError(f"train.is_restore=true but {tc.ckpt_dir} holds no checkpoint: "
                                f"drop is_restore to start a new run, or point train.ckpt_dir at an existing one")
            saved, _ = read_config(tc.ckpt_dir, latest)
            check_same_model(saved, task.spec, tc.ckpt_dir)
            moved = data_mismatch(saved, task.meta)
            if moved:   # the data iterator's saved position would index into other records: not a resume
                raise UserError(f"the checkpoint in {tc.ckpt_dir} was trained on another copy of "
                                f"{task.meta.get('name')} ({moved}): resume on the data it was trained on, or start a "
                                f"new run in another train.ckpt_dir")
            was, now = state_layout(saved.get("optim", {})), state_layout(cfg.optim)
            if was != now:   # a different optimizer state: it cannot be restored
                raise UserError(f"the checkpoint in {tc.ckpt_dir} was trained with {was}: resume with {was}, "
                                f"or start {now} in another train.ckpt_dir")
            # Before the weak-step check: a changed train.steps moves the weak step too, and should be named as such.
            changed = check_resume_settings(saved, config, tc, latest)
            if weak_step is not None and weak_step <= latest and weak_step not in ckpt.manager.all_steps():
                moved = [f"{k} {a} -> {b}" for k, a, b in changed if k in ("train.steps", "sampler.guide_fraction")]
                why = (f"{' and '.join(moved)} moves it there, past this run's step {latest}" if moved else
                       "the run started with other settings")
                old = [k for k in kept if k != weak_step and k <= latest]
                hint = (f"sampler.guide_step={old[-1]} (the weak step this run kept)" if old else
                        f"sampler.guide_step=<a step it holds: {sorted(ckpt.manager.all_steps())}>")
                raise UserError(f"sampler.guidance=auto needs the EMA of step {weak_step}, which {tc.ckpt_dir} does "
                                f"not hold ({why}): add {hint}, or resume with sampler.guidance=cfg")
            state = sharding.place(ckpt.restore(state, it, latest), mesh)
            run_id = saved.get("run", {}).get("wandb_id")
            # The saved config records the settings in force from now on; the changes made on resume are kept with it.
            history = list(saved.get("run", {}).get("resume_changes", []))
            if changed:
                history.append({"step": latest, "changes": {k: [a, b] for k, a, b in changed}})
                if is_main:
                    print(f"note: train.resume_changes=true: continuing from step {latest} with changed settings "
                          f"({describe(changed)}); this is no longer the uninterrupted run", flush=True)
            if tc.stop_at_step is not None and int(tc.stop_at_step) <= latest < int(tc.steps):
                # Checked only after a step, it trained one more step and stopped again at every such resume.
                raise UserError(f"train.stop_at_step={int(tc.stop_at_step)} but {tc.ckpt_dir} is already at step "
                                f"{latest}: raise train.stop_at_step (or drop it) to train on")
            print(f"resumed from {tc.ckpt_dir} at step {latest}", flush=True)
        elif latest is not None:
            raise UserError(f"{tc.ckpt_dir} already holds checkpoints (latest step {latest}): resume with "
                            f"train.is_restore=true, or choose a new train.ckpt_dir")
        # W&B's start-up may fail (mode=online without a login): inside the try, so the checkpointer still closes.
        tracker = Tracker(cfg.wandb, config, run_id=run_id) if is_main else None
    except BaseException:
        ckpt.close()
        raise
    config["run"] = {"wandb_id": tracker.run_id if tracker else None, "kept_steps": list(kept)}
    if history:
        config["run"]["resume_changes"] = history

    step_fn = make_train_step(tc, optimizer, schedule, task.null_cond, task.conditioning, mesh=mesh)
    start, total = int(sharding.host_value(state.step)), int(tc.steps)
    sample_key = jax.random.PRNGKey(int(tc.seed) + 1)
    samples_dir = Path(tc.ckpt_dir) / "samples"

    def save(force=False):
        ckpt.save(state, it, config, force=force)

    grid_sampler = cfg.sampler   # autoguidance needs an earlier checkpoint: grids during training use plain guidance
    if cfg.sampler.get("guidance", "cfg") == "auto":
        grid_sampler = OmegaConf.merge(cfg.sampler, {"guidance": "cfg"})

    def sample_grid(step, final=False):
        """EMA sample grid; the final one autoguides (the weak model's checkpoint is complete once training ends).
        Returns (EMA, weak model or None) for the end-of-run evaluation."""
        ema = sharding.host_local(state.ema, mesh)  # every process calls this (a gather when there are several)
        # Every process too: Orbax's manager and restore synchronise all processes, so process 0 alone hung here
        # until JAX's shutdown barrier aborted the run (multi-process runs with the default autoguidance).
        weak = load_weak(tc.ckpt_dir, cfg.sampler, ema, tc) if final else None
        if weak is not None:   # restored as global arrays over every process's devices: host arrays, as the EMA
            weak = sharding.host_local(weak, mesh)
        if not is_main:
            return ema, None
        labels = task.grid_conds() if task.grid_conds else grid_labels(task.spec["num_classes"], per_class=8)
        imgs = generate(ema, task.spec, task.meta, labels, sample_key, grid_sampler if weak is None else cfg.sampler,
                        tc, weak=weak)
        grid = make_grid(imgs, nrow=8)
        samples_dir.mkdir(parents=True, exist_ok=True)
        save_png(grid, samples_dir / f"step{step:07d}.png", upscale=grid_upscale(imgs.shape[1]))
        names = task.meta["class_names"]   # (a required key; a hand-made set may list fewer names than classes)
        rows = task.grid_rows() if task.grid_rows else \
            [str(names[c]) if c < len(names) else f"class {c}" for c in np.asarray(labels)[::8]]
        write_text(samples_dir / "rows.txt", "".join(f"{i + 1}\t{r}\n" for i, r in enumerate(rows)))
        tracker.log_image(step, "samples/ema", grid, caption=f"EMA samples, step {step}; rows: " + " | ".join(rows))
        return ema, weak

    # ---- the loop ----
    bar = _progress(start, total, enabled=is_main and tc.progress)
    pending, t_last, n_last, compiled = [], time.perf_counter(), start, start > total
    if is_main and start < total:
        usual = "10-60 s" if jax.default_backend() == "cpu" else "1-3 min"
        print(f"compiling the train step (first step; usually {usual})...", flush=True)
    step = start
    # Non-finite steps: the per-step `skipped` flags are checked every min(log_every, max_bad_steps) steps and before
    # every save (one host sync each), so a streak of exactly max_bad_steps always stops the run.
    streak, unchecked = _host(state.bad_steps), []
    check_every = max(1, min(int(tc.log_every), int(tc.max_bad_steps)))
    debug_nan = {int(s) for s in (tc.get("debug_nan_steps") or ())}
    stop = StopFlag()
    try:
        while step < total and stop.signal is None:
            batch = sharding.global_batch(_next_batch(it, step, tc, debug_nan), mesh)
            state, metrics = step_fn(state, batch)
            pending.append(metrics)
            unchecked.append(metrics["skipped"])
            step += 1
            if not compiled:
                jax.block_until_ready(metrics["loss"])
                compiled, t_last, n_last = True, time.perf_counter(), step
                if is_main:
                    print(f"compiled; training from step {start} to {total}", flush=True)
            if step % tc.log_every == 0 or step == total:
                scalars = _summarise(pending, step, t_last, n_last, global_batch)
                pending, t_last, n_last = [], time.perf_counter(), step
                if is_main:
                    tracker.log(step, scalars, console=not tc.progress)
                    speed = {"img_s": f"{scalars['perf/img_per_s']:.0f}"} if "perf/img_per_s" in scalars else {}
                    bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", **speed)
            if step % check_every == 0 or step % tc.ckpt_every == 0 or step == total:  # before any save
                streak = _check_bad_steps(unchecked, streak, step, tc, ckpt)
                unchecked = []
            if step % tc.ckpt_every == 0 or step == weak_step:
                save()          # before the grid: a grid that fails must not cost the step's checkpoint
            if tc.sample_every and step % tc.sample_every == 0 and step < total:   # the final grid comes below
                try:
                    sample_grid(step)
                except UserError as err:   # a sampler setting that cannot work (a guidance scale that overflows):
                    if is_main:            # the training is fine; the final grid, after the last save, raises it
                        print(f"sample grid at step {step} skipped: {err}", flush=True)
            bar.update(1)
            if tc.stop_at_step is not None and step >= int(tc.stop_at_step) and step < total:
                stop.signal = f"train.stop_at_step={int(tc.stop_at_step)}"
        save()  # no-op when this step was just saved
    finally:
        try:
            bar.close()
            ckpt.close()  # waits for asynchronous saves: the last checkpoint is complete before we exit
        finally:   # only now: a SIGTERM while the last save completes must still let it complete
            stop.restore()
    if stop.signal is not None:
        print(f"stopped by {stop.signal} at step {step}; checkpoint saved in {tc.ckpt_dir}: resume with "
              f"train.is_restore=true", flush=True)
        if tracker:
            tracker.finish()
        return {"step": step, "stopped": stop.signal}

    result = {"step": step}
    # The last checkpoint is complete: a SIGTERM now (preemption in the final grid or evaluation) stops the run as a
    # Ctrl-C does, by a KeyboardInterrupt, so that W&B is closed with its history written. Its default action killed
    # the process with nothing flushed: a fresh run's whole W&B history was lost. A resume redoes grid and evaluation.
    term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        ema, weak = sample_grid(step, final=True)
        if is_main:
            if cfg.eval.at_end and task.evaluator is not None:
                result.update(evaluate(ema, task, cfg, int(cfg.eval.num_samples), step, weak))
            elif cfg.eval.at_end and task.final_eval is not None:
                result.update(task.final_eval(ema, step))
            if cfg.eval.at_end and (task.evaluator or task.final_eval):
                tracker.log(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
                tracker.summary(result)
    finally:
        signal.signal(signal.SIGTERM, term)
        if tracker is not None:
            tracker.finish()
    return result


def _kept_steps(tc, weak_step: int | None) -> tuple[int, ...]:
    """Steps kept whatever keep_ckpts says: this run's weak model (autoguidance) and, on resume, every weak model the
    run kept before. sampler.* may change on resume; a resume with sampler.guidance=cfg or another guide_fraction
    used to let Orbax delete the old weak step at the next save: the run's only half-way EMA, which sample.py's
    guidance=auto reads and no later training gives back."""
    kept = set() if weak_step is None else {weak_step}
    if tc.is_restore:
        try:
            saved, latest = read_config(tc.ckpt_dir)
        except UserError:          # said in one line by the resume checks that follow
            return tuple(sorted(kept))
        before = list(saved.get("run", {}).get("kept_steps", []))   # configs saved before this record: their own
        before.append(guide_step(saved.get("sampler", {}), OmegaConf.create(saved.get("train", {}))))
        kept |= {int(s) for s in before if s is not None and int(s) <= latest}
    return tuple(sorted(kept))


def _host(x) -> int:
    """A replicated integer scalar on this process (also when the array spans several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return int(np.asarray(x))


def _next_batch(it, step: int, tc, debug_nan: set):
    try:
        batch = next(it)
    except UserError as err:  # a bad record met mid-run, raised inside the Grain iterator
        raise UserError(f"{err} (at step {step + 1}; the checkpoints in {tc.ckpt_dir} are intact: fix or re-prepare "
                        f"the data set, then resume with train.is_restore=true)") from None
    # data.workers>0: Grain hands each batch over in shared memory, unlinked only when its array is deleted (by a
    # background thread). A private copy (0.4 MB for Fashion-MNIST) lets the block go at once; held to the end, the
    # last blocks were left to Python's resource_tracker, which warned about leaked shared_memory at every exit.
    batch = {k: np.array(v) if isinstance(v, np.ndarray) and type(v) is not np.ndarray else v
             for k, v in batch.items()}
    if step + 1 in debug_nan:  # train.debug_nan_steps (tests): a non-finite batch, as corrupt data would give
        batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
    return batch


def _check_bad_steps(flags: list, streak: int, step: int, tc, ckpt) -> int:
    """Carry the run of consecutive skipped (non-finite) steps over `flags` (steps step-len+1 .. step); stop the run
    when it reaches train.max_bad_steps. Skipped steps leave params, optimizer state and EMA unchanged."""
    limit, first = int(tc.max_bad_steps), step - len(flags) + 1
    for i, f in enumerate(flags):
        streak = streak + 1 if _host(f) else 0
        if streak >= limit:
            ckpt.manager.wait_until_finished()
            last = ckpt.latest_step()
            good = f"{Path(tc.ckpt_dir) / str(last)}" if last is not None else "none written yet"
            raise UserError(f"{limit} non-finite steps in a row (steps {first + i - limit + 1}-{first + i}, updates "
                            f"skipped): stopping; last good checkpoint: {good}; lower train.lr or check the data, then "
                            f"resume with train.is_restore=true")
    return streak


def evaluate(model, task: Task, cfg, n: int, step: int, weak=None) -> dict:
    """Class-balanced EMA samples scored by the project's classifier; results saved beside the checkpoints.
    weak: autoguidance's weak model (when cfg.sampler.guidance is auto)."""
    from training.sampling import balanced_labels

    evaluator = task.evaluator()
    labels = balanced_labels(n, task.spec["num_classes"])
    t0 = time.perf_counter()
    images = generate(model, task.spec, task.meta, labels, jax.random.PRNGKey(int(cfg.train.seed) + 2),
                      cfg.sampler, cfg.train, weak=weak)
    res = {k: (float(v) if isinstance(v, (float, np.floating)) else v)
           for k, v in evaluator.evaluate(images, labels).items()}
    res["sample_seconds"] = time.perf_counter() - t0
    Path(cfg.train.ckpt_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.train.ckpt_dir) / f"eval-step{step:07d}.json", res)
    print("evaluation: " + json.dumps(res), flush=True)
    return res


def _summarise(pending: list, step: int, t_last: float, n_last: int, global_batch: int) -> dict:
    stacked = jax.tree.map(sharding.host_value, pending)  # the one host sync per log interval
    mean = lambda k: float(np.mean([m[k] for m in stacked]))
    dt, steps = time.perf_counter() - t_last, step - n_last
    out = {"train/loss": mean("loss"), "train/grad_norm": mean("grad_norm"), "train/lr": float(stacked[-1]["lr"]),
           "train/skipped": int(sum(int(m["skipped"]) for m in stacked)), "perf/effective_batch": global_batch}
    if steps > 0:   # none timed when the compiling step is itself logged (log_every=1): it read 30x the real speed
        out.update({"perf/step_time_s": dt / steps, "perf/img_per_s": global_batch * steps / max(dt, 1e-9)})
    return out


class _NoBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress(start: int, total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout, mininterval=2.0)
