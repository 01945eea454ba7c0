"""Prepare a data set as ArrayRecord shards + meta.json under <data.root>/<data.name>/.

    python prepare_data.py data=fashion_mnist
    python prepare_data.py data=digits data.root=/fast/disk
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from training import cli  # noqa: E402


def main(cfg):
    import shutil
    from pathlib import Path

    from data.prepare import ensure_prepared

    target = Path(cfg.data.root) / cfg.data.name
    if cfg.force and (target / "meta.json").exists():
        (target / "meta.json").unlink()  # meta.json is written last, so removing it marks the set as incomplete
        shutil.rmtree(target / "classifier", ignore_errors=True)
    meta, data_dir = ensure_prepared(cfg.data.name, cfg.data.root)
    counts = ", ".join(f"{s}: {v['num_records']}" for s, v in meta["splits"].items())
    print(f"{meta['name']} ready in {data_dir}: shape {meta['shape']} {meta['dtype']}, {meta['num_classes']} classes, "
          f"{counts}")


if __name__ == "__main__":
    cli.main("prepare", main)
