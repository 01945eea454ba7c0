"""The image autoencoder (a diffusers `AutoencoderKL`, PyTorch) behind latent data sets: load, encode, decode.

**The latent convention (the one place it is defined; important!).** For an image `img` (uint8, H x W x C):

    pixels   p = img / 127.5 - 1                                   in [-1, 1], NCHW float32 for torch
    stored   s = (vae.encode(p).latent_dist.mean - shift_factor) * scaling_factor      (h, w, c) channels-last
    model    x = (s - meta.shift) * meta.scale                     (the loader; meta.shift/scale = per-channel
                                                                     mean and 1/std of `s` over the train split)
and back, for sample grids, W&B images and sample.py:

    s = data.meta.to_stored(x, meta);   latent = s / scaling_factor + shift_factor;   p = vae.decode(latent)
    img = clip(round((p + 1) * 127.5), 0, 255)

`s` is what diffusers pipelines feed their denoisers (SD: `latent * 0.18215`; SD3/Flux: `(latent - shift) * scale`);
we store it (posterior *mean* by default, as the seed and DiT do) and standardise it again per channel, because a
VAE's single global scale is only approximate per channel (and our own small autoencoders are not calibrated at all).
`shift_factor` is 0 for VAEs that have none (SD, SDXL). meta.json keeps the VAE path, scaling_factor and
shift_factor under `encoder`, so decoding needs nothing but the meta.

Known VAEs by name (`PRESETS`): `sd3` (16 latent channels, scaling 1.5305, shift 0.0609), `sdxl` (4, 0.13025),
`sd` (4, 0.18215). A preset resolves to its hub id, or with the suffix `-random` to the same architecture with
random weights (for throughput measurements only: its latents mean nothing). Anything else is a local directory
written by `save_pretrained` (e.g. by train_autoencoder.py) or a hub id; `HF_HUB_OFFLINE=1` is honoured, and a
local directory never touches the network.

Encoding and decoding run in torch, on the CPU unless a device is named, in chunks; they never touch the
accelerator JAX trains on unless asked.
"""

import contextlib
import functools
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np

from training.errors import UserError, first_line
from training.files import weights_fingerprint

_SD_ARCH = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                norm_num_groups=32, act_fn="silu")
PRESETS = {
    "sd3": {"repo": "stabilityai/stable-diffusion-3-medium-diffusers", "subfolder": "vae",
            "config": dict(_SD_ARCH, latent_channels=16, sample_size=1024, scaling_factor=1.5305,
                           shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                           mid_block_add_attention=True)},
    "sdxl": {"repo": "stabilityai/sdxl-vae", "subfolder": None,
             "config": dict(_SD_ARCH, latent_channels=4, sample_size=1024, scaling_factor=0.13025,
                            force_upcast=True)},
    "sd": {"repo": "stabilityai/sd-vae-ft-mse", "subfolder": None,
           "config": dict(_SD_ARCH, latent_channels=4, sample_size=256, scaling_factor=0.18215)},
}
_TORCH_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}

# diffusers loads with low_cpu_mem_usage only through `accelerate`; without it, asking for it prints a multi-line
# warning on every load (every sample grid of a latent run). Ask only when it can be honoured.
_LOW_MEM = importlib.util.find_spec("accelerate") is not None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves. Where it does not (no network, as on this project's machines), the hub
    client would retry five times with a warning each (~30 s) before failing; then only the local cache is tried."""
    import socket

    try:
        socket.getaddrinfo(_hub_host(), 443)
        return True
    except OSError:
        return False


def torch_device(device: str | None = "cpu", what: str = "VAE",
                 knob: str = "vae_device=cpu / DIT_VAE_DEVICE=cpu") -> str:
    """'cpu', 'cuda', 'cuda:1', or 'auto' (cuda when torch sees one); `what` and `knob` name it in the refusal."""
    import torch

    device = (device or "cpu").strip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{what} device {device!r} requested but torch sees no CUDA device (a CPU build of torch?): "
                        f"use {knob}, or install torch's CUDA build (README, Latents)")
    return device


class Vae:
    """An `AutoencoderKL` plus its latent convention (see the module docstring).

    **Arguments:**
    - `model`: the diffusers `AutoencoderKL` (eval mode).
    - `name`: how it was named (local path or hub id or preset), recorded in meta.json.
    - `device`, `dtype`: where and in which torch dtype it runs.
    """

    def __init__(self, model, name: str, device: str = "cpu", dtype: str = "float32"):
        self.model, self.name, self.device, self.dtype = model, name, device, dtype
        cfg = model.config
        self.scaling_factor = float(cfg.get("scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(cfg.get("shift_factor", 0.0) or 0.0)
        self.in_channels = int(cfg["in_channels"])
        self.latent_channels = int(cfg["latent_channels"])
        self.downsample = 2 ** (len(cfg["block_out_channels"]) - 1)

    def latent_shape(self, h: int, w: int) -> tuple[int, int, int]:
        if h % self.downsample or w % self.downsample:
            raise UserError(f"image size {h}x{w} is not divisible by the VAE's downsampling factor {self.downsample}: "
                            f"pick a resolution that is a multiple of {self.downsample}")
        return h // self.downsample, w // self.downsample, self.latent_channels

    def info(self) -> dict:
        """What meta.json records under `encoder`; for a local directory also a fingerprint of its weights
        (training.files.weights_fingerprint), so that a VAE retrained or replaced in place is noticed when the set's
        latents are decoded (vae_for_meta)."""
        info = {"type": "AutoencoderKL", "vae": self.name, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "latent_channels": self.latent_channels,
                "downsample": self.downsample, "image_channels": self.in_channels,
                "convention": "stored = (posterior - shift_factor) * scaling_factor (data/vae.py)"}
        if self.weights:
            info["weights_fingerprint"] = self.weights
        return info

    @functools.cached_property
    def weights(self) -> str | None:
        """training.files.weights_fingerprint of a local VAE's directory (None for a hub id or preset), read once: the
        encode compares it with the set's record at start and writes it into meta.json at the end."""
        return weights_fingerprint(self.name)

    def encode(self, images: np.ndarray, *, batch_size: int = 64, sample: bool = False, seed: int = 0) -> np.ndarray:
        """uint8 images (N, H, W, C) -> stored latents float32 (N, h, w, c), in batches.

        `sample=False` takes the posterior mean (deterministic); `sample=True` draws from it with a seeded
        generator.
        """
        import torch

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != self.in_channels or images.dtype != np.uint8:
            raise UserError(f"the VAE {self.name} encodes uint8 images (N, H, W, {self.in_channels}), got "
                            f"{images.dtype} {images.shape}")
        out = []
        gen = torch.Generator(device=self.device).manual_seed(int(seed)) if sample else None
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.array(images[i:i + batch_size].transpose(0, 3, 1, 2), order="C"))
                x = (x.to(self.device, torch.float32) / 127.5 - 1.0).to(getattr(torch, self.dtype))
                post = self.model.encode(x).latent_dist
                z = post.sample(generator=gen) if sample else post.mean
                z = (z.float() - self.shift_factor) * self.scaling_factor
                out.append(z.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0, 0, self.latent_channels), np.float32)

    def decode(self, stored: np.ndarray, *, chunk: int = 64) -> np.ndarray:
        """Stored latents (N, h, w, c) -> uint8 images (N, H, W, C), in chunks."""
        import torch

        stored = np.asarray(stored, np.float32)
        if stored.ndim != 4 or stored.shape[-1] != self.latent_channels:
            raise UserError(f"the VAE {self.name} decodes latents (N, h, w, {self.latent_channels}), got "
                            f"{stored.shape}")
        out = []
        with torch.inference_mode():
            for i in range(0, len(stored), chunk):
                z = torch.from_numpy(np.array(stored[i:i + chunk].transpose(0, 3, 1, 2), order="C")).to(self.device)
                z = z / self.scaling_factor + self.shift_factor
                p = self.model.decode(z.to(getattr(torch, self.dtype))).sample.float()
                img = torch.clamp(torch.round((p + 1.0) * 127.5), 0, 255).to(torch.uint8)
                out.append(img.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)


# What a VAE directory must hold: weights in safetensors (plain tensors). Pickle formats (diffusers' .bin, torch's
# .pt/.pth/.ckpt) can run arbitrary code when read, so they are refused rather than loaded.
_SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CONVERT = ("convert them to safetensors where you trust them (diffusers: AutoencoderKL.from_pretrained(dir) then "
            "save_pretrained(new_dir, safe_serialization=True)) and give the new directory")


@contextlib.contextmanager
def _diffusers_silent():
    """diffusers logs, in many lines, every load it then fails or completes with random weights (missing keys, a
    file not found); each of those ends here in one UserError line instead, so its log is muted while loading."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _check_class(config, where: str) -> None:
    """diffusers builds whatever config it is given as an AutoencoderKL (a UNet's becomes a random VAE): refuse a
    config that names another model class, or is no config at all, before anything is built from it."""
    if not isinstance(config, dict):
        raise UserError(f"the config.json of {where} is not a JSON object: give a directory written by "
                        "AutoencoderKL.save_pretrained (e.g. by train_autoencoder.py)")
    cls = config.get("_class_name")
    if cls is not None and cls != "AutoencoderKL":
        raise UserError(f"{where} holds a {cls} (config.json _class_name), not an AutoencoderKL VAE: give the "
                        "directory of an AutoencoderKL (for a whole pipeline, its vae/ subfolder)")


def _load_error(e: Exception) -> str:
    """The informative line of a load error: torch's state-dict errors put it after a heading line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return first_line(RuntimeError(lines[1]), 160)
    return first_line(e, 160)


def _from_pretrained(source: str, where: str, **kw):
    """`AutoencoderKL.from_pretrained` that reads safetensors only and refuses weights that do not fit the config
    (diffusers would otherwise initialise what is missing at random and only warn)."""
    from diffusers import AutoencoderKL

    with _diffusers_silent():
        model, info = AutoencoderKL.from_pretrained(source, use_safetensors=True, output_loading_info=True,
                                                    low_cpu_mem_usage=_LOW_MEM, **kw)
    bad = {k: info.get(k) or [] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if any(bad.values()):
        said = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {v[0] if isinstance(v[0], str) else v[0][0]})"
                         for k, v in bad.items() if v)
        raise UserError(f"the weights of {where} do not fit the AutoencoderKL its config.json describes ({said}): "
                        "give the unchanged directory that save_pretrained wrote for this VAE")
    return model


def _build(name: str):
    from diffusers import AutoencoderKL

    key = name.strip()
    if key.endswith("-random") and key[: -len("-random")] in PRESETS:
        import torch

        torch.manual_seed(0)
        return AutoencoderKL.from_config(PRESETS[key[: -len("-random")]]["config"])
    path = Path(key).expanduser()
    if path.is_dir():
        return _build_local(path)
    if key.startswith((".", "/", "~")) or os.sep in key and key.count("/") != 1:
        raise UserError(f"VAE directory {key} does not exist")
    repo, sub = (PRESETS[key]["repo"], PRESETS[key]["subfolder"]) if key in PRESETS else (key, None)
    where = f"{repo}{'/' + sub if sub else ''}"
    unreachable = not _offline() and not _hub_resolves()
    local_only = _offline() or unreachable
    try:
        with warnings.catch_warnings():   # diffusers passes an argument the hub client has deprecated: not ours to fix
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            with _diffusers_silent():
                config = AutoencoderKL.load_config(repo, subfolder=sub, local_files_only=local_only)
            _check_class(config, f"VAE {key!r} ({where})")
            return _from_pretrained(repo, f"VAE {key!r} ({where})", subfolder=sub, local_files_only=local_only)
    except UserError:
        raise
    except Exception as e:   # hub/network/cache errors come in many types; all mean "not available here"
        if "Error(s) in loading state_dict" in str(e):   # the files came, but they are not this config's weights
            raise UserError(f"the weights of VAE {key!r} ({where}) do not fit its config.json ({_load_error(e)}): "
                            "it is not a usable AutoencoderKL; pass another VAE") from None
        how = ("HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache" if _offline()
               else f"no local directory of that name, the hub ({_hub_host()}) cannot be reached from here, and it "
                    f"is not in the Hugging Face cache" if unreachable
               else "no local directory of that name, and the hub could not provide it")
        unsafe = " (only safetensors weights are read)" if "safetensors" in str(e) else ""
        raise UserError(f"cannot load VAE {key!r} ({where}): {how}{unsafe} ({type(e).__name__}: {first_line(e, 120)}). "
                        "Pass a local save_pretrained directory, download it where there is internet, or train one "
                        "with `python train_autoencoder.py`") from None


def _build_local(path: Path):
    """A save_pretrained directory, checked before diffusers builds anything from it (class, safetensors weights)
    and after (weights that fit); every problem with it is one UserError line."""
    import json

    if not (path / "config.json").is_file():
        hint = (f" (it looks like a pipeline: give its VAE, {path / 'vae'})" if (path / "vae" / "config.json").is_file()
                else "")
        raise UserError(f"VAE directory {path} has no config.json{hint}: give a directory written by "
                        "AutoencoderKL.save_pretrained (e.g. by train_autoencoder.py)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path / 'config.json'} ({first_line(e, 120)}): give a directory written by "
                        "AutoencoderKL.save_pretrained (e.g. by train_autoencoder.py)") from None
    _check_class(config, f"VAE directory {path}")
    if not any((path / n).is_file() for n in _SAFE_WEIGHTS):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickled:
            raise UserError(f"VAE directory {path} holds its weights only in pickle format ({pickled[0]}), which can "
                            f"run code when loaded and is not read: {_CONVERT}")
        raise UserError(f"VAE directory {path} has no {_SAFE_WEIGHTS[0]}: give a directory written by "
                        "AutoencoderKL.save_pretrained (e.g. by train_autoencoder.py)")
    try:
        return _from_pretrained(str(path), f"VAE directory {path}", local_files_only=True)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:   # unreadable, truncated or foreign files
        raise UserError(f"cannot load the VAE in {path} ({_load_error(e)}): give the unchanged directory that "
                        "AutoencoderKL.save_pretrained wrote") from None


@functools.lru_cache(maxsize=4)
def load_vae(name: str, device: str | None = "cpu", dtype: str = "float32") -> Vae:
    """A `Vae` from a local directory, hub id, or preset name (`sd3`, `sdxl`, `sd`, or `<preset>-random`).

    **Arguments:**
    - `name`: as above; a local directory is read with `local_files_only=True`.
    - `device`: torch device (`cpu`, `cuda`, `auto`); default CPU, so JAX keeps the accelerator.
    - `dtype`: torch compute dtype (`float32`, `float16`, `bfloat16`); latents are always returned as float32.
    """
    import torch

    if dtype not in _TORCH_DTYPES:
        raise UserError(f"VAE dtype {dtype!r} unknown: use one of float32, float16, bfloat16")
    dev = torch_device(device)
    model = _build(str(name)).eval().to(dev)
    if _TORCH_DTYPES[dtype] != "float32":
        model = model.to(getattr(torch, _TORCH_DTYPES[dtype]))
    name = str(Path(name).expanduser().resolve()) if Path(str(name)).expanduser().is_dir() else str(name)
    return Vae(model, name, dev, _TORCH_DTYPES[dtype])


def is_latent(meta: dict) -> bool:
    """True for a data set of VAE latents (meta.json names its VAE under `encoder`)."""
    enc = meta.get("encoder")
    return isinstance(enc, dict) and "vae" in enc


def vae_for_meta(meta: dict, device: str | None = None) -> Vae:
    """The VAE that made a latent data set (named in meta.json), checked against the recorded convention and weights.

    `device` defaults to `$DIT_VAE_DEVICE` or the CPU. `$DIT_VAE_DIR` names where that VAE is now when it moved (a
    set and its VAE copied to another machine): that directory is used instead, if its weights are the ones recorded.
    """
    enc = meta.get("encoder") or {}
    if not isinstance(enc, dict) or "vae" not in enc:
        raise UserError(f"data set {meta.get('name')!r} is not a latent data set (meta.json has no encoder.vae)")
    name, moved = meta.get("name"), os.environ.get("DIT_VAE_DIR")
    redo = ("put that VAE back or, if it is elsewhere now, name its directory with DIT_VAE_DIR=<dir> (its weights "
            "are checked against the set's), or re-encode the set with the VAE you have (prepare_data.py source=... "
            "vae=... out=<the set> force=true) and train on it anew")
    device = torch_device(device or os.environ.get("DIT_VAE_DEVICE", "cpu"), knob="DIT_VAE_DEVICE=cpu")
    where, recorded = enc["vae"], enc.get("weights_fingerprint")
    held = weights_fingerprint(where) if recorded else None   # what the weights at `where` are, read once
    if moved and recorded and held == recorded:
        moved = None   # this set's VAE is where it was: DIT_VAE_DIR (exported for another set, say) is not needed
    if moved:
        if not recorded:   # nothing to check a copy against: the recorded name only
            raise UserError(f"DIT_VAE_DIR={moved}: data set {name!r} records no fingerprint of its VAE's weights "
                            f"({enc['vae']}: a hub id, or a set encoded before they were recorded), so a copy "
                            f"elsewhere cannot be checked: unset DIT_VAE_DIR")
        where = str(Path(moved).expanduser())
        held = weights_fingerprint(where)
    try:   # the device first: a CUDA request under a CPU torch is this host's setting, not a VAE to put back
        vae = load_vae(where, device)
    except UserError as err:
        looked = f" (looked for at DIT_VAE_DIR={moved})" if moved else ""
        raise UserError(f"data set {name!r} was encoded with the VAE {enc['vae']}{looked}, which cannot be loaded "
                        f"now ({err}): {redo}") from None
    for k in ("scaling_factor", "shift_factor", "latent_channels"):
        if k in enc and not np.isclose(float(getattr(vae, k)), float(enc[k])):
            raise UserError(f"the VAE at {where} has {k} {getattr(vae, k)} but data set {name!r} was encoded with "
                            f"{enc[k]}: " + ("DIT_VAE_DIR names another VAE; point it at a copy of the set's, or "
                                             "unset it" if moved else f"the VAE changed since; {redo}"))
    if recorded and held != recorded:
        if moved:
            raise UserError(f"DIT_VAE_DIR={moved} holds other weights than the VAE that encoded data set {name!r} "
                            f"({enc['vae']}): its latents would decode wrongly; point it at a copy of that VAE, or "
                            f"unset it")
        raise UserError(f"the weights of the VAE at {where} changed since data set {name!r} was "
                        f"encoded (retrained or replaced in place): its latents would decode wrongly; {redo}")
    return vae


def decode_to_uint8(x_model, meta: dict, *, chunk: int = 64, device: str | None = None) -> np.ndarray:
    """Model-space latents (N, h, w, c) of a latent data set -> uint8 images (N, H, W, C) via its VAE."""
    from data.meta import to_stored

    return vae_for_meta(meta, device).decode(to_stored(x_model, meta), chunk=chunk)
