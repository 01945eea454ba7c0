"""What a run's checkpoint directory may hold besides checkpoints: the files the project itself writes there."""

from training.checkpoint import Checkpointer


def test_the_projects_own_evaluation_files_do_not_block_a_resume(tmp_path):
    """Stage 2's caption evaluation (end of training, or `python -m training.text_eval` on a stopped run) writes
    eval-step*.png beside eval-step*.json; a resume into that directory refused it as foreign."""
    ck = tmp_path / "ck"
    ck.mkdir()
    for name in ("eval-step0000010.json", "eval-step0000010.png"):
        (ck / name).write_text("{}")
    (ck / "samples").mkdir()
    c = Checkpointer(str(ck), create=False)
    try:
        c.check_contents()                      # accepted
        (ck / "notes.txt").write_text("someone's file")
        try:
            c.check_contents()
            raise AssertionError("a foreign file was accepted")
        except Exception as err:                # noqa: BLE001 - the UserError naming it
            assert "notes.txt" in str(err) and "eval-step" not in str(err)
    finally:
        c.close()


def test_stage2_sampling_checks_prompts_and_the_caption_features():
    """sample.py on a stage-2 run: a prompt Hydra typed as a number, boolean or null is refused (it was a TypeError,
    or the caption "None"); a data set re-prepared with another encoder or token count since the run is refused in
    one line (it was a broadcasting traceback, or silently other features)."""
    import pytest

    from data.prompts import check_text_matches, prompt_conds
    from training.errors import UserError

    meta = {"name": "emoji", "text": {"encoder": "minilm", "dim": 384, "max_tokens": 16}}
    for bad in (123, 3.5, True, [None, "a cat"], ["a cat", 7]):
        with pytest.raises(UserError, match="quote numbers"):
            prompt_conds(bad, 2, meta, "/nonexistent")
    saved = {"model_spec": {"text_dim": 384, "max_tokens": 16}, "data": {"text_encoder": "minilm"}}
    check_text_matches(saved, meta, "ck")                                   # the features the run saw
    for change, needle in (({"max_tokens": 24}, "max_tokens: run 16, data set now 24"),
                           ({"encoder": "t5gemma", "dim": 384}, "encoder: run 'minilm', data set now 't5gemma'")):
        with pytest.raises(UserError, match=needle):
            check_text_matches(saved, {**meta, "text": {**meta["text"], **change}}, "ck")


def test_thinning_a_weak_step_counts_only_whole_steps_after_it_and_finishes_a_cut_one(tmp_path):
    """Checkpointer.thin_preserved: a preserved (weak-model) step sheds params and opt_state once `keep` whole steps
    follow it. Another thinned step after it is no step a run can resume from, so it does not count; and a thinning
    killed between its two renames (params gone, opt_state left: the largest item) is finished at the next save."""
    def step(n, *items):
        for item in items:
            (tmp_path / str(n) / item).mkdir(parents=True)
        (tmp_path / str(n) / "_CHECKPOINT_METADATA").write_text("{}")

    step(1, "ema", "opt_state", "train")            # a weak step whose thinning was cut between its renames
    step(3, "params", "opt_state", "ema", "train")  # a weak step, whole
    step(5, "ema", "train")                         # a weak step, thinned
    step(7, "params", "opt_state", "ema", "train")  # the latest
    items = lambda n: sorted(p.name for p in (tmp_path / str(n)).iterdir() if p.is_dir())
    with Checkpointer(str(tmp_path), keep=2, preserve=(1, 3, 5)) as ck:
        ck.thin_preserved()
        assert items(1) == ["ema", "train"]                           # 3 and 7 follow it: finished
        assert items(3) == ["ema", "opt_state", "params", "train"]    # only 7 does (5 cannot be resumed from)
    with Checkpointer(str(tmp_path), keep=1, preserve=(1, 3, 5)) as ck:
        ck.thin_preserved()
        assert items(3) == ["ema", "train"] and items(7) == ["ema", "opt_state", "params", "train"]
        assert ck.is_thinned(3) and ck.is_thinned(5) and not ck.is_thinned(7)


def test_a_run_ends_with_its_weak_step_thinned(digits_root, tmp_path):
    """The README's default (weak step 800, keep_ckpts 3, saves at 1000, 1500, 1600) kept step 800 whole: thinning
    ran only after a save, and the third step after it is the run's last save. The run's close thins it too."""
    import train_stage1
    from conftest import tiny_overrides
    from training.cli import compose

    ck = tmp_path / "run"
    train_stage1.main(compose("config", tiny_overrides(digits_root, str(ck), steps=8, **{
        "train.ckpt_every": 2, "train.keep_ckpts": 2, "sampler.guidance": "auto"})))   # weak step 4
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [4, 6, 8]
    assert not (ck / "4" / "params").exists() and not (ck / "4" / "opt_state").exists() and (ck / "4" / "ema").is_dir()
