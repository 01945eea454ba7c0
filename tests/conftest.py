"""Test set-up: CPU, fp32, deterministic; paths so tests import the project from a clean clone."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# The tiny presets spend most of their test time compiling, not computing: XLA:CPU's new fusion emitters and
# LLVM's -O2 took 12 of a tiny run's 35 s in compiling its train step alone on a 2-core Zen 3 (log, tenth session).
# The cheapest settings compile it in 2.7 s with the same losses; users' runs keep XLA's defaults. Child processes
# (the training scripts the tests start) inherit this. A user's own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
# Identical train steps compile once per test session (resume and end-to-end tests build the same step again).
_CACHE = Path(os.environ.get("PYTEST_JAX_CACHE", "/tmp/dit-pytest-jax-cache-%d" % os.getuid()))
if os.environ.get("PYTEST_XDIST_WORKER"):   # pytest -n N: one cache per worker (the cache has no lock by default)
    _CACHE = _CACHE / os.environ["PYTEST_XDIST_WORKER"]
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
         "sampler.steps": 4, "sampler.guidance": "cfg",   # no extra autoguidance checkpoint (tests count steps)
         "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def restore_final(ckpt_dir, root, step=None):
    """The complete train state and the next batch of a run's latest (or given) checkpoint, restored into a fresh
    template built from the config saved with it (seed, batch, optimizer, data set and flip all read from there)."""
    from omegaconf import OmegaConf

    from data.loader import make_iterator
    from data.meta import load_meta
    from models import build_model
    from training.checkpoint import Checkpointer, read_config
    from training.optim import make_optimizer
    from training.state import init_state, split_keys

    saved, step = read_config(ckpt_dir, step)
    tc = OmegaConf.create(saved["train"])
    model_key, train_key = split_keys(int(tc.seed))
    opt, _ = make_optimizer(tc, OmegaConf.create(saved["optim"]))
    template = init_state(build_model(saved["model_spec"], key=model_key), opt, train_key)
    data_dir = f"{root}/{saved['data']['name']}"
    it = make_iterator(load_meta(data_dir), data_dir, "train", batch_size=int(tc.batch_size) * int(tc.grad_accum),
                       seed=int(tc.seed), hflip=bool(saved["data"].get("hflip", False)))
    with Checkpointer(ckpt_dir, create=False) as ck:
        state = ck.restore(template, it, step)
    return state, next(it)


def assert_same_state(a, b):
    """Bitwise equality of two restored (state, next batch) pairs."""
    import jax
    import numpy as np

    (sa, ba), (sb, bb) = a, b
    assert int(sa.step) == int(sb.step)
    for name in ("params", "ema", "opt_state", "key", "bad_steps", "skipped"):
        la, lb = jax.tree.leaves(getattr(sa, name)), jax.tree.leaves(getattr(sb, name))
        assert len(la) == len(lb) > 0, name
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    for k in ba:
        np.testing.assert_array_equal(ba[k], bb[k], err_msg=f"next batch {k}")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """A tiny random-weight diffusers VAE saved locally and loaded offline (the latent encode's tests)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from data.vae import load_vae
    from test_vae import make_tiny_vae

    return load_vae(make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny"))


@pytest.fixture(scope="session")
def minilm():
    """The MiniLM text encoder (ships offline in a package), loaded once for every test that encodes captions."""
    from data.text import get_encoder

    return get_encoder("minilm")
