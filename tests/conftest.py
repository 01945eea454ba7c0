"""Test set-up: CPU, fp32, deterministic; paths so tests import the project from a clean clone."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Identical train steps compile once per test session (resume and end-to-end tests build the same step again).
_CACHE = Path(os.environ.get("PYTEST_JAX_CACHE", "/tmp/dit-pytest-jax-cache-%d" % os.getuid()))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain's multiprocessing reads absl flags; pytest's argv is not theirs to parse

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """Built-in digits prepared once per test session (real ArrayRecord shards + meta.json)."""
    from data.prepare import ensure_prepared

    root = tmp_path_factory.mktemp("data")
    ensure_prepared("digits", str(root))
    return str(root)


def tiny_overrides(root: str, ckpt_dir: str, steps: int = 8, **extra) -> list[str]:
    """A whole run in seconds: digits, tiny model, no W&B, no progress bar, no end-of-run evaluation."""
    o = {"data": "digits", "model": "tiny", "data.root": root, "train.ckpt_dir": ckpt_dir, "train.steps": steps,
         "train.batch_size": 32, "train.log_every": 4, "train.ckpt_every": 4, "train.sample_every": 0,
         "train.progress": False, "wandb.mode": "disabled", "eval.at_end": False, "optim.warmup_steps": 2,
         "sampler.steps": 4, "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def restore_final(ckpt_dir: str, config_name: str, data_dir: str, hflip: bool = False):
    """The latest checkpoint of a run restored into a fresh state of its saved config, plus the next data batch."""
    from data.loader import make_iterator
    from data.meta import load_meta
    from models import build_model
    from training.checkpoint import Checkpointer, read_config
    from training.cli import compose
    from training.optim import make_optimizer
    from training.state import init_state, split_keys

    saved, step = read_config(ckpt_dir)
    cfg = compose(config_name, [])
    cfg.train.lr, cfg.train.steps = saved["train"]["lr"], saved["train"]["steps"]
    model_key, train_key = split_keys(0)
    opt, _ = make_optimizer(cfg.train, cfg.optim)
    template = init_state(build_model(saved["model_spec"], key=model_key), opt, train_key)
    it = make_iterator(load_meta(data_dir), data_dir, "train", batch_size=32, seed=0, hflip=hflip)
    ck = Checkpointer(ckpt_dir, create=False)
    state = ck.restore(template, it, step)
    ck.close()
    return state, next(it)
