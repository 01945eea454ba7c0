"""Entry-point wrapper shared by every script: compose the Hydra config, run, and turn user mistakes into one line.

We compose with Hydra's compose API instead of `@hydra.main` so that a bad override, an unknown preset or a
`UserError` raised anywhere in the run ends in a single line on stderr (exit code 2) rather than a traceback,
and so that no `outputs/` directory or working-directory change happens behind the user's back.
Hydra's own command-line flags (`--cfg job`, `--help`, `-m` ...) still work: those go to `hydra.main`.
"""

import contextlib
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_env(environ, thp_mode: str | None, glibc_version: tuple[int, int] | None) -> dict | None:
    """The environment to re-exec with so that glibc's malloc asks for transparent huge pages, or None.

    Why: XLA:CPU allocates each step's temp buffer (381 MB for the `small` preset) with malloc, above glibc's mmap
    threshold, so every step is a fresh mmap that the kernel faults in 4 KB at a time, zeroing each page: a fifth of
    the CPU step on 2 cores (development_log.md, twenty-third session). With `glibc.malloc.hugetlb=1` (glibc >= 2.35)
    those mappings are madvised as huge pages: +25% images/s, same arithmetic. Nothing to do when the kernel's
    transparent-huge-page mode is `always` (already huge) or `never` (cannot be), or when GLIBC_TUNABLES already
    names the key (set by an earlier exec, or the user's choice: `glibc.malloc.hugetlb=0` turns it off).
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or thp_mode != "madvise":
        return None
    if glibc_version is None or glibc_version < (2, 35):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)
    return env


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else None


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def use_huge_pages() -> None:
    """Re-exec this process once with `huge_pages_env`; tunables are read only at process start. Called by `main`
    for the script being run (and by bench/throughput.py), never from a library or a test: it replaces the process."""
    env = huge_pages_env(os.environ, _thp_mode(), _glibc_version())
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        pass  # could not exec: run as we are, only slower


COMPILE_CACHE_MAX_BYTES = 2 << 30   # least recently used entries go first past this (a `small` train step is ~0.8 MB)
CACHE_OFF = ("", "0", "off", "false", "none", "null")


def compile_cache_dir(environ) -> str | None:
    """Where the scripts keep XLA's compiled programs between runs, or None for no cache of ours.

    Why: every start compiled the train step and the samplers again, also when resuming the same run (13.5 s of a
    `small` start on 2 Zen 3 cores, 4.0 s from the cache; more for larger models). JAX's persistent cache keys each
    program by its HLO, compile options, JAX version, backend and device kind, so a hit is the program that would have
    been compiled (XLA:CPU's loader also refuses, and JAX recompiles, a program built for other CPU features, as
    jax-ml/jax#38445 shows: a home directory shared by different machines costs hits, not crashes; such an
    entry is then rewritten by the machine that failed to load it, `mend_compile_cache`). JAX stores no
    program with a host callback, which is why the samplers check diffrax's result on the host (training.sampling).
    $DIT_COMPILE_CACHE picks the directory (off: none); $JAX_COMPILATION_CACHE_DIR, JAX's own setting, wins over both
    and is left to JAX; the default is $XDG_CACHE_HOME/flow-dit/jax (~/.cache/flow-dit/jax)."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    choice = environ.get("DIT_COMPILE_CACHE")
    if choice is not None:
        return None if choice.strip().lower() in CACHE_OFF else choice
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flow-dit", "jax")


def use_compile_cache() -> None:
    """Turn on JAX's persistent compilation cache in `compile_cache_dir` (called by `main` for the script being run,
    before anything compiles). A directory that cannot be made or written means no cache, not an error."""
    path = compile_cache_dir(os.environ)
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    if not os.access(path, os.W_OK | os.X_OK):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    if importlib.util.find_spec("filelock") is not None:   # JAX needs it to bound the cache: it then evicts the
        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)   # oldest and locks the dir
    mend_compile_cache(path)


def mend_compile_cache(path: str) -> None:
    """What a process killed inside JAX's cache writes leaves behind stops costing every later start.

    JAX 0.10.2 writes `<key>-cache`, then `<key>-atime`, each in place, and never replaces an existing key. Killed
    in the first write, the entry is truncated: it failed to load, with a warning and a fresh compile, at every start.
    It is now deleted when it fails to load, so that compile writes it again. Killed between the two, the access time
    is missing: JAX's size accounting reads every entry's, so every later cache write failed; it gets one here, as old
    as can be, so it goes first. Both reach into JAX's private cache modules (tests/test_compile_cache.py)."""
    try:
        from jax._src import compilation_cache, lru_cache
        load, lru, data, atime = (compilation_cache.get_executable_and_time, lru_cache.LRUCache,
                                  lru_cache._CACHE_SUFFIX, lru_cache._ATIME_SUFFIX)
    except (ImportError, AttributeError):   # another JAX than requirements.txt pins: its cache as it comes
        return
    for entry in Path(path).glob(f"*{data}"):
        stamp = entry.with_name(entry.name.removesuffix(data) + atime)
        if not stamp.exists():
            with contextlib.suppress(OSError):
                stamp.write_bytes((0).to_bytes(8, "little"))
    if getattr(load, "deletes_what_fails", False):
        return

    def get_executable_and_time(cache_key, *args, **kwargs):
        try:
            return load(cache_key, *args, **kwargs)
        except Exception as err:   # JAX warns and compiles (or raises, if so configured): the entry is no use
            cache = getattr(compilation_cache, "_cache", None)
            if isinstance(cache, lru) and not isinstance(err, TimeoutError):   # (a busy lock is not the entry's)
                for suffix in (data, atime):
                    with contextlib.suppress(OSError):
                        (cache.path / f"{cache_key}{suffix}").unlink(missing_ok=True)
            raise

    get_executable_and_time.deletes_what_fails = True
    compilation_cache.get_executable_and_time = get_executable_and_time


def compose(config_name: str, overrides: list[str]):
    """Compose `configs/<config_name>.yaml` with command-line style overrides (used by scripts and tests)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


# Keys whose presets hold one kind of value while others are valid too; the code that reads them checks the value.
ANY_KIND = ("model.remat",)   # false | true | dots (models.model_spec)


def check_override_types(config_name: str, overrides: list[str], cfg) -> None:
    """An override of the wrong kind (`train.lr=abc`, `data.hflip=maybe`, `train.steps=[1]`) composes fine, since the
    YAML configs carry no schema, and then fails deep inside the run with a traceback (float('abc') at optimizer
    build). Each `key=value` is checked against the kind of that key's value in the presets it was given with
    (the group choices of the same command line): a number where the preset has a number, true/false where it has a
    bool, a list where it has a list. null, new keys (`+key=`) and keys whose preset value is null are not checked."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from training.errors import UserError

    keyed = [(o.split("=", 1)[0], o) for o in overrides if "=" in o]
    keyed = [(k, o) for i, (k, o) in enumerate(keyed) if k not in [k2 for k2, _ in keyed[i + 1:]]]   # last one counts
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}   # data=, model=, optim= ... pick presets
    base = None
    for key, text in keyed:
        if key.startswith(("+", "~")) or key in groups or "@" in key or key in ANY_KIND:
            continue
        if base is None:   # the presets this command line picked, without its value overrides
            base = compose(config_name, [o for k, o in keyed if k.lstrip("+~") in groups])
        default, value = OmegaConf.select(base, key, default=None), OmegaConf.select(cfg, key, default=None)
        if default is None or value is None or isinstance(default, DictConfig):
            continue
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif number(default):
            ok, kind = number(value), "a number"
        elif isinstance(default, ListConfig):
            ok, kind = isinstance(value, ListConfig), "a list"
        else:
            ok, kind = not isinstance(value, (DictConfig, ListConfig)), "a single value"
        if not ok:
            shown = OmegaConf.to_container(default) if isinstance(default, ListConfig) else default
            shown = str(shown).lower() if isinstance(shown, bool) else str(shown).replace(" ", "")
            raise UserError(f"bad configuration: {text} is not {kind} ({key} is {shown} in the preset): pass e.g. "
                            f"{key}={shown}")


def _explain_composition_error(err: Exception) -> str:
    """Hydra's messages are multi-line; keep the first line and add what to do."""
    from training.errors import first_line

    msg, cause = first_line(err, 1000), err.__cause__
    if cause is not None and str(cause).strip():
        msg += f" ({first_line(cause, 1000)})"
    if "Could not find" in msg or "not found in the defaults" in msg or "Could not load" in msg:
        group = re.search(r"'(\w+)/[^']*'", msg)   # Could not find 'model/XL-3': list the model presets
        names = sorted(f.stem for f in (CONFIG_DIR / group.group(1)).glob("*.yaml")) if group else []
        if names:
            return f"{msg}. The {group.group(1)} presets are: {', '.join(names)}"
        return f"{msg}. Available presets are the file names under {CONFIG_DIR}/<group>/."
    if "not in struct" in msg or "Could not override" in msg or "Key" in msg:
        return f"{msg}. Check the key name (see {CONFIG_DIR}), or add a new key with a leading '+'."
    if "LexerNoViableAlt" in msg or "Ambiguous value" in msg or "mismatched input" in msg or "token recognition" in msg:
        # a value with characters Hydra's grammar reserves (a prompt with ’ ( , : or an emoji)
        return (f"{msg}. Quote a value with spaces or special characters inside the argument, e.g. "
                f"'prompt=\"a cat, sitting (left)\"' or 'prompt=[\"man’s shoe\",\"rocket\"]'")
    return msg


@contextlib.contextmanager
def one_line_errors():
    """A UserError raised inside ends the process with its message as one `error:` line and exit code 2 (Ctrl-C: one
    line, 130); so do a required key left unset and an OSError naming a path (a directory that cannot be made or
    written). Anything else is a bug and keeps its traceback. Every entry point runs under this."""
    from training.errors import UserError

    from omegaconf.errors import MissingMandatoryValue

    run = types.SimpleNamespace(cfg=None)   # the composed config, once there: an unwritable path is named by its key
    try:
        yield run
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except MissingMandatoryValue as err:   # a preset's `???`, e.g. data=folder without data.folder=<dir>
        key = getattr(err, "full_key", None) or "a required key"
        print(f"error: {key} must be set: pass {key}=<value> (see the preset under {CONFIG_DIR})", file=sys.stderr,
              flush=True)
        sys.exit(2)
    except OSError as err:
        # A path the user gave that cannot be made or written (data.root, wandb.dir, out= under /proc or a file):
        # errno-carrying errors naming a file. Any other OSError keeps its traceback.
        if err.filename is None or err.errno is None:
            raise
        key = _key_of_path(run.cfg, err.filename)
        print(f"error: {err.strerror}: {err.filename}{f' ({key})' if key else ''}: choose a path that can be "
              "created and written", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def _key_of_path(cfg, filename) -> str | None:
    """`key=value` of the config path that `filename` is or lies under (the most specific one), or None."""
    from omegaconf import OmegaConf

    if cfg is None:
        return None
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:   # noqa: BLE001 - an interpolation that does not resolve: no key to name
        return None
    target, best = Path(os.fsdecode(filename)).absolute(), None

    def walk(node, prefix):
        nonlocal best
        for k, v in (node.items() if isinstance(node, dict) else ()):
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, str) and v.strip():
                path = Path(v).expanduser().absolute()
                if (path == target or path in target.parents) and (best is None or len(str(path)) > len(best[1])):
                    best = (f"{prefix}{k}={v}", str(path))
    walk(tree, "")
    return best and best[0]


HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--package", "-p",
               "--multirun", "-m", "--run", "-r", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
               "-cd", "--version", "--shell-completion", "-sc", "--experimental-rerun")


def raise_open_files_limit(want: int = 65536) -> None:
    """Raise the soft limit on open files towards `want` (never above the hard limit). Grain keeps every shard it
    has read from open, so a set of more shards than the common soft limit of 1024 (4M+ records at 4096 a shard, a
    256 px folder of 1.28M images at 512 MB a shard) failed mid-run with "Too many open files"."""
    try:
        import resource
    except ImportError:   # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):   # a kernel cap below an unlimited hard limit (macOS): keep what we have
            pass


def main(config_name: str, fn) -> None:
    """Run `fn(cfg)` with the composed config; user mistakes end in one line and exit code 2.

    When `fn` belongs to the script being run (`python train_stage1.py ...`), the process first re-execs itself with
    huge pages (`use_huge_pages`) and turns on the compilation cache (`use_compile_cache`); tests that call a
    script's `main` through here in-process are left as they are."""
    if getattr(fn, "__module__", None) == "__main__":
        use_huge_pages()
        use_compile_cache()
        raise_open_files_limit()
    from training.errors import UserError

    argv = sys.argv[1:]
    unknown = [a for a in argv if a.startswith("-") and a.split("=")[0] not in HYDRA_FLAGS]
    if unknown:
        with one_line_errors():
            raise UserError(f"unknown flag {unknown[0]}: settings are key=value overrides (e.g. train.steps=4, "
                            f"see {CONFIG_DIR}); Hydra's own flags are {', '.join(HYDRA_FLAGS[:6])} ...")
    from hydra.errors import HydraException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from training.schema import check_values

    def checked(cfg, overrides=None):
        # An interpolation that cannot resolve (`train.ckpt_dir=${oc.env:SCRATCH}/run` with SCRATCH unset) raises
        # only when a check reads the key: a configuration error too, not a traceback.
        try:
            if overrides is not None:
                check_override_types(config_name, overrides, cfg)
            check_values(config_name, cfg)
        except MissingMandatoryValue:   # a preset's `???`: one_line_errors names the key and how to set it
            raise
        except OmegaConfBaseException as err:
            from training.errors import first_line

            key = getattr(err, "full_key", None) or "a value"
            raise UserError(f"bad configuration: {key}: {first_line(err, 400)}: set what its ${{...}} refers to (an "
                            f"environment variable, a key), or pass the value itself") from err

    if any(a.startswith("-") for a in argv):  # Hydra's own flags: let Hydra handle the whole command line
        import hydra

        def job(cfg):   # under -m each job of the sweep: the same checks and one-line errors as a plain run
            with one_line_errors() as run:
                checked(cfg)
                run.cfg = cfg
                fn(cfg)
        hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)(job)()
        return
    with one_line_errors() as run:
        try:
            cfg = compose(config_name, argv)
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            raise UserError(f"bad configuration: {_explain_composition_error(err)}") from err
        checked(cfg, argv)
        run.cfg = cfg
        fn(cfg)
