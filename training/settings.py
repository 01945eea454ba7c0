"""Checks of a run's settings: at start (cadences and limits) and on resume (the same model, and no override that
changes the run's math or data order: a resumed run must be the uninterrupted one, or say it is not)."""

import json

from models import ARCH_KEYS
from training.errors import UserError, check_whole


def check_same_model(saved: dict, spec: dict, ckpt_dir: str) -> None:
    old = saved.get("model_spec", {})
    diff = [k for k in ARCH_KEYS if old.get(k) != spec.get(k)]
    if diff:
        pairs = ", ".join(f"{k}: checkpoint {old.get(k)!r} vs now {spec.get(k)!r}" for k in diff)
        # the run's own values to paste: model keys as model.<key>=..., the data-made ones (shape, classes, text
        # features) by the data set the run saw
        own = [f"model.{k}={_show(old.get(k))}" for k in diff if k in (saved.get("model") or {})]
        data = (saved.get("data") or {}).get("name")
        fix = f"the run's own {' '.join(own)}" if own else ""
        if data and len(own) < len(diff):
            fix += f", on the data set it saw (data.name={data})" if fix else f"the data set it saw (data.name={data})"
        raise UserError(f"the checkpoint in {ckpt_dir} was written by a different model ({pairs}): resume with "
                        f"{fix or 'the same model and data overrides'}, or use another train.ckpt_dir")


# Keys a resume may change freely: where and how often the run logs, samples and saves, how it is tracked, sampled,
# evaluated and spread over devices, where the data and the weights it started from live, and how the model is computed
# (not what it computes). Every other key (train.*, optim.*, data.*, new keys too) shapes the run's math or data order
# and must match the checkpoint's saved config, or the resumed run is not the uninterrupted one. The device layout
# (mesh.*, distributed.*) and model.scan_blocks / remat / attention_impl keep the function but not its rounding: a
# resume that changes them continues the same run to within float error (~1e-7), not bit for bit.
FREE_ON_RESUME = frozenset({
    "train.log_every", "train.sample_every", "train.ckpt_every", "train.keep_ckpts", "train.ckpt_dir", "train.progress",
    "train.stop_at_step", "train.max_bad_steps", "train.is_restore", "train.debug_nan_steps", "train.resume_changes",
    "train.init_from", "train.init_fold_t",   # stage 2: how the initial weights were made; the restore replaces them
    "data.root", "data.text_encoder_path",   # where files live; a captioned folder set's sources too (its
    "data.folder", "data.captions_file",     # captions' hash and the data identity guard what they hold)
    "model.name", "model.scan_blocks", "model.remat", "model.attention_impl",   # how, not what (models.SPEC_KEYS)
})
FREE_GROUPS = ("wandb", "sampler", "eval", "mesh", "distributed")
NOT_SETTINGS = ("model_spec", "data_identity", "run")   # added by run() and checked on their own
# ...and keys that cannot change even with train.resume_changes=true: the saved data-loader state depends on them.
NEVER_ON_RESUME = {"data.workers": "the data loader's saved position is in a form that depends on it"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v) -> str:
    """A value as it would be written as an override."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show(x) for x in v) + "]"
    return str(v)


def settings_changed(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every setting that shapes the run's math or data order and differs from the
    checkpoint's saved config. A key the saved config lacks (written by older code) or the new one lacks (removed
    since) is unknown, not a change."""
    old, new = _flat({k: v for k, v in saved.items() if k not in NOT_SETTINGS}), \
        _flat({k: v for k, v in now.items() if k not in NOT_SETTINGS})
    return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and k not in FREE_ON_RESUME and k.split(".")[0] not in FREE_GROUPS]


def describe(changed) -> str:
    """settings_changed's list as `key: saved X -> now Y; ...`."""
    return "; ".join(f"{k}: saved {_show(a)} -> now {_show(b)}" for k, a, b in changed)


def check_resume_settings(saved: dict, config: dict, tc, step: int) -> list[tuple[str, object, object]]:
    """Refuse a resume whose overrides change the run (one line naming each key); with train.resume_changes=true
    allow them (returned, to be recorded), except those NEVER_ON_RESUME names."""
    changed = settings_changed(saved, config)
    if not changed:
        return []
    # The run's own values as overrides: a checkpoint saved before a default changed resumes with them pasted in.
    own = " ".join(f"{k}={_show(a)}" for k, a, _ in changed)
    head = (f"the checkpoint in {tc.ckpt_dir} (step {step}) was trained with other settings ({describe(changed)}): "
            f"resume with the run's own values ({own}: an exact resume continues with them)")
    never = [k for k, _, _ in changed if k in NEVER_ON_RESUME]
    if never:
        raise UserError(f"{head} ({', '.join(never)} cannot change on resume, even with train.resume_changes=true: "
                        + "; ".join(NEVER_ON_RESUME[k] for k in never) + ")")
    if not tc.get("resume_changes", False):
        raise UserError(f"{head}, or add train.resume_changes=true to go on with the new ones (the result is then not "
                        f"the uninterrupted run's)")
    return changed


def check_train_settings(tc) -> None:
    """Cadences and limits that would divide by zero, delete every checkpoint or stop a healthy run: one line now."""
    rules = {"log_every": (1, "steps between logged metrics"), "ckpt_every": (1, "steps between checkpoints"),
             "keep_ckpts": (1, "the last N checkpoints are kept"),
             "max_bad_steps": (1, "non-finite steps in a row that stop the run"),
             "sample_every": (0, "steps between sample grids; 0: none during training")}
    for key, (minimum, meaning) in rules.items():
        check_whole(f"train.{key}", tc.get(key), minimum, meaning)
