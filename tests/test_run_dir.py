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
