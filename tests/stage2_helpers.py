"""Shared set-up for the stage-2 tests: a captioned copy of the 8x8 digits (real MiniLM features) and tiny runs."""

from pathlib import Path

import numpy as np

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def prepare_digits_text(root: str, max_tokens: int = 8) -> str:
    """<root>/digits_text: sklearn digits + captions "a handwritten digit <name>" through MiniLM (cached features)."""
    from data.builtin import load_builtin
    from data.meta import META_FILE
    from data.prepare import prepare_arrays
    from data.text import get_encoder

    if (Path(root) / "digits_text" / META_FILE).exists():
        return root
    d = load_builtin("digits")
    enc = get_encoder("minilm")
    splits, text = {}, {}
    for split in ("train", "test"):
        x, y = d[split]
        caps = [f"a handwritten digit {DIGIT_NAMES[int(c)]}" for c in y]
        states, mask = enc.encode(caps, max_tokens)
        splits[split] = (x, y)
        text[split] = {"text": states.astype(np.float16), "mask": mask, "caption": caps}
    prepare_arrays(Path(root) / "digits_text", "digits_text", splits, d["class_names"], d["source"], text=text,
                   text_meta={"encoder": "minilm", "dim": enc.dim, "max_tokens": max_tokens})
    return root


def stage2_overrides(root: str, ckpt_dir: str, steps: int = 8, **extra) -> list[str]:
    """A whole stage-2 run in seconds (same model dims as conftest.tiny_overrides, so stage 1 can initialise it)."""
    o = {"data": "emoji", "data.name": "digits_text", "data.root": root, "model": "tiny_text",
         "train.ckpt_dir": ckpt_dir, "train.steps": steps, "train.batch_size": 32, "train.log_every": 4,
         "train.ckpt_every": 4, "train.sample_every": 0, "train.progress": False, "wandb.mode": "disabled",
         "eval.at_end": False, "optim.warmup_steps": 2, "sampler.steps": 4, "model.hidden_size": 32,
         "model.depth": 2, "model.num_heads": 2}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]
