"""Fit a small KL autoencoder (diffusers `AutoencoderKL`) on a built-in data set on the CPU, for latent-space training
where no pretrained VAE can be downloaded.

    python train_autoencoder.py                        # fashion_mnist 28x28x1 -> 14x14x4, ~12-14 min on one CPU core
    python train_autoencoder.py steps=500 out=/tmp/ae  # quicker, blurrier (Ctrl-C / SIGTERM: stop early, still save)
    python train_autoencoder.py force=true             # replace the autoencoder already in out=
    python prepare_data.py source=fashion_mnist vae=autoencoders/fashion_mnist out=prepared/fashion_mnist_latents

The objective is SD's VAE objective without the GAN and LPIPS terms (unavailable offline): pixel MSE plus a tiny
KL weight (`kl_weight`). After training, `shift_factor` and `scaling_factor` are set from the mean and std of the
posterior means over the train split (SD3's convention, data/vae.py), the model is saved with `save_pretrained`
(config.json + safetensors) and the reconstruction PSNR on the test split is printed and stored in
`<out>/train_report.json`.

An autoencoder already in `out` is not replaced unless `force=true` is given: the latent data sets and runs encoded
with it could not be decoded any more. With it, the new model is written whole into a hidden folder inside `out`
first, and only then swapped in; the old one is deleted last.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from training import cli  # noqa: E402


def psnr_uint8(a, b) -> float:
    """PSNR in dB over a whole set of uint8 images (from the mean squared error over all pixels)."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# The hidden folders inside out= that hold the model being written (new) and, during the swap, the one it replaces
# (old). Inside out=, not beside it: out= may be a mount point, a symlink, or in a folder the user cannot write to.
NEW, OLD = ".autoencoder-new-", ".autoencoder-old-"


def _is_model_file(name: str) -> bool:
    """The files of a saved autoencoder (save_pretrained's and the report); anything else in out= is left alone."""
    return name in ("config.json", "train_report.json") or name.startswith("diffusion_pytorch_model")


def holds_model(d) -> bool:
    from pathlib import Path

    d = Path(d)
    return d.is_dir() and any(_is_model_file(p.name) for p in d.iterdir())


MANIFEST = ".publishing.json"   # in the new model's folder: it is complete; its files' names and stamps


def recover_interrupted(out) -> None:
    """What a run killed outright (kill -9, power loss) left in out=: a new model that was being moved in (its folder
    holds MANIFEST) is moved in, finishing the swap; a half-written one is deleted; an old one set aside during a swap
    goes back unless the new one was completely moved in (its config.json moves last). Called holding out='s run
    lock, so whatever is there is a dead run's (a pid could be reused, or another host's)."""
    import shutil
    from pathlib import Path

    out = Path(out)
    if not out.is_dir():
        return
    left = sorted(out.glob(".autoencoder-*-*"), key=lambda d: not (d / MANIFEST).is_file())   # swaps to finish first
    for d in left:
        kind, pid = d.name[:-len(d.name.rpartition("-")[2])], d.name.rpartition("-")[2]
        if kind not in (NEW, OLD) or not pid.isdigit() or not d.is_dir():
            continue
        files = _manifest(d) if kind == NEW else None
        if files and all((d / n).is_file() or _moved_in(n, stamp, d, out) for n, stamp in files.items()):
            _move_in(d, out, out / f"{OLD}{pid}", files)
            print(f"{out}: a run was killed while it moved its new autoencoder in; the move is finished", flush=True)
        elif files:
            print(f"{out}: the new autoencoder a killed run was moving in has files changed since; it is deleted, "
                  "and out= keeps what it holds", flush=True)
        elif kind == OLD and (d / "config.json").exists() and not (out / "config.json").exists():
            for f in d.iterdir():
                shutil.move(str(f), str(out / f.name))
            print(f"{out}: a replacement was killed before it finished; the old autoencoder is back", flush=True)
        shutil.rmtree(d, ignore_errors=True)


def publish(tmp, out, force: bool) -> None:
    """Move the complete model in `tmp` into `out`. It is first marked complete (MANIFEST, after every file is on
    disk), so that from then on a kill at any point is finished by the next run (recover_interrupted) rather than
    undone: 12-15 minutes of training are not lost to a window of a few renames, and out= never keeps half of each
    model. An old model there is moved aside whole and deleted once the new one is in place (config.json last)."""
    from pathlib import Path

    from training.files import write_json

    tmp, out = Path(tmp), Path(out)
    names = sorted(f.name for f in tmp.iterdir())
    for name in names:   # on disk before anything is replaced: a power loss must not leave empty files
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    if holds_model(out) and not force:   # one was copied in while this one trained (out='s lock keeps other runs out)
        from training.errors import UserError

        keep = out / f"autoencoder-{os.getpid()}"
        os.rename(tmp, keep)
        raise UserError(f"out={out} got an autoencoder while this one trained; the new one is in {keep}: move it "
                        "where you want it")
    files = {name: _stamp(tmp / name) for name in names}   # a rename inside out= keeps all three
    write_json(tmp / MANIFEST, files)   # on disk, whole, before the first move
    _move_in(tmp, out, out / f"{OLD}{os.getpid()}", files)


def _manifest(new) -> dict | None:
    """MANIFEST's {file name: stamp}; None when absent or unreadable (the model is then taken as unfinished)."""
    import json

    try:
        files = json.loads((new / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(files, dict) and all(isinstance(v, list) and len(v) == 3 for v in files.values())
    return files if ok and files else None


def _stamp(path) -> list:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _moved_in(name: str, stamp: list, new, out) -> bool:
    """The new model's file `name` is already in out=: not in `new` any more, and out='s file of that name is that
    very file (inode, size and mtime), not one of the old model's, nor one written over it by hand since."""
    try:
        return not (new / name).exists() and _stamp(out / name) == stamp
    except OSError:
        return False


def _move_in(new, out, aside, files: dict) -> None:
    """The swap, from wherever a killed one stopped: every model file in `out` that is not one of the new model's
    already moved in goes to `aside` (config.json first), then the new model's files still in `new` move in
    (config.json last), then `new` and `aside` go."""
    import shutil

    olds = [f for f in out.iterdir() if _is_model_file(f.name) and f.is_file()
            and not (f.name in files and _moved_in(f.name, files[f.name], new, out))]
    if olds:
        aside.mkdir(exist_ok=True)
    for f in sorted(olds, key=lambda f: f.name != "config.json"):
        shutil.move(str(f), str(aside / f.name))
    for name in sorted(files, key=lambda n: n == "config.json"):
        if (new / name).exists():
            shutil.move(str(new / name), str(out / name))
    shutil.rmtree(new)
    shutil.rmtree(aside, ignore_errors=True)


def build_autoencoder(cfg, image_channels: int):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=image_channels, out_channels=image_channels,
                         latent_channels=int(cfg.latent_channels), down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.block_out_channels),
                         layers_per_block=int(cfg.layers_per_block), norm_num_groups=int(cfg.norm_num_groups),
                         mid_block_add_attention=bool(cfg.mid_attention))


def score_reconstructions(cfg, vae, x_train, y_train, n: int = 1000) -> dict:
    """The ceiling a latent model can reach by the stage-1 metric (training/evaluate.py): n train images (the
    classifier's real sets are drawn from test, so none is compared with itself) scored as they are and after
    encode + decode. The gap between the two is what the autoencoder alone costs."""
    import contextlib

    import numpy as np

    from data.loader import load_split
    from data.prepare import ensure_prepared
    from training.evaluate import get_evaluator

    with contextlib.ExitStack() as held:   # no rebuild while the classifier and test split are read (data.rebuild)
        meta, data_dir = ensure_prepared(cfg.data.name, cfg.data.root, held=held)
        ev = get_evaluator(meta, data_dir, lambda split: load_split(meta, data_dir, split))
    idx = np.sort(np.random.RandomState(2).permutation(len(x_train))[:n])
    keep = ("acc_ratio", "fd", "fd_floor", "fd_ratio")
    as_is = ev.evaluate(x_train[idx], y_train[idx])
    rec = ev.evaluate(vae.decode(vae.encode(x_train[idx], batch_size=500), chunk=500), y_train[idx])
    print(f"classifier on {n} train images: as they are FD {as_is['fd_ratio']:.2f}x the floor, acc ratio "
          f"{as_is['acc_ratio']:.3f}; reconstructed FD {rec['fd_ratio']:.2f}x, acc ratio {rec['acc_ratio']:.3f}",
          flush=True)
    return {"train_images": {k: as_is[k] for k in keep}, "reconstructed": {k: rec[k] for k in keep}, "n": n}


def main(cfg):
    import shutil
    from pathlib import Path

    import torch

    from data.builtin import load_builtin
    from training.errors import UserError
    from training.runlock import RunLock

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    d = load_builtin(cfg.data.name)
    (x_train, _), (x_test, _) = d["train"], d["test"]
    h, w, c = x_train.shape[1:]
    down = 2 ** (len(cfg.block_out_channels) - 1)
    if h % down or w % down:
        raise UserError(f"{cfg.data.name} images are {h}x{w}, not divisible by the autoencoder's downsampling {down}: "
                        "change block_out_channels (one entry per down block)")
    if any(ch % int(cfg.norm_num_groups) for ch in cfg.block_out_channels):
        raise UserError(f"every block_out_channels entry must be divisible by norm_num_groups={cfg.norm_num_groups}")
    if int(cfg.steps) < 1:
        raise UserError(f"steps={cfg.steps} must be >= 1")
    out = Path(cfg.out).expanduser()
    try:   # an unusable out path should fail now, not after 12-14 minutes of training (the lock writes a file)
        out.mkdir(parents=True, exist_ok=True)
        # One run per out= (the kernel drops the lock however a run ends): a second one is refused now instead of
        # training 15 minutes for nothing, and what a killed run left can be cleared without guessing by pid.
        lock = RunLock(out, "choose another out=").acquire()
    except OSError as e:
        raise UserError(f"cannot write the autoencoder to out={out} ({type(e).__name__}): pick a writable "
                        f"directory") from None
    tmp = out / f"{NEW}{os.getpid()}"
    try:
        recover_interrupted(out)
        if holds_model(out) and not cfg.force:   # refused now, not after 12-14 minutes of training
            raise UserError(f"out={out} already holds an autoencoder, and the latent data sets and runs made with it "
                            "need it to decode: pick another out=, or pass force=true to replace it")
        tmp.mkdir()   # out= is writable: the lock above wrote its holder into a file there
        return _train_and_save(cfg, out, tmp, x_train, x_test, d, h, w, c, down)
    finally:   # an interrupted or failed run leaves out= as it was; one stopped in the swap, the next run finishes
        if not (tmp / MANIFEST).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        lock.release()


def _train_and_save(cfg, out, tmp, x_train, x_test, d, h, w, c, down):
    import json
    import math
    import signal
    import time

    import numpy as np
    import torch

    from data.vae import Vae
    from training.files import write_json

    model = build_autoencoder(cfg, c)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"autoencoder: {n_params / 1e6:.2f}M parameters, {h}x{w}x{c} -> {h // down}x{w // down}x"
          f"{cfg.latent_channels}, {len(x_train)} training images", flush=True)

    steps, warm = int(cfg.steps), min(100, int(cfg.steps) // 10 + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.lr), weight_decay=0.0)
    t0, c0, budget_s = time.perf_counter(), time.process_time(), 60 * float(cfg.max_minutes)
    # Cosine decay over whichever runs out first, the steps or the time budget (so a slow machine still ends
    # with a decayed learning rate; the step count reached is reported). The budget counts this process's CPU
    # time, so that other work on a shared machine does not cut the training short (on an idle machine with
    # threads=1 that equals wall-clock time).
    used = lambda: time.process_time() - c0
    progress = lambda s: min(1.0, max(s / steps, used() / budget_s))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * progress(s))))
    rs = np.random.RandomState(int(cfg.seed))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float() / 127.5 - 1.0
    stop = []   # SIGTERM / Ctrl-C: stop training early, then still calibrate, save and evaluate
    old_handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        model.train()
        order, pos, step, run_loss = rs.permutation(len(x_train)), 0, 0, []
        while step < steps and not stop:
            if pos + int(cfg.batch_size) > len(order):
                order, pos = rs.permutation(len(x_train)), 0
            x = to_t(x_train[order[pos:pos + int(cfg.batch_size)]])
            pos += int(cfg.batch_size)
            post = model.encode(x).latent_dist
            rec = model.decode(post.sample(generator=gen)).sample
            mse = torch.mean((rec - x) ** 2)
            kl = post.kl().mean() / post.mean[0].numel()      # per latent element
            loss = mse + float(cfg.kl_weight) * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss.append(mse.item())
            if step % int(cfg.log_every) == 0 or step == steps:
                el = time.perf_counter() - t0
                print(f"step {step}/{steps}  mse {np.mean(run_loss):.5f}  kl {kl.item():.2f}  "
                      f"{step * int(cfg.batch_size) / el:.0f} img/s  {el / 60:.1f} min "
                      f"(process CPU {(time.process_time() - c0) / 60:.1f} min)", flush=True)
                run_loss = []
            if used() > budget_s:
                print(f"stopping at step {step}: max_minutes={cfg.max_minutes} of CPU time used", flush=True)
                break
    finally:   # restored: a Ctrl-C during calibration and scoring interrupts as usual
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.eval()

    # Latent calibration (SD3 convention): shift = mean, scale = 1/std of the posterior means over train.
    model.register_to_config(shift_factor=0.0, scaling_factor=1.0)   # diffusers' default scaling is SD's 0.18215
    vae = Vae(model, str(cfg.out))
    sub = x_train[np.random.RandomState(1).permutation(len(x_train))[:5000]]
    z = vae.encode(sub, batch_size=500)          # scaling 1, shift 0 at this point: raw posterior means
    shift, scale = float(z.mean()), float(1.0 / z.std())
    model.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae = Vae(model, str(cfg.out))
    t1 = time.perf_counter()
    rec = vae.decode(vae.encode(x_test, batch_size=500), chunk=500)
    eval_s = time.perf_counter() - t1
    psnr = psnr_uint8(rec, x_test)
    model.save_pretrained(str(tmp))
    report = {"data": cfg.data.name, "parameters": n_params, "steps": step, "train_seconds": train_s,
              "train_cpu_seconds": train_cpu_s,
              "test_psnr_db": psnr, "test_images": len(x_test), "encode_decode_seconds": eval_s,
              "latent_shape": list(vae.latent_shape(h, w)), "scaling_factor": scale, "shift_factor": shift,
              "torch_threads": torch.get_num_threads()}
    (tmp / "train_report.json").write_text(json.dumps(report, indent=1))
    publish(tmp, out, bool(cfg.force))   # the model is kept from here on, even if the scoring below is interrupted
    if cfg.score:
        report["classifier"] = score_reconstructions(cfg, vae, x_train, d["train"][1])
        write_json(out / "train_report.json", report)
    print(f"saved {out} (save_pretrained): {step} steps in {train_s / 60:.1f} min "
          f"(process CPU time {train_cpu_s / 60:.1f} min), test reconstruction PSNR "
          f"{psnr:.2f} dB, scaling_factor {scale:.4f}, shift_factor {shift:.4f}", flush=True)
    return report


if __name__ == "__main__":
    cli.main("autoencoder", main)
