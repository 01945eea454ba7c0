"""Peak memory and wall time of preparing a captioned folder for stage 2 (`prepare_data.py data=folder`).

    python bench/caption_folder_memory.py n=20000                  # this checkout
    python bench/caption_folder_memory.py n=20000 repo=/tmp/old    # another checkout (e.g. a clone at an older commit)

Writes a folder of n random 96x96 PNGs (64 base images shifted, so they compress like photos do not) with 4-12-word
captions (seeded) under work= (default: a temporary directory, reused when it already holds n images), then runs
that checkout's prepare_data.py on it at data.size=64 in a child process and prints one JSON line: the child's peak
RSS (GiB), wall seconds, the bytes it read (read_gb, against the images' images_gb) and the records written.
same_as=<set dir> (the "out" of an earlier line) adds how many records are byte for byte those of that set.
Arguments are key=value; defaults n=20000 size=64.
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_folder(d: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    if (d / "c.jsonl").is_file() and len((d / "c.jsonl").read_text().splitlines()) == n:
        return
    (d / "imgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = "red blue green small large striped round square a photo of dog cat car tree".split()
    base = rng.integers(0, 256, (64, 96, 96, 3), dtype=np.uint8)
    rows = []
    for i in range(n):
        Image.fromarray(np.roll(base[i % 64], i, axis=1)).save(d / "imgs" / f"{i}.png")
        caption = " ".join(rng.choice(words, int(rng.integers(4, 12))))
        rows.append(json.dumps({"file": f"{i}.png", "caption": caption}))
    (d / "c.jsonl").write_text("\n".join(rows) + "\n")


def records(d: Path) -> list[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for f in json.loads((d / "meta.json").read_text())["splits"]["train"]["files"]:
        r = ArrayRecordReader(str(d / f))
        out += r.read(list(range(r.num_records())))
        r.close()
    return out


# The child's own count of bytes read (/proc/self/io rchar: files, page cache or disk, and the libraries it imports),
# printed as it exits: how many passes over the images a preparation makes.
READ_BYTES = ("import atexit, runpy, sys; atexit.register(lambda: sys.stderr.write('read_bytes=' + "
              "open('/proc/self/io').read().split()[1] + '\\n')); sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")


def main(argv):
    args = dict(a.split("=", 1) for a in argv)
    n, size = int(args.get("n", 20000)), int(args.get("size", 64))
    repo = Path(args.get("repo", ROOT))
    work = Path(args.get("work") or tempfile.mkdtemp(prefix="capmem-"))
    make_folder(work, n)
    out = Path(tempfile.mkdtemp(prefix="capmem-out-"))
    cmd = [sys.executable, "-c", READ_BYTES, "prepare_data.py", "data=folder", f"data.folder={work / 'imgs'}",
           f"data.captions_file={work / 'c.jsonl'}", f"data.size={size}", f"data.root={out}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        said = [line for line in done.stderr.strip().splitlines() if not line.startswith("read_bytes=")]
        sys.exit(said[-1] if said else f"exit {done.returncode}")
    meta = json.loads((out / "my_captions" / "meta.json").read_text())
    read = [int(line.split("=")[1]) for line in done.stderr.splitlines() if line.startswith("read_bytes=")]
    images = sum(f.stat().st_size for f in (work / "imgs").iterdir())
    same = {}
    if args.get("same_as"):
        a, b = records(out / "my_captions"), records(Path(args["same_as"]))
        same = {"identical_records": sum(x == y for x, y in zip(a, b)), "records_there": len(b)}
    print(json.dumps({**same, "n": n, "size": size, "repo": str(repo),
                      "records": meta["splits"]["train"]["num_records"],
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
                      "wall_s": round(wall, 1), "read_gb": round(read[0] / 2**30, 3) if read else None,
                      "images_gb": round(images / 2**30, 3), "out": str(out / "my_captions")}))


if __name__ == "__main__":
    main(sys.argv[1:])
