"""Orbax checkpoints: params, optimizer state, EMA, counters + PRNG key, the Grain iterator and the resolved config.

Layout: <ckpt_dir>/<step>/{params, opt_state, ema, train, data, config, checksums}/ written by one CheckpointManager;
a preserved step (autoguidance's weak model) sheds params and opt_state once newer steps follow it (thin_preserved).
Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint as the latest one; saves are asynchronous and `close()` waits for them before exit.
Items are restored into shape/dtype skeletons built from the same config, never unpickled. `checksums` holds a
32-bit sum of every array's bits (training/checksums.py), compared at restore: damaged array bytes that still decode
are refused in one line instead of resumed from.
"""

import gc
import json
import re
import shutil
from pathlib import Path

import equinox as eqx
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from training import checksums
from training.errors import (OTHER_VERSION, UserError, check_whole, check_writable_dir, first_line,
                             quiet_abandoned_reads, storage_reason)
from training.runlock import RunLock
from training.sharding import host_value
from training.state import TrainState

ITEMS = ("params", "opt_state", "ema", "train", "data", "config", "checksums")
SUMMED = ("params", "opt_state", "ema", "train")   # the array items `checksums` covers
THINNED = ("params", "opt_state")   # what a preserved step sheds once newer steps follow it (thin_preserved)
# Old checkpoints (beyond keep-last-N) are first *renamed* here by Orbax, then emptied by us. Deleting a step in place
# is not atomic: a kill -9 during Orbax's rmtree left a half-deleted `<step>/` that looked like foreign data to the
# next run (found by the kill matrix in tests/test_faults.py). A rename either happened or did not.
TRASH = ".deleted"


def _abstract(tree):
    # ShapeDtypeStructs that carry each template array's sharding: a checkpoint written on one mesh is restored
    # straight onto the template's mesh (another mesh shape, device count or process count).
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _arrays(tree):
    return eqx.filter(tree, eqx.is_array)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, *, create: bool = True, need_bytes: int = 0,
                 preserve: tuple[int, ...] = ()):
        """keep: the last `keep` steps stay; preserve: these steps stay too (autoguidance's weak model)."""
        check_whole("train.keep_ckpts", keep, 1, "the last N checkpoints are kept")   # Orbax: 0 deletes every one
        self.directory = Path(directory).absolute()
        self.keep, self.preserve = int(keep), tuple(int(s) for s in preserve)
        self.lock = RunLock(self.directory)
        if create:
            self.check_writable()
            self.check_contents()          # first: a refused foreign directory gets no lock file either
            if jax.process_index() == 0:   # the writer: one run per directory (training/runlock.py)
                self.lock.acquire()
        try:
            if create:
                self.check_space(need_bytes, int(keep) + 1 + len(preserve))  # before the manager exists
            policy = {"max_to_keep": int(keep)} if not preserve else {"preservation_policy": cm.AnyPreservationPolicy(
                [cm.LatestN(int(keep)), cm.CustomSteps([int(s) for s in preserve])])}
            options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=True, **policy,
                                                   cleanup_tmp_directories=False, todelete_subdir=TRASH)
            if create and jax.process_index() == 0:
                self.remove_partial_saves()   # safe: no other run holds the directory
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except BaseException:
            self.lock.release()
            raise

    def remove_partial_saves(self):
        """Delete what a killed save left behind (`<step>.orbax-checkpoint-tmp*`) and old steps waiting in TRASH,
        now and synchronously.

        Orbax can clean temporaries itself (cleanup_tmp_directories=True), but in a background thread that close()
        does not join: a run refused right after start-up then printed that thread's traceback at interpreter exit.
        """
        for p in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True)
        self.empty_trash()

    def empty_trash(self):
        """Remove the old steps Orbax renamed into TRASH. Only the children: Orbax may be renaming into the folder
        at this moment (its deletions run after an asynchronous save), and a kill here leaves them for next time."""
        if jax.process_index() != 0 or not (self.directory / TRASH).is_dir():
            return
        for p in (self.directory / TRASH).iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def check_writable(self):
        """Fail before training starts, not at the first save hours later."""
        check_writable_dir(self.directory, f"checkpoint directory {self.directory} is not writable",
                           "choose another with train.ckpt_dir=...")

    def check_contents(self):
        """Refuse a directory that holds something other than our checkpoints (a typo'd path, someone's files, a
        half-copied step): training would write into it and Orbax might mistake or clean up what is there."""
        foreign = []
        for p in sorted(self.directory.iterdir()):
            n = p.name
            if n.isdigit() and p.is_dir() and (p / "_CHECKPOINT_METADATA").is_file():
                continue                                    # a complete checkpoint
            if p.is_dir() and n.split(".")[0].isdigit() and ".orbax-checkpoint-tmp" in n:
                continue                                    # a save cut short (kill -9): Orbax cleans it up
            if n.startswith(".") or n in ("samples", "wandb") or n.startswith("eval-step") and n.endswith(EVAL_FILES):
                continue                                    # ours: sample grids, evaluations, W&B, probes
            foreign.append(n + ("/" if p.is_dir() else ""))
        if foreign and _is_step_dir(self.directory):
            raise UserError(f"checkpoint directory {self.directory} is one step of a run, not a run's folder: set "
                            f"train.ckpt_dir={self.directory.parent}")
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise UserError(f"checkpoint directory {self.directory} holds something that is not a checkpoint of this "
                            f"project ({shown}): move it away, or choose another train.ckpt_dir")

    def check_space(self, nbytes: int, most: int = 1):
        """Fail before training when the disk cannot hold even one checkpoint of `nbytes` (uncompressed arrays); warn
        when it cannot hold the `most` the run will have at once (keep_ckpts, one save in flight, the weak step): a
        big run would otherwise stop at its third or fourth save, hours in (intact, but stopped)."""
        free = shutil.disk_usage(self.directory).free
        if free < nbytes:
            raise UserError(f"checkpoint directory {self.directory} has {free / 2**20:.1f} MiB free but one checkpoint "
                            f"needs about {nbytes / 2**20:.1f} MiB: free disk space, or choose another train.ckpt_dir")
        held = len(step_numbers(self.directory))   # already on the disk
        if nbytes and free < (most - held) * nbytes and jax.process_index() == 0:
            size = (lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB")
            print(f"warning: {self.directory} has {size(free)} free, room for {free // nbytes} more "
                  f"checkpoint(s) of ~{size(nbytes)}, but this run holds up to {most} at once "
                  f"(train.keep_ckpts + one being written + autoguidance's weak step): it will stop at a save when "
                  "the disk fills; free space, or lower train.keep_ckpts", flush=True)

    def _storage_error(self, err: Exception) -> UserError | None:
        """A failed write (disk full, permissions) as a one-line UserError; None for anything else (a bug)."""
        reason = storage_reason(err)
        if reason is None and not isinstance(err, OSError):
            return None
        reason = reason or getattr(err, "strerror", None) or type(err).__name__
        complete = step_numbers(self.directory, "_CHECKPOINT_METADATA")
        last = f"the last complete checkpoint is step {complete[-1]}" if complete else "no checkpoint was completed"
        return UserError(f"writing a checkpoint to {self.directory} failed ({reason}); {last}, intact: free disk "
                         f"space (or fix the directory), then resume with train.is_restore=true")

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iter, config: dict, *, force: bool = False) -> bool:
        step = int(host_value(state.step))  # works when the step counter spans several processes
        train = {"step": state.step, "key": state.key, "bad_steps": state.bad_steps, "skipped": state.skipped}
        arrays = {"params": _arrays(state.params), "opt_state": _arrays(state.opt_state), "ema": _arrays(state.ema),
                  "train": train}
        args = ocp.args.Composite(
            **{name: ocp.args.StandardSave(tree) for name, tree in arrays.items()},
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config),
            checksums=ocp.args.JsonSave({**checksums.FORMAT, "items": checksums.checksums(arrays)}),
        )
        self.empty_trash()   # steps the previous save's retention moved there
        try:  # also waits for the previous asynchronous save, so a failed write surfaces here or in close()
            saved = self.manager.save(step, args=args, force=force)
        except Exception as err:
            user = self._storage_error(err)
            if user is None:
                raise
            raise user from None
        self.thin_preserved()
        return saved

    def thin_preserved(self):
        """A preserved step (autoguidance's weak model) keeps only what sampling reads once `keep` complete steps
        follow it: its EMA, counters, config and checksums. Its params and optimizer state go (XL/2: 8.1 GB -> 2.7
        GB); a resume never needs them, since `keep` newer whole steps are there. Each is moved into TRASH (a rename)
        and then deleted: a kill between the two moves leaves the rest for the next save to finish. Called after
        each save and at close (the last save may be the one that completes the `keep` steps)."""
        if jax.process_index() != 0 or not self.preserve:
            return
        # complete steps a run can resume from (a thinned one cannot)
        whole = step_numbers(self.directory, "params", "_CHECKPOINT_METADATA")
        for step in self.preserve:
            d = self.directory / str(step)
            if sum(s > step for s in whole) >= self.keep and any((d / item).is_dir() for item in THINNED):
                (self.directory / TRASH).mkdir(exist_ok=True)
                for item in THINNED:
                    if (d / item).is_dir():
                        (d / item).rename(self.directory / TRASH / f"{step}-{item}")
        self.empty_trash()

    def is_thinned(self, step: int) -> bool:
        d = self.directory / str(step)
        return not (d / "params").is_dir() and (d / "ema").is_dir()

    def restore(self, template: TrainState, data_iter, step: int | None = None) -> TrainState:
        """Restore into `template` (a freshly initialised state of the same config) and the given iterator."""
        step = self.latest_step() if step is None else step
        if self.is_thinned(step):
            raise UserError(f"checkpoint {self.directory / str(step)} holds only its EMA (autoguidance's weak model, "
                            f"thinned once newer steps followed it): a run cannot resume from it; restore the newer "
                            f"steps into {self.directory}, or start a new run")
        train_t = {"step": template.step, "key": template.key, "bad_steps": template.bad_steps,
                   "skipped": template.skipped}
        r = self._restore(step, ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(_arrays(template.params))),
            opt_state=ocp.args.StandardRestore(_abstract(_arrays(template.opt_state))),
            ema=ocp.args.StandardRestore(_abstract(_arrays(template.ema))),
            train=ocp.args.StandardRestore(_abstract(train_t)),
            **self._data_restore(step, data_iter), **self._sums_restore(step),
        ))
        self._check_sums(step, r, SUMMED)
        self._check_finite(step, {k: r[k] for k in ("params", "opt_state", "ema")})
        combine = lambda arrays, like: eqx.combine(arrays, eqx.filter(like, eqx.is_array, inverse=True))
        t = r["train"]
        return TrainState(step=jnp.asarray(t["step"]), params=combine(r["params"], template.params),
                          opt_state=combine(r["opt_state"], template.opt_state),
                          ema=combine(r["ema"], template.ema), key=jnp.asarray(t["key"]),
                          bad_steps=jnp.asarray(t["bad_steps"]), skipped=jnp.asarray(t["skipped"]))

    def _restore(self, step: int, args):
        """manager.restore, with a checkpoint whose tree this code does not build named in one line. The model is
        rebuilt from the saved config, so a differing tree means another version of the code wrote it (a module
        field added or removed), not a user's override. Any other failure to read the files (damaged or truncated
        array files, a missing item: TensorStore's and Orbax's errors are of many types) is a damaged checkpoint:
        one line naming it and the previous step, and nothing is deleted."""
        quiet_abandoned_reads()
        try:
            return self.manager.restore(step, args=args)
        except UserError:
            raise
        except (TypeError, AttributeError, NameError, ImportError):
            raise   # our bug, not the files
        except Exception as err:
            if "tree structures do not match" not in str(err):
                gc.collect()   # the abandoned reads' coroutines now, under the filter, not at a later test's end
                raise self._damaged(step, err) from err
            named = _listed(re.findall(r"^(\S+):$", str(err), flags=re.M))
            raise UserError(f"checkpoint {self.directory / str(step)} holds another parameter tree than this code "
                            f"builds from its saved config (differs at: {named}): {OTHER_VERSION}") from None

    def _sums_restore(self, step: int) -> dict:
        """The checksums item to read with the arrays; checkpoints written before it existed have none."""
        return {"checksums": ocp.args.JsonRestore()} if (self.directory / str(step) / "checksums").is_dir() else {}

    def _check_sums(self, step: int, restored, names) -> None:
        """Every restored array must have the checksum it was saved with: bytes damaged on disk mostly still decode
        (to other finite numbers), and only this tells. One jitted pass and one host transfer, at restore only."""
        if "checksums" not in restored:
            return
        saved = restored["checksums"]
        if not isinstance(saved, dict) or saved.get("version") != checksums.FORMAT["version"] \
                or not isinstance(saved.get("items"), dict):
            raise self._damaged(step, ValueError("its checksums record is unreadable"))
        bad = checksums.mismatches({k: restored[k] for k in names}, saved["items"])
        if bad:
            raise self._damaged(step, ValueError(f"checksum mismatch in {_listed(bad)}"))

    def _check_finite(self, step: int, items: dict) -> None:
        """A saved state is always finite (non-finite updates are skipped, never saved), so a NaN or Inf read back
        means damaged array bytes that decoded without an error, in a checkpoint too old to hold checksums (or a
        state saved non-finite by hand): refuse them now rather than resume into NaN weights. One reduction per leaf
        and one host transfer, at restore only."""
        leaves = [(k, a) for name, tree in items.items() for k, a in checksums.named_leaves(tree, name)
                  if jnp.issubdtype(a.dtype, jnp.inexact)]
        if not leaves:
            return
        ok = host_value(jnp.stack([jnp.all(jnp.isfinite(a)) for _, a in leaves]))
        bad = [name for (name, _), good in zip(leaves, ok) if not good]
        if bad:
            raise self._damaged(step, ValueError(f"non-finite values in {_listed(bad)}"))

    def _damaged(self, step: int, err: Exception) -> UserError:
        if not (self.directory / str(step)).is_dir():   # not damaged: gone, pruned by the run writing there
            if not self.directory.is_dir():
                return UserError(f"checkpoint directory {self.directory} was removed while step {step} was read")
            # (the manager's list is cached: it names the gone)
            kept = [s for s in step_numbers(self.directory) if not self.is_thinned(s)]
            return UserError(f"checkpoint {self.directory / str(step)} was removed while it was read (a run writing "
                             f"{self.directory} keeps only its last train.keep_ckpts steps): run again"
                             + (f"; it holds steps {kept} now" if kept else ""))
        chain, e = [], err
        while e is not None and len(chain) < 20:
            chain.append(e)
            e = e.__cause__ or e.__context__
        # TensorStore's own message ("OUT_OF_RANGE: Error reading ...") sits deeper than Orbax's wrapper around it.
        reason = next((first_line(x) for x in chain if re.match(r"[A-Z_]{4,}: ", first_line(x))), first_line(err))
        earlier = [s for s in self.manager.all_steps() if s < step and not self.is_thinned(s)]
        then = (f"the latest checkpoint is then step {max(earlier)}" if earlier else
                "there is no earlier checkpoint: a new run starts without train.is_restore")
        return UserError(f"checkpoint {self.directory / str(step)} cannot be read, its files are damaged ({reason}): "
                         f"move that directory out of {self.directory} (nothing was deleted) and run again; {then}")

    def _data_restore(self, step: int, data_iter) -> dict:
        """Grain keeps one iterator state per process; with another process count the data order cannot resume."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = self.directory / str(step) / "data" / name
        if path.is_file():
            self._check_data_state(step, path, data_iter)
            return {"data": grain.checkpoint.CheckpointRestore(data_iter)}
        if jax.process_index() == 0:
            print(f"note: checkpoint step {step} was written by a different number of processes: model, optimizer "
                  f"and counters are restored, the data iterator starts a fresh pass", flush=True)
        return {}

    def _check_data_state(self, step: int, path: Path, data_iter) -> None:
        """The saved iterator state must have this iterator's form: with another data.workers (0 vs > 0) Grain's
        set_state fails with a KeyError deep inside; say what to do instead. (The loop refuses a changed data.workers
        first; this guards the restore itself.)"""
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise self._damaged(step, err) from err
        now = data_iter.get_state()
        if isinstance(saved, dict) and isinstance(now, dict) and set(saved) != set(now):
            raise UserError(f"the data loader's saved position in {path.parent} does not fit this data loader (it was "
                            f"saved with another data.workers setting): resume with the data.workers the run was "
                            f"trained with")

    def restore_weights(self, template_model, step: int | None = None, item: str = "ema"):
        """One saved set of weights of a step as a model like `template_model`: the EMA (what sampling uses) by
        default, item="params" for the raw training weights."""
        step = self.latest_step() if step is None else step
        r = self._restore(step, ocp.args.Composite(
            **{item: ocp.args.StandardRestore(_abstract(_arrays(template_model)))}, **self._sums_restore(step)))
        self._check_sums(step, r, (item,))
        self._check_finite(step, {item: r[item]})
        return eqx.combine(r[item], eqx.filter(template_model, eqx.is_array, inverse=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Wait for pending asynchronous saves, then release the manager (always call before exit)."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
            self.thin_preserved()
            self.empty_trash()
        except Exception as err:
            user = self._storage_error(err)
            if user is None:
                raise
            raise user from None
        finally:
            self.lock.release()


def _listed(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


EVAL_FILES = (".json", ".png")   # eval-step*.json (scores), eval-step*.png (stage 2's caption grid)


def step_numbers(directory, *holding: str) -> list[int]:
    """The steps saved in a run's folder (its digit-named folders), in order; only those holding every `holding`
    entry (a complete save: "_CHECKPOINT_METADATA"; one a run can resume from: also "params")."""
    return sorted(int(p.name) for p in Path(directory).iterdir()   # ASCII digits: "²".isdigit(), int("²") fails
                  if p.name.isascii() and p.name.isdigit() and p.is_dir() and all((p / h).exists() for h in holding))


def _is_step_dir(path: Path) -> bool:
    """One step of a run (`<ckpt_dir>/<step>/`), which a user may pass where the run's folder belongs."""
    return path.name.isdigit() and path.is_dir() and ((path / "_CHECKPOINT_METADATA").is_file()
                                                      or (path / "config").is_dir())


def read_config(ckpt_dir: str, step: int | None = None, keys=("ckpt_dir", "step")) -> tuple[dict, int]:
    """The resolved config saved with a checkpoint (for sample.py and resume checks), without loading arrays. `keys`:
    the run directory's and the step's keys as the user typed them (sample.py's guide_ckpt_dir / guide_step), named
    in every refusal."""
    key, step_key = keys
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise UserError(f"{key}={path}: no checkpoint directory there: train first, or pass {key}=<dir of a run>")
    steps = step_numbers(path, "config")
    if not steps:
        if _is_step_dir(path):
            raise UserError(f"{key}={path} is one step of a run: pass the run's folder, {path.parent}, and "
                            f"{step_key}={path.name}")
        raise UserError(f"{key}={path} holds no checkpoint (no <step>/config inside): pass the train.ckpt_dir of a "
                        "run")
    if step is not None and int(step) not in steps:
        raise UserError(f"{key}={path} holds no checkpoint of step {step}: it holds steps {steps} ({step_key}=null: "
                        "the latest)")
    step = steps[-1] if step is None else int(step)
    # Orbax's JsonSave writes config/metadata next to commit_success.txt; directory listing order differs between
    # file systems (tmpfs lists commit_success.txt first), so name the file instead of taking the first one.
    files = [path / str(step) / "config" / "metadata"]
    try:
        return json.loads(next(f for f in files if f.is_file()).read_text()), step
    except (StopIteration, json.JSONDecodeError, OSError) as err:
        raise UserError(f"checkpoint {path / str(step)} has an unreadable config: it is not one of ours") from err
