"""What a stage-2 run is conditioned on when it samples: prompts through the encoder that prepared its data, and
the check that the data set still holds the caption features the run trained on (sample.py, training/text_eval.py).
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.errors import UserError


def read_prompts(path) -> list[str]:
    """sample.py prompts_file=: one prompt per line, UTF-8; a blank line or text no record could hold is refused in
    one line naming its line (not a prompt of "" sampled 1000 times)."""
    from data.records import check_str

    f = Path(str(path)).expanduser()
    try:   # utf-8-sig: editors on Windows start UTF-8 files with a byte-order mark
        text = f.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"prompts_file={path}: no such file (one prompt per line)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"prompts_file={path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") \
            from None
    except OSError as e:
        raise UserError(f"prompts_file={path} cannot be read ({e.strerror or e})") from None
    lines = text.split("\n")   # not splitlines(): U+2028 and friends may sit inside a prompt
    if lines and lines[-1] == "":
        lines.pop()   # the file's last newline
    prompts = [line.removesuffix("\r") for line in lines]
    if not prompts:
        raise UserError(f"prompts_file={path} holds no prompts: one per line")
    for n, p in enumerate(prompts, 1):
        if not p.strip():
            raise UserError(f"prompts_file={path} line {n} is blank: one prompt per line, no empty lines")
        check_str(p, f"prompts_file={path} line {n}")
    return prompts


class PromptConds:
    """Model conditions of a prompt list made when asked, for images lo..hi-1 at a time (sample.py's parts): the
    caption states of COCO-30k's prompts through T5 (120 x 4096 each) are ~60 GB at once."""

    def __init__(self, enc, prompts: list[str], idx: np.ndarray, max_tokens: int):
        self.enc, self.prompts, self.idx, self.max_tokens = enc, prompts, idx, max_tokens

    def __call__(self, lo: int, hi: int) -> tuple:
        from training.generate import text_conds

        used, back = np.unique(self.idx[lo:hi], return_inverse=True)
        text, mask = self.enc.encode([self.prompts[i] for i in used], self.max_tokens)
        return text_conds(text[back], mask[back])


def prompt_conds(prompt, num_samples: int, meta: dict, data_dir, prompts_file=None) -> tuple[np.ndarray, tuple,
                                                                                               list[str]]:
    """sample.py: prompts (one string or a list; None = up to 8 training captions) -> (prompt index per image, model
    conditions, prompts). Prompts go through the encoder that prepared the data (meta["text"]); num_samples images
    are split as evenly as they go over the prompts, in prompt order (at least one each). prompts_file: a file of
    prompts instead; its conditions are a PromptConds, made a range of images at a time."""
    from data.loader import load_text
    from data.text import get_encoder
    from training.generate import text_conds

    t, max_tokens, n = meta["text"], int(meta["text"]["max_tokens"]), int(num_samples)
    enc = None
    if prompts_file is not None:
        prompts = read_prompts(prompts_file)
    elif prompt is not None:
        # a list from the command line arrives as OmegaConf's ListConfig (a Sequence, not a list)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else None
        # Hydra types prompt=123 / true / null: a caption is text, and str() would invent "None" or "True"
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise UserError("prompt must be a non-empty string or list of strings (quote numbers and words Hydra "
                            "reads as values: 'prompt=\"123\"', or 'prompt=[\"a red apple\",\"true\"]')")
    else:
        n_train = int(meta["splits"]["train"]["num_records"])
        # up to 8 captions spread over the set, and no more than the images asked for (the user named no prompts);
        # only those records are read (not every caption's features)
        c = load_text(meta, data_dir, "train", np.linspace(0, n_train - 1, min(8, n_train, n)).astype(int))
        prompts = c["caption"]
    if prompts_file is not None or prompt is not None:   # the user's prompts, through the set's encoder
        enc = get_encoder(t["encoder"], t.get("encoder_path"))
        long = enc.long_captions(prompts, max_tokens)
        if long:
            print(f"note: {len(long)} of {len(prompts)} prompts are longer than data.max_tokens={max_tokens} tokens "
                  f"and are cut to it (the model sees only their start), e.g. {long[0][:80]!r}", flush=True)
    if n < len(prompts):
        print(f"num_samples={n} is fewer than the {len(prompts)} prompts: one image per prompt", flush=True)
    idx = np.sort(np.arange(max(n, len(prompts))) % len(prompts))   # exactly num_samples; earlier prompts get the rest
    if prompts_file is not None:
        return idx, PromptConds(enc, prompts, idx, max_tokens), prompts
    text, mask = enc.encode(prompts, max_tokens) if enc is not None else (c["text"], c["mask"])
    return idx, text_conds(text[idx], mask[idx]), prompts


def check_text_matches(saved: dict, meta: dict, ckpt_dir) -> None:
    """A stage-2 run samples and is scored with the caption features of the set it trained on: another text encoder
    or token count (the set re-prepared since) would condition it on features it never saw, or not fit at all."""
    spec, t = saved.get("model_spec", {}), meta.get("text") or {}
    was = {"encoder": (saved.get("data") or {}).get("text_encoder"), "dim": spec.get("text_dim"),
           "max_tokens": spec.get("max_tokens")}
    diff = [f"{k}: run {v!r}, data set now {t.get(k)!r}" for k, v in was.items() if v is not None and t.get(k) != v]
    if diff:
        raise UserError(f"{ckpt_dir} was trained on other caption features than {meta.get('name')} holds now "
                        f"({'; '.join(diff)}): sample on the data the run saw (re-prepare it with the run's "
                        f"data.* settings), or train again")
