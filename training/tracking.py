"""Monitoring: W&B (offline by default, no account needed) and the console get the same scalars; image grids."""

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training.errors import UserError, first_line
from training.files import atomic_write


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H, nrow*W, C) uint8 image, C in {1, 3} (grey stays grey)."""
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    return grid


def grid_pick(labels: np.ndarray, rows: int = 16, per_row: int = 16) -> tuple[np.ndarray, int]:
    """(indices, images per row) of the PNG beside sample.py's npz. Up to 256 images: all of them, in order. More: one
    row per class (stage 2: per prompt), up to `rows` classes spread evenly, `per_row` images each; where some class
    has fewer than 8, 256 images spread over the (class-sorted) request. Taking the first 256 showed only the first
    classes: 1000 Fashion-MNIST samples gave two and a half of ten, 50k ImageNet samples 6 of 1000."""
    n = len(labels)
    if n <= rows * per_row:
        return np.arange(n), min(n, 16, max(8, int(np.ceil(np.sqrt(n)))))
    classes = np.unique(labels)
    classes = classes[np.unique(np.linspace(0, len(classes) - 1, min(rows, len(classes))).round().astype(int))]
    members = [np.flatnonzero(labels == c) for c in classes]
    m = min(per_row, min(len(i) for i in members))
    if m < 8:   # few images of some class (1000 classes x 1): 256 spread over the request, 16 to a row
        return np.unique(np.linspace(0, n - 1, rows * per_row).round().astype(int)), per_row
    return np.concatenate([i[:m] for i in members]), m


def grid_upscale(image_height: int) -> int:
    """Nearest-neighbour enlargement for a grid's PNG: x2 for small images (28 px Fashion-MNIST, 8 px digits), none
    from 64 px up: a 256 px grid of 128 images was 4114 x 8226 px at x2, 19 MB and 12 s of PNG encoding per grid."""
    return 2 if image_height < 64 else 1


def save_png(grid: np.ndarray, path, upscale: int = 1) -> None:
    im = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    with atomic_write(path) as tmp:
        im.save(tmp)


class Tracker:
    """Thin wrapper over a W&B run; `mode=disabled` makes every call a no-op except the console."""

    def __init__(self, wandb_cfg, config: dict, run_id: str | None = None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        Path(wandb_cfg.dir).mkdir(parents=True, exist_ok=True)  # W&B warns when its dir is missing
        self.wandb = wandb
        try:
            # Hydra reads `wandb.name=42` as a number, which W&B's settings refuse with a pydantic traceback.
            text = lambda v: None if v is None else str(v)
            self.run = wandb.init(project=text(wandb_cfg.project), entity=text(wandb_cfg.entity),
                                  name=text(wandb_cfg.name),
                                  dir=str(wandb_cfg.dir), mode=wandb_cfg.mode, config=config, id=run_id,
                                  resume="allow" if run_id else None)
        except wandb.errors.Error as err:   # no login (UsageError), no network or a bad entity (CommError) ...
            raise UserError(f"W&B could not start a wandb.mode={wandb_cfg.mode} run ({first_line(err)}): run "
                            f"`wandb login` (or set WANDB_API_KEY), or train with wandb.mode=offline (sync later with "
                            f"`wandb sync`) or wandb.mode=disabled") from None
        self.enabled = wandb_cfg.mode != "disabled"

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.enabled else None

    def log(self, step: int, scalars: dict, *, console: bool = True) -> None:
        if self.enabled:
            self.run.log(scalars, step=step)
        if console:
            text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items())
            print(f"[step {step}] {text}", file=sys.stderr if os.environ.get("DIT_LOG_STDERR") else sys.stdout,
                  flush=True)

    def log_image(self, step: int, name: str, grid: np.ndarray, caption: str = "") -> None:
        if self.enabled:
            self.run.log({name: self.wandb.Image(grid[..., 0] if grid.shape[-1] == 1 else grid, caption=caption)},
                         step=step)

    def summary(self, values: dict) -> None:
        if self.enabled:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()
