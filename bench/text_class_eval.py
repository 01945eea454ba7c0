"""Score a stage-2 (text) run trained on Fashion-MNIST captions with stage 1's metric. Prints JSON.

    python bench/text_class_eval.py <ckpt_dir> [num_samples=1000] [seed=0] [step=N] [cfg_scale=S] [root=DIR]

root: where Fashion-MNIST and its evaluation classifier are prepared (default: the run's own data.root).

Prompts are the captions the run trained on: data/captions.py's templates filled with each class name, num_samples
split evenly over the 10 classes, templates in turn. The samples (decoded through the set's VAE for latent runs)
are scored by the Fashion-MNIST evaluation classifier exactly as stage 1's are (training/evaluate.py): conditional
accuracy of the class the prompt names, and the Frechet distance to real test images over the floor. So pixel and
latent stage-2 runs, and stage 1, are compared on one scale.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv):
    import jax

    from data.captions import FASHION_NAMES, FASHION_TEMPLATES
    from data.prepare import ensure_prepared
    from data.text import get_encoder
    from training.errors import UserError
    from training.evaluate import evaluator_for
    from training.generate import generate, load_weak, text_conds
    from training.sampling import balanced_labels
    from training.text_eval import load_run, parse_args

    keys = {"num_samples": int, "seed": int, "step": int, "cfg_scale": float, "root": str}
    ckpt_dir, kv = parse_args(argv, keys, "usage: python bench/text_class_eval.py <ckpt_dir> [num_samples=1000] "
                                          "[seed=0] [step=N] [cfg_scale=S] [root=DIR]")
    saved, cfg, step, meta, _, ema = load_run(ckpt_dir, kv.get("step"), **(
        {"cfg_scale": kv["cfg_scale"]} if "cfg_scale" in kv else {}))   # the run's own guidance unless given
    n, seed, root = kv.get("num_samples", 1000), kv.get("seed", 0), kv.get("root", str(cfg.data.root))
    fm_meta, fm_dir = ensure_prepared("fashion_mnist", root)
    if list(meta.get("class_names", [])) != list(fm_meta["class_names"]):   # before sampling, not after it
        raise UserError(f"{ckpt_dir} was trained on {meta.get('name')} (classes {meta.get('class_names', [])[:3]}"
                        f" ...), not on Fashion-MNIST captions: this scores data=fashion_mnist_text (or its latents) "
                        f"runs; python -m training.text_eval scores any stage-2 run")
    labels = balanced_labels(n, len(FASHION_NAMES))
    prompts = [FASHION_TEMPLATES[i % len(FASHION_TEMPLATES)].format(FASHION_NAMES[c]) for i, c in enumerate(labels)]
    t = meta["text"]
    text, mask = get_encoder(t["encoder"], t.get("encoder_path")).encode(prompts, int(t["max_tokens"]))
    images = generate(ema, saved["model_spec"], meta, text_conds(text, mask), jax.random.PRNGKey(seed), cfg.sampler,
                      cfg.train, weak=load_weak(ckpt_dir, cfg.sampler, ema, cfg.train))
    res = evaluator_for(fm_meta, fm_dir, root).evaluate(images, labels)
    latent = "vae" in (meta.get("encoder") or {})
    print(json.dumps({"ckpt_dir": ckpt_dir, "step": step, "data": meta["name"], "latent": latent, "seed": seed,
                      "cfg_scale": cfg.sampler.cfg_scale,
                      **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}}))


if __name__ == "__main__":
    from training.cli import one_line_errors

    with one_line_errors():   # a mistake is one `error:` line, as in every script
        main(sys.argv[1:])
