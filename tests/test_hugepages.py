"""The entry scripts re-exec once with glibc's malloc on transparent huge pages (training/cli.py): when, and that
the real re-exec keeps the command line and happens only once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("environ, thp, glibc, expected", [
    ({}, "madvise", (2, 36), "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 36),
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),              # the user's tunables are kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), None),  # the user's opt-out (or our own exec)
    ({}, "always", (2, 36), None),                                       # every large mapping is already huge
    ({}, "never", (2, 36), None),                                        # none can be
    ({}, None, (2, 36), None),                                           # no THP in this kernel (or not Linux)
    ({}, "madvise", (2, 34), None),                                      # glibc before the tunable existed
    ({}, "madvise", None, None),                                         # musl and others
])
def test_huge_pages_env_decides_when_to_reexec(environ, thp, glibc, expected):
    env = cli.huge_pages_env({"PATH": "/bin", **environ}, thp, glibc)
    if expected is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == expected and env["PATH"] == "/bin"


def test_use_huge_pages_reexecs_once_with_the_same_command_line():
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from training import cli; cli.use_huge_pages(); "
            "cli.use_huge_pages(); print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), "x=1"], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1  # the second call found the tunable set and did not exec again
    pid, tunables, argv = lines[0].split(" ", 2)
    assert int(pid) == p.pid  # exec keeps the process (signals and PID files still reach it)
    assert argv == str([str(ROOT), "x=1"])
    host = cli.huge_pages_env(env, cli._thp_mode(), cli._glibc_version())
    assert tunables == (host["GLIBC_TUNABLES"] if host else "None")


def test_cli_main_reexecs_for_the_script_being_run_only(tmp_path):
    """A script's `main` reaches cli.main as a `__main__` function and gets the re-exec, before the config is read;
    the same function imported by a test (tests/test_bad_input.py) does not (it would replace pytest)."""
    code = ("import os\nfrom training import cli\n"
            "def main(cfg): print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), cfg.train.steps)\n"
            "cli.main('config', main)")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(ROOT)   # argv holds only overrides here, as for the real scripts
    p = subprocess.Popen([sys.executable, "-c", code, "train.steps=7"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    pid, tunables, steps = lines[0].split(" ")
    assert int(pid) == p.pid and steps == "7"
    env.pop("PYTHONPATH")
    host = cli.huge_pages_env(env, cli._thp_mode(), cli._glibc_version())
    assert tunables == (host["GLIBC_TUNABLES"] if host else "None")
