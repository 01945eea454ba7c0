"""Entry-point wrapper shared by every script: compose the Hydra config, run, and turn user mistakes into one line.

We compose with Hydra's compose API instead of `@hydra.main` so that a bad override, an unknown preset or a
`UserError` raised anywhere in the run ends in a single line on stderr (exit code 2) rather than a traceback,
and so that no `outputs/` directory or working-directory change happens behind the user's back.
Hydra's own command-line flags (`--cfg job`, `--help`, `-m` ...) still work: those go to `hydra.main`.
"""

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def compose(config_name: str, overrides: list[str]):
    """Compose `configs/<config_name>.yaml` with command-line style overrides (used by scripts and tests)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def _explain_composition_error(err: Exception) -> str:
    """Hydra's messages are multi-line; keep the first line and add what to do."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        msg += f" ({str(cause).strip().splitlines()[0]})"
    if "Could not find" in msg or "not found in the defaults" in msg or "Could not load" in msg:
        return f"{msg}. Available presets are the file names under {CONFIG_DIR}/<group>/."
    if "not in struct" in msg or "Could not override" in msg or "Key" in msg:
        return f"{msg}. Check the key name (see {CONFIG_DIR}), or add a new key with a leading '+'."
    return msg


def main(config_name: str, fn) -> None:
    """Run `fn(cfg)` with the composed config; user mistakes end in one line and exit code 2."""
    from training.errors import UserError

    argv = sys.argv[1:]
    if any(a.startswith("-") for a in argv):  # Hydra's own flags: let Hydra handle the whole command line
        import hydra

        hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)(fn)()
        return
    try:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            cfg = compose(config_name, argv)
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            raise UserError(f"bad configuration: {_explain_composition_error(err)}") from err
        fn(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
