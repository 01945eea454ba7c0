"""Prepare a data set as ArrayRecord shards + meta.json under <data.root>/<data.name>/.

    python prepare_data.py data=fashion_mnist
    python prepare_data.py data=digits data.root=/fast/disk
    python prepare_data.py data=emoji                       # a captioned stage-2 set, with its text features
    python prepare_data.py data=latents_text data.latents=<dir>   # text features of encoded captioned latents
    python prepare_data.py source=<folder> vae=<dir|hub id|sd3|sdxl|sd> resolution=256 out=<dir>   # VAE latents
    python prepare_data.py source=fashion_mnist vae=autoencoders/fashion_mnist out=prepared/fashion_mnist_latents
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from training import cli  # noqa: E402


def main(cfg):
    from pathlib import Path

    from data.builtin import BUILTIN_NAMES
    from data.rebuild import meta_stamp, prepare_or_rebuild
    from training.errors import UserError

    if cfg.get("source") or cfg.get("vae"):
        return encode_latents(cfg)
    target = Path(cfg.data.root) / cfg.data.name
    before = meta_stamp(target)

    def check(old_dir):   # what a rebuild from this config would delete for good
        if cfg.data.get("kind") is None and cfg.data.name not in BUILTIN_NAMES:   # latents: not rebuilt from a name
            raise UserError(f"force=true rebuilds a built-in ({', '.join(BUILTIN_NAMES)}) or a captioned data config; "
                            f"{target} is neither, and removing its meta.json would leave it unusable: re-run the "
                            f"command that made it (latents: prepare_data.py source=... vae=... out={target} "
                            f"force=true)")
        if cfg.data.get("kind") is not None:   # a captioned config replaces only what a data config can remake
            from data.builtin import is_builtin_copy
            from data.meta import load_meta

            old = load_meta(old_dir)
            if not old.get("text") and not is_builtin_copy(cfg.data.name, old):
                raise UserError(f"{target} holds a data set without captions ({old.get('source')}), which force=true "
                                f"would delete for good: give the captioned set another data.name")

    # a stopped rebuild resumes as the preparation itself does (its finished shards and resume state)
    prepare = lambda: _prepare(cfg)
    meta, data_dir = prepare_or_rebuild(target, bool(cfg.force), before, prepare, prepare, prepare, check)
    counts = ", ".join(f"{s}: {v['num_records']}" for s, v in meta["splits"].items())
    print(f"{meta['name']} ready in {data_dir}: shape {meta['shape']} {meta['dtype']}, {meta['num_classes']} classes, "
          f"{counts}")


def _prepare(cfg):
    from data.prepare import ensure_prepared

    if cfg.data.get("kind") is not None:   # a captioned stage-2 config (emoji, fashion_mnist_text, folder, ...)
        from data.captions import ensure_prepared_text

        return ensure_prepared_text(cfg.data)
    return ensure_prepared(cfg.data.name, cfg.data.root)


def encode_latents(cfg):
    """source + vae: encode images to VAE latents (data/encode.py)."""
    from pathlib import Path

    from data.encode import prepare_latents
    from data.rebuild import meta_stamp, prepare_or_rebuild, refuse_if_read
    from data.vae import load_vae
    from training.errors import UserError

    if not cfg.source or not cfg.vae:
        raise UserError("encoding latents needs both source=<folder or built-in name> and vae=<dir, hub id or preset>")
    out = Path(cfg.out) if cfg.out else Path(cfg.data.root) / f"{Path(str(cfg.source)).name}_latents"
    before = meta_stamp(out)
    if cfg.force and before is not None:
        refuse_if_read(out)
    vae = load_vae(str(cfg.vae), cfg.vae_device, cfg.vae_dtype)

    def encode(force=True, rebuilding=False):
        return prepare_latents(str(cfg.source), vae, out, resolution=cfg.resolution, hflip=bool(cfg.hflip),
                               batch_size=int(cfg.batch_size), shard_size=int(cfg.shard_size), dtype=cfg.latent_dtype,
                               sample=bool(cfg.sample_posterior), workers=int(cfg.workers),
                               progress=bool(cfg.progress), force=force, rebuilding=rebuilding)

    # force=true over a complete set: it waits aside until the new one is complete, and comes back on any failure; a
    # rebuild killed outright resumes its new shards (the same command again)
    meta = prepare_or_rebuild(out, bool(cfg.force), before, lambda: encode(force=False), encode,
                              lambda: encode(force=False, rebuilding=True))
    counts = ", ".join(f"{s}: {v['num_records']} ({v['skipped']} skipped)" for s, v in meta["splits"].items())
    print(f"{meta['name']} ready in {out}: latents {meta['shape']} {meta['dtype']} from {meta['encoder']['vae']}, "
          f"{meta['num_classes']} classes, {counts}. Train with data.root={out.parent} data.name={out.name} "
          f"data.hflip=false" + (f"; stage 2 on its captions: python train_stage2.py data=latents_text "
                                 f"data.latents={out}" if meta["encoder"].get("layout") == "captions" else ""),
          flush=True)
    return meta


if __name__ == "__main__":
    cli.main("prepare", main)
