"""Stage 1: train a class-conditional flow-matching DiT.

    python train_stage1.py                                   # Fashion-MNIST, CPU preset `small`
    python train_stage1.py data=digits model=tiny train.steps=2000 wandb.mode=disabled
    python train_stage1.py train.is_restore=true             # resume from the latest checkpoint in train.ckpt_dir
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from training import cli  # noqa: E402


def main(cfg):
    import contextlib

    from data.loader import make_iterator
    from data.prepare import ensure_prepared
    from models import model_spec
    from training.loop import Task, run

    with contextlib.ExitStack() as held:   # the data set is held for reading until the run ends (data.rebuild)
        meta, data_dir = ensure_prepared(cfg.data.name, cfg.data.root, held=held)
        spec = model_spec(cfg.model, meta)

        def iterator(batch_size, process_index, process_count):
            return make_iterator(meta, data_dir, "train", batch_size=batch_size, seed=int(cfg.train.seed),
                                 hflip=bool(cfg.data.hflip), workers=int(cfg.data.workers),
                                 process_index=process_index, process_count=process_count)

        def evaluator():
            from training.evaluate import evaluator_for  # trains the classifier on first use

            return evaluator_for(meta, data_dir, cfg.data.root)

        def check_eval():
            from training.evaluate import eval_target

            eval_target(meta, data_dir, cfg.data.root)

        return run(cfg, Task(spec=spec, meta=meta, data_dir=str(data_dir), make_iterator=iterator,
                             null_cond=spec["num_classes"], evaluator=evaluator, check_eval=check_eval))


if __name__ == "__main__":
    cli.main("config", main)
