"""Acceptance: 2N steps straight == N steps, stop, restore, N more -- bitwise (params, EMA, optimizer, next batch)."""

import numpy as np
import pytest

import train_stage1
from conftest import assert_same_state, restore_final, tiny_overrides
from models import build_model
from training.checkpoint import read_config
from training.cli import compose
from training.state import split_keys

N = 4


# Routed: the kept tokens are drawn from (seed, step) inside the step, so they resume too.
@pytest.mark.parametrize("optim,extra", [("adamw", {}), ("muon", {}),
                                         ("muon", {"train.route": "[0,2,0.5]"})],
                         ids=["adamw", "muon", "muon-routed"])
def test_resume_is_bitwise_exact(digits_root, tmp_path, optim, extra):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    # hflip on: the augmentation randomness must resume too.
    common = {"data.hflip": True, "train.lr": 3e-3, "optim": optim, **extra}
    train_stage1.main(compose("config", tiny_overrides(digits_root, straight, steps=2 * N, **common)))
    r1 = train_stage1.main(compose("config", tiny_overrides(digits_root, split, steps=2 * N,
                                                            **common, **{"train.stop_at_step": N})))
    assert r1["step"] == N and "stopped" in r1
    assert read_config(split)[1] == N
    train_stage1.main(compose("config", tiny_overrides(digits_root, split, steps=2 * N, **common,
                                                       **{"train.is_restore": True})))
    a, b = (restore_final(d, digits_root) for d in (straight, split))
    assert int(a[0].step) == 2 * N
    assert_same_state(a, b)   # params, EMA, optimizer state, key, counters and the next batch, bitwise
    a = a[0]
    # And training actually moved the weights (a resume that restored nothing would fail above, but be sure).
    init = build_model(read_config(straight)[0]["model_spec"], key=split_keys(0)[0])
    assert not np.array_equal(np.asarray(init.final.weight), np.asarray(a.params.final.weight))
