"""Helpers for the fault tests: run the real training script in a subprocess, watch its stdout, signal it at a
chosen moment (comparing checkpoints: conftest.restore_final / assert_same_state)."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT


class Script:
    """`python train_stage1.py <overrides>` with its stdout read line by line on a thread (so waits can time out)."""

    def __init__(self, args, env_extra=None, script="train_stage1.py"):
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
               **(env_extra or {})}
        self.p = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines, self._q = [], queue.Queue()
        self._err = []
        threading.Thread(target=self._pump, args=(self.p.stdout, self._q), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.p.stderr, None), daemon=True).start()

    def _pump(self, stream, q):
        for line in stream:
            if q is None:
                self._err.append(line)
            else:
                q.put(line)
        if q is not None:
            q.put(None)

    def wait_for(self, pattern: str, timeout: float = 300.0) -> str:
        """Block until a stdout line matches `pattern`; returns it (fails if the process ends first)."""
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:  # dump every thread's stack (PYTHONFAULTHANDLER) to show where it is stuck
                self.p.send_signal(signal.SIGABRT)
                self.p.wait(30)
                time.sleep(0.5)
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output()}")
            if line is None:
                self._q.put(None)
                raise AssertionError(f"process ended before {pattern!r}:\n{self.output()}")
            self.lines.append(line)
            if rx.search(line):
                return line

    def signal(self, sig, delay: float = 0.0):
        if delay:
            time.sleep(delay)
        self.p.send_signal(sig)

    def finish(self, timeout: float = 600.0) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.send_signal(signal.SIGABRT)
            self.p.wait(30)
            time.sleep(0.5)
            raise AssertionError(f"still running after {timeout} s:\n{self.output()}")
        while True:  # drain what is left of stdout
            try:
                line = self._q.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        time.sleep(0.05)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def output(self) -> str:
        return "".join(self.lines)[-3000:] + "\n--- stderr ---\n" + self.stderr[-3000:]


def run_script(args, env_extra=None, timeout=600.0, script="train_stage1.py"):
    s = Script(args, env_extra, script)
    rc = s.finish(timeout)
    return rc, s


def complete_steps(ckpt_dir) -> list[int]:
    """Step directories Orbax has finished (renamed from their temporary name)."""
    d = Path(ckpt_dir)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def partial_saves(ckpt_dir) -> list[str]:
    d = Path(ckpt_dir)
    return sorted(p.name for p in d.iterdir() if "orbax-checkpoint-tmp" in p.name) if d.is_dir() else []


SIGKILL, SIGTERM, SIGINT = signal.SIGKILL, signal.SIGTERM, signal.SIGINT


def run_cli(monkeypatch, capsys, args, script=None, config: str = "config", silent: bool = False) -> str:
    """A stage script's entry point in-process with `args`; returns its single stderr line after asserting exit code
    2, one `error:` line (absl's own log lines aside), no traceback and, if `silent`, nothing on stdout."""
    import pytest

    import train_stage1
    from training import cli

    monkeypatch.setattr(sys, "argv", ["train_stage1.py", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(config, script or train_stage1.main)
    out, err = capsys.readouterr()
    assert not (silent and out.strip()), out
    lines = [l for l in err.strip().splitlines() if l.strip() and not l.startswith(("WARNING:absl", "INFO:absl"))]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err, err
    return lines[0]
