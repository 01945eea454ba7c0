"""The values each config key accepts, checked for every script right after composing (training/cli.py).

The YAML configs carry no schema, so `train.ema_decay=1.5`, `optim.b2=-0.5` or `train.precision=fp32` composed fine
and then trained silently on nonsense, went NaN and blamed the checkpoint, or failed deep inside with a traceback
(development_log.md, twenty-ninth session: a sweep of 277 command-line mistakes). Each rule here names the key, what
it takes, and is applied to the whole composed config (a preset edited by hand is checked too). A key absent from a
config (another script's, or a config saved before the key existed) is skipped; null passes only where the rule
says so. Checks that need more than one key or the data (batch vs split size, guide step vs steps) stay where they
were, in the code that reads the keys.
"""

import math

from training.errors import UserError, is_whole
from training.flow import PREDICTIONS, TIME_SAMPLINGS
from training.optim import OPTIMIZERS
from training.sampling import GUIDANCE, SOLVERS
from training.step import DTYPES


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


SEED_MAX = 2**32 - 1   # jax.random.PRNGKey keeps 32 bits: 2**32 gave seed 0's key, larger ones an OverflowError


def whole(lo: int, null: bool = False, hi: float = math.inf):
    text = f"a whole number >= {lo}" + ("" if hi == math.inf else f" and <= {hi}") + (", or null" if null else "")
    return (lambda v: (null and v is None) or is_whole(v, lo, hi)), text


def real(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
         null: bool = False):
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    text = ("a number" if (lo, hi) == (-math.inf, math.inf) else
            f"a number > {lo}" if hi == math.inf and lo_open else
            f"a number >= {lo}" if hi == math.inf else f"a number in {left}{lo}, {hi}{right}")
    ok = lambda v: _num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return (lambda v: (null and v is None) or ok(v)), text + (", or null" if null else "")


def choice(*options, null: bool = False):
    shown = " | ".join("null" if o is None else str(o).lower() if isinstance(o, bool) else str(o) for o in options)
    return (lambda v: (null and v is None) or (isinstance(v, (str, bool)) and v in options)), f"one of {shown}" + (
        " | null" if null else "")


def pair(null: bool = True):
    ok = lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(b) for b in v) and 0 <= v[0] <= v[1] <= 1
    return (lambda v: (null and v is None) or ok(v)), "[lo, hi] with 0 <= lo <= hi <= 1" + (", or null" if null else "")


def path(null: bool = False):
    """A file or directory name: a non-empty string (null only where the key says so)."""
    return (lambda v: (null and v is None) or (isinstance(v, str) and v.strip() != "")), \
        "a path" + (", or null" if null else "")


def whole_list(lo: int = 1):
    return (lambda v: isinstance(v, list) and all(is_whole(s, lo) for s in v)), \
        f"a list of whole numbers >= {lo}, e.g. [3,7]"


PROB = real(0.0, 1.0, hi_open=True)          # momenta, decays: [0, 1)
SAMPLER = {   # training configs keep these under `sampler.`; sample.py has them at the top level, null = saved
    "solver": choice(*SOLVERS), "steps": whole(1), "rtol": real(0, lo_open=True),
    "atol": real(0, lo_open=True), "cfg_scale": real(), "cfg_interval": pair(),
    "guidance": choice(*GUIDANCE),
    "apg_eta": real(), "guide_step": whole(1, null=True), "guide_scale": real(), "guide_interval": pair(),
    "shift": real(0, lo_open=True), "noise": real(0), "t_eps": real(0, 1, lo_open=True, hi_open=True, null=True),
    "chunk": whole(1), "opt_scale": choice(True, False), "zero_steps": whole(0)}
TRAINING = {
    "train.steps": whole(1), "train.batch_size": whole(1), "train.lr": real(0, lo_open=True),
    "train.seed": whole(0, hi=SEED_MAX),
    "train.precision": choice(*DTYPES), "train.grad_accum": whole(1),
    "train.prediction": choice(*PREDICTIONS), "train.t_eps": real(0, 1, lo_open=True, hi_open=True),
    "train.time_sampling": choice(*TIME_SAMPLINGS), "train.time_mean": real(),
    "train.time_std": real(0, lo_open=True), "train.time_uniform_frac": real(0, 1),
    "train.time_stratified": choice(True, False), "train.loss_weight_max": real(0, lo_open=True, null=True),
    "train.ckpt_dir": path(), "train.debug_nan_steps": whole_list(), "data.root": path(), "wandb.dir": path(),
    "sampler.guide_ckpt_dir": path(null=True), "train.init_from": path(null=True),
    **{f"data.{k}": path() for k in ("folder", "captions_file", "latents")}, "data.text_encoder_path": path(null=True),
    **{f"mesh.{axis}": (lambda v: is_whole(v, -1) and v != 0, "a whole number >= 1, or -1 (all remaining devices)")
       for axis in ("data", "fsdp")},   # mesh.data=1.5 was truncated to 1 without a word
    "train.cfg_p": real(0, 1, hi_open=True), "train.ema_decay": PROB, "train.ema_warmup": choice(True, False),
    "train.ema_warmup_offset": real(1), "train.stop_at_step": whole(1, null=True),
    "optim.name": choice(*OPTIMIZERS), "optim.schedule": choice("cosine", "wsd", "constant"), "optim.b1": PROB,
    "optim.b2": PROB, "optim.eps": real(0, lo_open=True), "optim.weight_decay": real(0),
    "optim.clip_norm": real(0, lo_open=True), "optim.min_lr_ratio": real(0, 1),
    "optim.decay_frac": real(0, 1, lo_open=True),
    "optim.muon_lr_ratio": real(0, lo_open=True),
    "optim.muon_beta": PROB, "optim.muon_ns_steps": whole(1), "optim.muon_modulation": choice(True, False),
    "model.mlp_ratio": real(0, lo_open=True), "model.mixing": choice("cross", "joint", null=True),
    "model.scan_blocks": choice(True, False),
    "data.workers": whole(0), "data.hflip": choice(True, False), "data.max_tokens": whole(1),
    "data.size": whole(1), "data.limit": whole(1, null=True),
    "eval.at_end": choice(True, False), "eval.num_samples": whole(2),
    "wandb.mode": choice("offline", "online", "disabled"),
    "sampler.guide_fraction": real(0, 1, lo_open=True, hi_open=True),
    **{f"sampler.{k}": rule for k, rule in SAMPLER.items()}}
RULES = {
    "config": TRAINING, "stage2": TRAINING,
    "sample": {"num_samples": whole(1, hi=10_000_000), "seed": whole(0, hi=SEED_MAX), "step": whole(0, null=True),
               "evaluate": choice(True, False), "ckpt_dir": path(), "out": path(), "data_root": path(null=True),
               "prompts_file": path(null=True),
               "guide_ckpt_dir": path(null=True),
               **{k: (lambda v, f=f: v is None or f(v), t + ("" if "null" in t else ", or null"))
                  for k, (f, t) in SAMPLER.items()}},
    "prepare": {"out": path(null=True), "force": choice(True, False), "resolution": whole(1, null=True),
                "batch_size": whole(1), "shard_size": whole(1), "workers": whole(1), "hflip": choice(True, False),
                "vae_device": choice("cpu", "cuda", "auto"), "vae_dtype": choice("float32", "float16", "bfloat16"),
                "latent_dtype": choice("float16", "float32"), "sample_posterior": choice(True, False),
                "data.max_tokens": whole(1), "data.size": whole(1), "data.limit": whole(1, null=True),
                "data.workers": whole(0)},
    "autoencoder": {"out": path(), "latent_channels": whole(1), "layers_per_block": whole(1),
                    "norm_num_groups": whole(1),
                    "kl_weight": real(0), "steps": whole(1), "batch_size": whole(1), "lr": real(0, lo_open=True),
                    "max_minutes": real(0, lo_open=True), "seed": whole(0, hi=SEED_MAX), "threads": whole(1),
                    "log_every": whole(1), "score": choice(True, False),
                    "block_out_channels": (lambda v: isinstance(v, list) and len(v) >= 1 and all(
                        whole(1)[0](c) for c in v), "a non-empty list of whole numbers >= 1, e.g. [16,32]")},
}


def check_values(config_name: str, cfg) -> None:
    """One line naming the first key of `cfg` whose value its rule refuses, what it takes and how to pass it."""
    from omegaconf import OmegaConf

    for key, (ok, text) in RULES.get(config_name, {}).items():
        node = OmegaConf.select(cfg, key, default="<absent>")   # interpolations resolved (data.root ...)
        if isinstance(node, str) and node == "<absent>":
            continue
        value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
        if text.startswith("a path") and isinstance(value, int) and not isinstance(value, bool):
            OmegaConf.update(cfg, key, str(value))   # `train.ckpt_dir=2024`: Hydra reads a number; it names a folder
            continue
        if not ok(value):
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
            raise UserError(f"bad configuration: {key}={shown} is not allowed: {key} takes {text}")
