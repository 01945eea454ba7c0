"""The project's own error type for mistakes a user can make (bad input, bad config, missing files).

Entry scripts catch `UserError` and print its message as one line, with no traceback; anything else
is a bug in this project and keeps its traceback.
"""

import logging
import sys


class UserError(Exception):
    """A problem the user can fix; the message says what to do."""


# The end of every refusal of a checkpoint that another version of the code wrote (a parameter tree or a saved model
# spec this code does not build): one wording, so the advice cannot drift between the places that detect it.
OTHER_VERSION = "it was written by another version of the code; sample or resume it with that version"


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when empty), cut to `limit` characters: what a
    one-line refusal quotes of a library's error."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


STORAGE_REASONS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")


def storage_reason(err: BaseException) -> str | None:
    """Which storage failure a write's error reports, if any: Orbax and ArrayRecord raise these as RuntimeErrors or
    other types whose message carries the OS's words, not as OSErrors."""
    return next((r for r in STORAGE_REASONS if r in str(err)), None)


def is_whole(value, minimum: int = 1, maximum: float = float("inf")) -> bool:
    """The shared rule for counts, cadences and sizes in configs: an int (not a bool, nor a float such as 4.0 or inf)
    within [minimum, maximum]."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and minimum <= value <= maximum


def check_whole(name: str, value, minimum: int = 1, meaning: str = "") -> int:
    """`value` as an int if is_whole, else one UserError naming the key."""
    if is_whole(value, minimum):
        return int(value)
    raise UserError(f"{name}={value!r} must be a whole number >= {minimum}" + (f" ({meaning})" if meaning else ""))


def check_writable_dir(directory, lead: str, fix: str) -> None:
    """Make `directory` and write a probe file in it, now, before any work that would end by writing there (a
    checkpoint, samples); os.access says yes to root on read-only or virtual file systems such as /proc.
    The refusal is one line: `lead (reason): fix`."""
    import os
    from pathlib import Path

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{lead} ({err.strerror}): {fix}") from err


# What the abandoned reads' errors say: asyncio's closed loop, Orbax's read wrapper, TensorStore's own read error.
ABANDONED = ("Event loop is closed", "Encountered error while reading array index", "_read_array_index_and_device_put",
             " in OCDBT database at ")


def quiet_abandoned_reads() -> None:
    """A restore that fails on damaged files leaves Orbax's other array reads in flight. When they finish after its
    event loop has closed, or are garbage-collected, Python prints their errors as unraisable exceptions and asyncio
    logs "Task / _GatheringFuture / Future exception was never retrieved": tens of traceback lines around our
    one-line message, some before it. They are the failure the restore itself reports; drop exactly those (the texts
    in ABANDONED), from the first restore on, and pass every other unraisable exception and log record through."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_abandoned_reads", False):
        return

    def hook(unraisable):
        if not any(text in str(unraisable.exc_value) for text in ABANDONED):
            previous(unraisable)

    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not ("exception was never retrieved" in record.getMessage()
                            and any(text in record.getMessage() for text in ABANDONED)))
