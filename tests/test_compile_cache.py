"""Compiled programs are reused: within a process, the sampler per setting (training.sampling._chunk_sampler); between
runs, the train step and the samplers through JAX's persistent cache (training.cli.use_compile_cache)."""

import jax
import numpy as np
import pytest

from conftest import tiny_overrides
from faults_helpers import run_script
from test_sampling import GaussianShift, sampler_cfg
from training import cli
from training.sampling import sample


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
    """A tiny run (faults_helpers.run_script) with the tests' own cache out (JAX reads an empty dir as none) and JAX
    logging its cache hits as warnings."""
    rc, s = run_script(tiny_overrides(digits_root, str(ckpt), steps=4),
                       env_extra={"JAX_COMPILATION_CACHE_DIR": "", "JAX_LOG_COMPILES": "1", **env_extra})
    assert rc == 0, s.output()
    return s


def test_a_second_run_loads_its_train_step_from_the_cache(digits_root, tmp_path, monkeypatch):
    monkeypatch.delenv("DIT_COMPILE_CACHE", raising=False)   # the default place, whatever the caller set
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
    losses = lambda p: [l.split("perf/")[0] for l in p.lines if "train/loss" in l]
    assert losses(second) == losses(first) != []
    off = train(digits_root, tmp_path / "c", XDG_CACHE_HOME=str(tmp_path / "xdg_off"), DIT_COMPILE_CACHE="off")
    assert hit not in off.stderr and not (tmp_path / "xdg_off").exists()


def test_a_damaged_cache_entry_is_rewritten_not_warned_about_at_every_start(digits_root, tmp_path):
    """JAX writes an entry in place and never replaces an existing key: a run killed mid-write left a truncated entry
    that warned and recompiled at every later start. It is now deleted when it fails to load, so the compile that
    follows writes it afresh; and an entry whose access-time file is missing (killed between JAX's two writes, which
    made every later cache write fail in JAX's size accounting) gets one at start."""
    xdg, cache = str(tmp_path / "xdg"), tmp_path / "xdg" / "flow-dit" / "jax"
    bad = "Error reading persistent compilation cache entry"
    hit = "Persistent compilation cache hit for 'jit_train_step'"
    train(digits_root, tmp_path / "a", XDG_CACHE_HOME=xdg)
    step_entry = next(cache.glob("jit_train_step*-cache"))
    whole = step_entry.read_bytes()
    step_entry.write_bytes(whole[:len(whole) // 2])                 # what a kill mid-write leaves
    orphan = next(cache.glob("jit_run*-atime"))
    orphan.unlink()                                                 # what a kill between the two writes leaves
    healed = train(digits_root, tmp_path / "b", XDG_CACHE_HOME=xdg)
    assert bad in healed.stderr and hit not in healed.stderr        # compiled around it once ...
    assert len(step_entry.read_bytes()) > len(whole) // 2 and orphan.exists()
    again = train(digits_root, tmp_path / "c", XDG_CACHE_HOME=xdg)
    assert bad not in again.stderr and hit in again.stderr          # ... and loaded from then on


def test_an_entry_without_its_access_time_gets_one_so_jax_can_size_the_cache(tmp_path):
    from jax._src import lru_cache

    (tmp_path / "k1-cache").write_bytes(b"x" * 10)                  # JAX killed between its two writes
    (tmp_path / "k2-cache").write_bytes(b"y" * 10)
    (tmp_path / "k2-atime").write_bytes((5).to_bytes(8, "little"))
    with pytest.raises(FileNotFoundError):   # why: JAX's size accounting reads every entry's access time
        lru_cache.LRUCache(str(tmp_path), max_size=25).put("k0", b"w" * 10)
    cli.mend_compile_cache(str(tmp_path))
    assert (tmp_path / "k1-atime").exists() and (tmp_path / "k2-atime").read_bytes() == (5).to_bytes(8, "little")
    lru_cache.LRUCache(str(tmp_path), max_size=25).put("k3", b"z" * 10)   # the put that raised above now works
    assert sorted(p.name for p in tmp_path.glob("*-cache")) == ["k2-cache", "k3-cache"]   # the mended one went first


def test_a_repeated_request_reuses_the_compiled_sampler():
    """Each grid during training used to trace and compile the sampler again (3-11 s per grid on 2 CPU cores): the
    compiled chunk sampler is now kept per setting, and a changed setting still gets its own."""
    traces = []

    class CountingShift(GaussianShift):   # Python runs the body once per trace, never when a compiled call runs
        def __call__(self, x, t, y):
            traces.append(1)
            return super().__call__(x, t, y)

    model, labels = CountingShift(), np.array([0, 1, 2], np.int32)
    run = lambda **kw: sample(model, labels, jax.random.PRNGKey(0), null_cond=9, shape=(2,),
                              sampler_cfg=sampler_cfg(**{"steps": 4, "cfg_scale": 2.0, **kw}))
    first = run()
    traced = len(traces)
    assert traced > 0
    np.testing.assert_array_equal(run(), first)
    assert len(traces) == traced          # the second request ran the compiled function
    other = run(cfg_scale=1.0)            # a setting is part of what is compiled
    assert len(traces) > traced and not np.allclose(other, first)
