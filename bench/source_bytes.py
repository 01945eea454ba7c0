"""What telling a copied source from an edited one costs: the stat pass run at every start against the bytes pass
(data.folders.bytes_digest) run again only when the stamps disagree (an encode or a captioned folder's preparation
hashes the bytes it decodes, with no pass of its own). Prints JSON.

    python bench/source_bytes.py [n=20000] [size=64] [dir=/tmp/source_bytes]

Writes n random size x size RGB PNGs (about 12 KB each at 64 px; kept in `dir` for reruns) and times both passes
over them, twice; the second bytes pass reads from the page cache.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.folders import bytes_digest, file_stamp  # noqa: E402


def main(argv):
    args = dict(a.split("=", 1) for a in argv)
    n, size, d = int(args.get("n", 20000)), int(args.get("size", 64)), Path(args.get("dir", "/tmp/source_bytes"))
    names = [f"{i}.png" for i in range(n)]
    if len(list(d.glob("*.png"))) != n:
        from PIL import Image

        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for name in names:
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / name)
    paths = [os.path.join(d, f) for f in names]
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    out = {"files": n, "mb": round(mb, 1), "stamps_s": [], "bytes_s": []}
    for _ in range(2):
        t = time.perf_counter()
        [file_stamp(p, f) for p, f in zip(paths, names)]
        out["stamps_s"].append(round(time.perf_counter() - t, 3))
        t = time.perf_counter()
        bytes_digest(paths, names)
        out["bytes_s"].append(round(time.perf_counter() - t, 3))
    out["bytes_mb_per_s"] = round(mb / min(out["bytes_s"]), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
