"""Sets of many shards: Grain keeps every shard it has read from open, so the open-files limit bounds the shards."""

import subprocess
import sys

import numpy as np

from conftest import ROOT
from data.prepare import prepare_arrays


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_more_shards_than_open_files_is_one_line_naming_the_limit(tmp_path):
    """Past the limit, reading failed with "the shard is corrupt, re-prepare the data set": hours of re-encoding
    for a limit the user can raise."""
    x = np.zeros((60, 2, 2, 1), np.uint8)
    prepare_arrays(tmp_path, "many", {"train": (x, np.zeros(60, int))}, ["a"], "t", num_shards={"train": 60})
    p = _python(f"""
import os, resource
from data.loader import make_iterator
from data.meta import load_meta
from training.errors import UserError
meta = load_meta({str(tmp_path)!r})
it = make_iterator(meta, {str(tmp_path)!r}, "train", batch_size=1, seed=0, shuffle=False, threads=1)
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
try:
    for _ in range(60):
        next(it)
    print("read all")
except UserError as e:
    print("error:", e)
""")
    out = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-2000:]
    assert out.startswith("error: cannot open ") and "too many open files (60 shards" in out, out
    assert "ulimit -n 65536" in out and "corrupt" not in out, out


def test_the_scripts_raise_the_soft_open_files_limit(tmp_path):
    """A script's main, started under `ulimit -Sn 256`, runs with the soft limit raised (as cli.main does for the
    script being run)."""
    import os
    import resource

    code = ("import resource\nfrom training import cli\n"
            "def main(cfg): print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
            "cli.main('config', main)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(["bash", "-c", f'ulimit -Sn 256 && exec "{sys.executable}" -c "$0" train.steps=7', code],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert p.returncode == 0 and p.stdout.split() == [str(want)], p.stdout + p.stderr[-2000:]
