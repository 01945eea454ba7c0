
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import tiny_overrides
from faults_helpers import complete_steps
from training.checkpoint import read_config
from training.cli import CONFIG_DIR, compose


def test_defaults_compose_with_the_documented_keys():
    cfg = compose("config", [])
    for key in ("data.name", "model.name", "train.steps", "train.batch_size", "train.lr", "train.ckpt_dir",
                "train.ckpt_every", "train.is_restore", "train.seed", "wandb.mode"):
        assert OmegaConf.select(cfg, key) is not None, key
    assert cfg.data.name == "fashion_mnist" and cfg.wandb.mode == "offline" and cfg.train.is_restore is False


def test_overrides_reach_the_config():
    cfg = compose("config", ["data=digits", "model=tiny", "train.steps=2000", "train.batch_size=128",
                             "wandb.mode=disabled", "model=B-4"])
    assert (cfg.data.name, cfg.model.name, cfg.model.hidden_size, cfg.model.patch_size) == ("digits", "B-4", 768, 4)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.wandb.mode) == (2000, 128, "disabled")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))
def test_every_model_preset_composes(preset):
    cfg = compose("config", [f"model={preset}"])
    assert cfg.model.hidden_size % cfg.model.num_heads == 0


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="lrr"):
        compose("config", ["train.lrr=1"])


@pytest.mark.parametrize("overrides,needle", [
    (["train.lr=abc"], "train.lr=abc is not a number (train.lr is 0.002 in the preset): pass e.g. train.lr=0.002"),
    (["data.hflip=maybe"], "data.hflip=maybe is not true or false"),
    (["train.steps=[1]"], "train.steps=[1] is not a number"),
    (["train.debug_nan_steps=5"], "train.debug_nan_steps=5 is not a list"),
    (["model=tiny", "model.hidden_size=wide"], "model.hidden_size=wide is not a number"),
    (["data=digits", "model=tiny", "train.lr=1", "train.steps=2000", "data.hflip=true", "train.route=null",
      "sampler.cfg_interval=[0.1,0.9]", "sampler.solver=heun", "data.name=other", "model.remat=dots"], None),
    (["model=B-4", "model.remat=false", "train.lr=2e-4", "distributed.enabled=true", "mesh.fsdp=-1"], None)])
def test_override_values_of_the_wrong_kind_are_one_line(overrides, needle, monkeypatch, capsys):
    """The YAML configs carry no schema, so `train.lr=abc` composed fine and failed inside the run with a traceback
    (float('abc') at optimizer build): each key=value is checked against its preset's kind of value first."""
    from training.cli import check_override_types
    from training.errors import UserError

    cfg = compose("config", overrides)
    if needle is None:   # an int where the preset has a float, null, a list where the preset has null: all fine
        check_override_types("config", overrides, cfg)
        return
    with pytest.raises(UserError, match="^bad configuration: ") as e:
        check_override_types("config", overrides, cfg)
    assert needle in str(e.value), str(e.value)
    from faults_helpers import run_cli   # and the real entry point says it, before any work
    assert needle in run_cli(monkeypatch, capsys, overrides)


def test_sample_overrides_are_checked_too():
    from training.cli import check_override_types
    from training.errors import UserError

    good = ["ckpt_dir=/x", "num_samples=10", "cfg_scale=2", "evaluate=true"]
    check_override_types("sample", good, compose("sample", good))
    with pytest.raises(UserError, match="num_samples=ten is not a number"):
        check_override_types("sample", ["num_samples=ten"], compose("sample", ["num_samples=ten"]))


def test_sample_config_composes():
    cfg = compose("sample", ["ckpt_dir=/x", "num_samples=10", "cfg_scale=2.0"])
    assert cfg.num_samples == 10 and cfg.cfg_scale == 2.0


@pytest.mark.parametrize("key,value", [("keep_ckpts", 0), ("keep_ckpts", -1), ("ckpt_every", 0), ("log_every", 0),
                                       ("max_bad_steps", 0), ("sample_every", -1), ("log_every", 2.5),
                                       ("log_every", "inf")])
def test_cadence_settings_are_checked_at_start(key, value, tmp_path):
    """Values that divided by zero, let Orbax delete every checkpoint (keep_ckpts=0) or stopped a healthy run
    (max_bad_steps=0): one line at start-up; sample_every=0 is "no grids" and passes."""
    from training.checkpoint import Checkpointer
    from training.errors import UserError
    from training.settings import check_train_settings

    cfg = compose("config", [f"train.{key}={value}"])
    with pytest.raises(UserError, match=rf"train\.{key}={value} must be a whole number >= "):
        check_train_settings(cfg.train)
    check_train_settings(compose("config", ["train.sample_every=0"]).train)
    if key == "keep_ckpts":   # the checkpointer refuses it too, before creating anything
        with pytest.raises(UserError, match="keep_ckpts"):
            Checkpointer(str(tmp_path / "ck"), keep=value)
        assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("config,overrides,needle", [
    ("config", ["train.precision=fp32"], "train.precision=fp32 is not allowed: train.precision takes one of float32"),
    ("config", ["train.ema_decay=1.5"], "train.ema_decay takes a number in [0.0, 1.0)"),
    ("config", ["optim.b2=-0.5"], "optim.b2=-0.5 is not allowed"),
    ("config", ["optim.eps=0"], "optim.eps=0 is not allowed: optim.eps takes a number > 0"),
    ("config", ["train.steps=0"], "train.steps=0 is not allowed: train.steps takes a whole number >= 1"),
    ("config", ["train.steps=4.5"], "train.steps=4.5 is not allowed"),
    ("config", ["train.lr=-1e-3"], "train.lr=-0.001 is not allowed"),
    ("config", ["train.cfg_p=1.5"], "train.cfg_p=1.5 is not allowed"),
    ("config", ["train.loss_weight_max=-1"], "train.loss_weight_max=-1 is not allowed"),
    ("config", ["train.stop_at_step=soon"], "train.stop_at_step=soon is not allowed"),
    ("config", ["sampler.cfg_interval=0.5"], "sampler.cfg_interval takes [lo, hi]"),
    ("config", ["model.mlp_ratio=0"], "model.mlp_ratio=0 is not allowed"),
    ("config", ["wandb.mode=offlne"], "wandb.mode takes one of offline | online | disabled"),
    ("config", ["eval.num_samples=0"], "eval.num_samples=0 is not allowed"),
    ("config", ["data.workers=-1"], "data.workers=-1 is not allowed"),
    ("stage2", ["model.mixing=concat"], "model.mixing takes one of cross | joint | null"),
    ("stage2", ["data.max_tokens=0"], "data.max_tokens=0 is not allowed"),
    ("sample", ["num_samples=10.5"], "num_samples=10.5 is not allowed"),
    ("sample", ["cfg_scale=abc"], "cfg_scale=abc is not allowed: cfg_scale takes a number, or null"),
    ("sample", ["solver=rk4"], "solver=rk4 is not allowed"),
    ("prepare", ["data=emoji", "data.max_tokens=0"], "data.max_tokens=0 is not allowed"),
    ("prepare", ["vae_device=tpu"], "vae_device=tpu is not allowed: vae_device takes one of cpu | cuda | auto"),
    ("prepare", ["resolution=-8"], "resolution=-8 is not allowed"),
    ("autoencoder", ["block_out_channels=[]"], "block_out_channels=[] is not allowed"),
    ("autoencoder", ["lr=-1"], "lr=-1 is not allowed"),
    ("autoencoder", ["seed=4294967296"], "seed=4294967296 is not allowed"),   # was numpy's ValueError traceback
    # path keys: null or a list reached Path() as a TypeError traceback
    ("sample", ["ckpt_dir=null"], "ckpt_dir=null is not allowed: ckpt_dir takes a path"),
    ("sample", ["guide_ckpt_dir=[1]"], "guide_ckpt_dir takes a path, or null"),
    ("config", ["train.ckpt_dir=null"], "train.ckpt_dir=null is not allowed"),
    ("config", ["data.root=''"], "data.root takes a path"),
    ("config", ["train.debug_nan_steps=[abc]"], "train.debug_nan_steps takes a list of whole numbers"),
    ("config", [], None), ("stage2", [], None), ("sample", [], None), ("prepare", [], None),
    ("autoencoder", [], None),
    ("config", ["model=B-4", "train.stop_at_step=5", "train.loss_weight_max=4", "sampler.t_eps=0.1"], None),
    ("sample", ["cfg_scale=2", "guide_step=800", "solver=heun", "noise=0.3", "step=4"], None)])
def test_values_out_of_range_are_one_line(config, overrides, needle):
    """The presets carry no schema: out-of-range or unknown values (a sweep of 277 command-line mistakes found 40
    that trained silently on nonsense and 35 tracebacks) are refused right after composing, naming the key and what
    it takes; every shipped config passes as it is."""
    from training.errors import UserError
    from training.schema import check_values

    cfg = compose(config, overrides)
    if needle is None:
        check_values(config, cfg)
        return
    with pytest.raises(UserError, match="^bad configuration: ") as e:
        check_values(config, cfg)
    assert needle in str(e.value), str(e.value)


def test_cli_flags_unset_keys_and_unwritable_paths_are_one_line(monkeypatch, capsys, tmp_path):
    """Through the real entry point: an argparse-style flag, a preset's required key left unset (data=folder without
    data.folder) and a path that cannot be created (wandb.dir under a file) each end in one line, exit 2."""
    from faults_helpers import run_cli

    assert "unknown flag --steps: settings are key=value overrides" in run_cli(monkeypatch, capsys, ["--steps", "4"])
    import prepare_data

    for args, key in ([], "folder"), (["data.folder=/tmp"], "captions_file"):   # said before "preparing ..."
        line = run_cli(monkeypatch, capsys, ["data=folder", f"data.root={tmp_path}", *args], script=prepare_data.main,
                       config="prepare", silent=True)
        assert line == f"error: data.{key} must be set: pass data.{key}=<value> (see the preset under {CONFIG_DIR})"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = run_cli(monkeypatch, capsys, ["data=digits", "model=tiny", f"data.root={blocker}", "wandb.mode=disabled",
                                         f"train.ckpt_dir={tmp_path / 'ck'}"])
    assert str(blocker) in line and "choose a path" in line, line
    assert f"(data.root={blocker})" in line, line   # the key too (it read only the path)


def test_a_stage_main_called_from_python_checks_values_too(tmp_path, digits_root):
    """Python callers of train_stage1.main(cfg) skip cli.main; the shared loop applies the same value table before
    it touches the checkpoint directory."""
    import train_stage1
    from conftest import tiny_overrides
    from training.errors import UserError

    cfg = compose("config", tiny_overrides(digits_root, str(tmp_path / "ck")) + ["train.ema_decay=1.5"])
    with pytest.raises(UserError, match="train.ema_decay takes a number in"):
        train_stage1.main(cfg)
    assert not (tmp_path / "ck").exists()


# The command line end to end (train_stage1's entry point): values Hydra types otherwise than the user meant, sweeps.

def _run_ok(monkeypatch, args):
    import train_stage1
    from training import cli

    monkeypatch.setattr(sys, "argv", ["train_stage1.py", *args])
    cli.main("config", train_stage1.main)


def test_numbers_where_names_are_expected(monkeypatch, digits_root, tmp_path):
    """Hydra reads `train.ckpt_dir=2024` and `wandb.name=42` as numbers: the first was refused as not a path, the
    second was a pydantic traceback from W&B's settings. Both are names, and the run goes on with them."""
    monkeypatch.chdir(tmp_path)
    _run_ok(monkeypatch, tiny_overrides(digits_root, "2024", steps=2, **{
        "wandb.mode": "offline", "wandb.dir": 7, "wandb.name": 42, "wandb.project": 123}))
    assert complete_steps(tmp_path / "2024") == [2] and (tmp_path / "7" / "wandb").is_dir()
    saved, _ = read_config(str(tmp_path / "2024"))
    assert saved["train"]["ckpt_dir"] == "2024" and saved["wandb"]["name"] == 42


def test_hydra_multirun_jobs_get_the_same_checks(digits_root, tmp_path):
    """Under -m (Hydra's sweeps) every bad value was a traceback ("Error executing job ..."), exit code 1. A subprocess:
    Hydra's own launcher reconfigures logging, which pytest's captured streams do not survive."""
    import subprocess

    script = Path(__file__).parent.parent / "train_stage1.py"
    p = subprocess.run([sys.executable, str(script), "-m", *tiny_overrides(digits_root, str(tmp_path / "ck")),
                        "train.ema_decay=1.5"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith(("WARNING:absl", "INFO:absl"))]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert lines[0].startswith("error: bad configuration: train.ema_decay=1.5 is not allowed"), lines
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("name, override", [("stage2", "train.init_from=2024"), ("autoencoder", "out=2024"),
                                            ("prepare", "out=7"), ("stage2", "data.text_encoder_path=12")])
def test_a_number_given_for_a_path_is_that_name(name, override):
    """`train.init_from=2024` (or the autoencoder's `out=2024`) reached Path() as an int: a TypeError traceback."""
    from training.schema import check_values

    cfg = compose(name, [override])
    check_values(name, cfg)
    key, value = override.split("=")
    assert OmegaConf.select(cfg, key) == value
