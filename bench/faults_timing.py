"""Timing-dependent faults, as a user meets them, in real subprocesses. Prints JSON. Used for the thirtieth
session's entries in development_log.md (the suite's tests pin each mechanism deterministically; these measure it).

    python bench/faults_timing.py ctrl_c ckpt_dir=DIR [delays=8,9,10] [num_samples=400000]
    python bench/faults_timing.py prepare_race [delays=2.0,2.4,2.8] [data=fashion_mnist]
    python bench/faults_timing.py rebuild_kill [delays=0.3] [data=digits]

ctrl_c: `sample.py ckpt_dir=DIR num_samples=N` gets SIGINT after each delay (seconds); reports each exit code and
whether the held-interrupt line was printed (130: clean; -11: the crash DeferredInterrupt removed).
prepare_race: on a fresh temporary root, one process prepares the built-in set and reads its train split, a second
one starts `delay` seconds later doing the same; reports each one's outcome (before the preparation lock the first
one failed with "shard ... is missing" at 2.0-2.8 s on Fashion-MNIST).
rebuild_kill: in a fresh temporary root, prepares the set, starts `prepare_data.py ... force=true` and SIGKILLs it
`delay` seconds after its "rebuilding" line; reports what is left beside the set, then what a plain
`prepare_data.py` says and leaves (before the thirty-first session: the old set stayed in `.<name>.replaced-<pid>`
for good and the set was rebuilt from its source).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READ = ("import sys; from data.prepare import ensure_prepared; from data.loader import load_split\n"
        "m, d = ensure_prepared(sys.argv[1], sys.argv[2]); x, _ = load_split(m, d, 'train'); print('ok', len(x))")


def ctrl_c(args):
    out = []
    for d in [float(v) for v in args.get("delays", "8,9,10").split(",")]:
        p = subprocess.Popen([sys.executable, "sample.py", f"ckpt_dir={args['ckpt_dir']}",
                              f"num_samples={args.get('num_samples', 400000)}", "out=/tmp/faults_timing.npz"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(d)
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        try:
            text, _ = p.communicate(timeout=120)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            text, rc = p.communicate()[0], "still running after 120 s"
        out.append({"delay_s": d, "exit": rc, "exit_after_s": round(time.monotonic() - t0, 1),
                    "held": "Ctrl-C: stopping when" in text, "last_line": text.strip().splitlines()[-1:]})
    return out


def prepare_race(args):
    out = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for d in [float(v) for v in args.get("delays", "2.0,2.4,2.8").split(",")]:
        with tempfile.TemporaryDirectory() as root:
            cmd = [sys.executable, "-c", READ, args.get("data", "fashion_mnist"), root]
            first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
            time.sleep(d)
            second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            a = first.communicate()[0]
            out.append({"delay_s": d, "first": a.strip().splitlines()[-1:], "second": (second.stdout +
                        second.stderr).strip().splitlines()[-2:]})
    return out


def rebuild_kill(args):
    out = []
    name = args.get("data", "digits")
    for d in [float(v) for v in args.get("delays", "0.3").split(",")]:
        with tempfile.TemporaryDirectory() as root:
            prep = [sys.executable, "prepare_data.py", f"data={name}", f"data.root={root}"]
            subprocess.run(prep, cwd=ROOT, capture_output=True, check=True)
            p = subprocess.Popen(prep + ["force=true"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
            for line in p.stdout:
                if "rebuilding" in line:
                    time.sleep(d)
                    p.send_signal(signal.SIGKILL)
                    break
            p.wait()
            left = sorted(os.listdir(root))
            after = subprocess.run(prep, cwd=ROOT, capture_output=True, text=True)
            out.append({"delay_s": d, "exit": p.returncode, "left_after_kill": left,
                        "next_prepare": after.stdout.strip().splitlines(), "left_after": sorted(os.listdir(root))})
    return out


if __name__ == "__main__":
    what, args = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
    benches = {"ctrl_c": ctrl_c, "prepare_race": prepare_race, "rebuild_kill": rebuild_kill}
    print(json.dumps({"bench": what, "runs": benches[what](args)}, indent=1))
