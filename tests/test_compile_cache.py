"""The scripts keep compiled programs between runs (training.cli.use_compile_cache): a resumed or repeated run loads
its train step instead of compiling it again."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_overrides
from training import cli


@pytest.mark.parametrize("environ, expected", [
    ({"JAX_COMPILATION_CACHE_DIR": "/jax", "DIT_COMPILE_CACHE": "/ours"}, None),   # JAX's own setting: JAX's business
    ({"DIT_COMPILE_CACHE": "/ours", "XDG_CACHE_HOME": "/xdg"}, "/ours"),
    ({"DIT_COMPILE_CACHE": "off"}, None),
    ({"DIT_COMPILE_CACHE": ""}, None),
    ({"XDG_CACHE_HOME": "/xdg", "HOME": "/home/u"}, "/xdg/flow-dit/jax"),
    ({"HOME": "/home/u"}, "/home/u/.cache/flow-dit/jax"),
])
def test_compile_cache_dir_follows_the_environment(environ, expected, monkeypatch):
    monkeypatch.setenv("HOME", environ.get("HOME", "/home/u"))   # expanduser reads the process's own HOME
    assert cli.compile_cache_dir(environ) == expected


def train(digits_root, ckpt, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "DIT_COMPILE_CACHE")}
    env.update(JAX_LOG_COMPILES="1", **env_extra)   # JAX logs cache hits as warnings
    p = subprocess.run([sys.executable, "train_stage1.py", *tiny_overrides(digits_root, str(ckpt), steps=4)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def test_a_second_run_loads_its_train_step_from_the_cache(digits_root, tmp_path):
    xdg, hit = str(tmp_path / "xdg"), "Persistent compilation cache hit for 'jit_train_step'"
    grid_hit = "Persistent compilation cache hit for 'jit_run'"   # the final grid's sampler (training.sampling)
    cache = tmp_path / "xdg" / "flow-dit" / "jax"   # the default place, under $XDG_CACHE_HOME
    steps = lambda: sorted(p.name for p in cache.iterdir() if p.name.startswith(("jit_train_step", "jit_run")))
    first = train(digits_root, tmp_path / "a", XDG_CACHE_HOME=xdg)
    entries = steps()
    assert len(entries) == 4 and hit not in first.stderr          # written by the first run (program + atime) ...
    second = train(digits_root, tmp_path / "b", XDG_CACHE_HOME=xdg)
    assert hit in second.stderr and grid_hit in second.stderr     # ... loaded by the second, not compiled again
    assert steps() == entries
    losses = lambda p: [l.split("perf/")[0] for l in p.stdout.splitlines() if "train/loss" in l]
    assert losses(second) == losses(first) != []
    off = train(digits_root, tmp_path / "c", XDG_CACHE_HOME=str(tmp_path / "xdg_off"), DIT_COMPILE_CACHE="off")
    assert hit not in off.stderr and not (tmp_path / "xdg_off").exists()
