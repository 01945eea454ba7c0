"""Stage 2: train a text-conditional flow-matching DiT on cached caption features.

    python train_stage2.py                                            # emoji 32x32, small_text, cross-attention
    python train_stage2.py model.mixing=joint train.ckpt_dir=checkpoints/stage2_joint
    python train_stage2.py data=fashion_mnist_text train.init_from=checkpoints/stage1 model.hidden_size=192 model.depth=6 model.num_heads=6 model.patch_size=7   # from stage 1's default run
    python train_stage2.py data=latents_text data.latents=prepared/my_latents model.patch_size=2   # VAE latents
    python train_stage2.py data=folder data.folder=D data.captions_file=D/c.jsonl train.init_from=checkpoints/stage2
    python train_stage2.py train.is_restore=true                      # resume from the latest checkpoint
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from training import cli  # noqa: E402


def main(cfg):
    import contextlib
    import functools

    import numpy as np

    from data.captions import ensure_prepared_text
    from data.loader import StoredImages, load_text, make_iterator
    from models import model_spec
    from training.errors import UserError
    from training.generate import text_conds
    from training.loop import Task, run
    from training.step import text_conditioning

    if cfg.data.get("kind") is None:   # data=fashion_mnist / digits: a stage-1 (class-labelled) data config
        raise UserError(f"stage 2 trains on captioned data, and data={cfg.data.name} is a class-labelled (stage-1) "
                        "data config: use data=emoji, data=fashion_mnist_text, data=folder or data=latents_text")
    if cfg.model.get("mixing") is None:
        raise UserError("stage 2 needs a text model preset (model=small_text or model.mixing=cross|joint)")
    with contextlib.ExitStack() as held:   # the data set is held for reading until the run ends (data.rebuild)
        meta, data_dir = ensure_prepared_text(cfg.data, held=held)
        spec = model_spec(cfg.model, meta)
        num_train = int(meta["splits"]["train"]["num_records"])

        def captions(idx):   # only the records asked for: the whole split's features can be more than memory holds
            return load_text(meta, data_dir, "train", idx)

        def iterator(batch_size, process_index, process_count):
            return make_iterator(meta, data_dir, "train", batch_size=batch_size, seed=int(cfg.train.seed),
                                 hflip=bool(cfg.data.hflip), workers=int(cfg.data.workers),
                                 process_index=process_index, process_count=process_count)

        def init_model(model):
            if not cfg.train.init_from or cfg.train.is_restore:
                return model
            from models.convert import init_from

            return init_from(str(cfg.train.init_from), model, spec, meta, str(cfg.train.prediction),
                             float(cfg.train.init_fold_t))

        @functools.cache   # read once: the same 8 captions at every grid
        def grid_captions():  # 8 training captions spread over the set, 8 samples each (one caption per row)
            return captions(np.linspace(0, num_train - 1, 8).astype(int))

        def grid_conds():
            c = grid_captions()
            return text_conds(np.repeat(c["text"], 8, axis=0), np.repeat(c["mask"], 8, axis=0))

        def final_eval(ema, step):
            from training.text_eval import caption_topk

            return caption_topk(ema, spec, meta, captions, StoredImages(meta, data_dir, "train"), cfg, step)

        return run(cfg, Task(spec=spec, meta=meta, data_dir=str(data_dir), make_iterator=iterator, null_cond=None,
                             conditioning=text_conditioning, init_model=init_model, grid_conds=grid_conds,
                             grid_rows=lambda: list(grid_captions()["caption"]),
                             final_eval=final_eval))


if __name__ == "__main__":
    cli.main("stage2", main)
