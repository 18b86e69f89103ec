"""Train the CXR latent diffusion model: python train.py [--config configs/X.py] [--workdir DIR] [--config.a.b=v].

No --config: configs/default.py (phantom data, VAE then LDM, runs on a CPU). Rerunning the same command
resumes from the workdir; SIGTERM saves a checkpoint and exits cleanly. A workdir whose stages were trained
with other settings is refused (exit status 1) unless --retrain_from names the stage to retrain from.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or --distributed on a TPU pod / SLURM
cluster where jax.distributed.initialize() finds them itself.
"""
import difflib
import errno
import os
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
# No default here: absl would load it at import, before jax.distributed.initialize() (`_with_config_file`)
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (default: "
                                          "configs/default.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (default: the config's workdir).")
_RETRAIN_FROM = flags.DEFINE_string(
    "retrain_from", None, "autoencoder | text_pretrain | ldm: when the workdir's stage of that name or a later one "
    "was trained with other settings, delete it and the stages after it and train them again.")
# The multi-process flags are parsed first, apart: jax.distributed.initialize() must run before the config file
# is loaded, since the config asks JAX for its backend (scale_for_accelerators).
_LAUNCH = flags.FlagValues()
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().", flag_values=_LAUNCH)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.", flag_values=_LAUNCH)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=_LAUNCH)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.", flag_values=_LAUNCH)
flags.FLAGS.append_flag_values(_LAUNCH)
_NO_COMPILATION_CACHE = flags.DEFINE_bool(
    "no-compilation-cache", False, "Compile every program afresh: no JAX persistent compilation cache "
    "(default: $CXR_LDM_COMPILATION_CACHE, else ~/.cache/cxr_ldm/jax).")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, jax.distributed.initialize() where asked, and the config file's loading; a bad
    argument ends the program with one `error: ...` line and exit status 2."""
    try:
        argv = _LAUNCH(argv, known_only=True)
    except flags.Error as e:
        _usage_error(" ".join(str(e).split()))
    _initialize_distributed()
    try:
        rest = flags.FLAGS(_with_config_file(argv))
        _CONFIG.value.workdir  # loads the config file, if it was not loaded yet
    except flags.Error as e:  # unknown flag, bad value
        _usage_error(" ".join(str(e).split()))
    except (AttributeError, KeyError) as e:  # --config.a.b=v for a field the config does not have
        _usage_error(_unknown_config_field(argv) or f"--config: {e}")
    except OSError as e:  # the config file cannot be loaded
        _usage_error(f"--config: {str(e).strip().splitlines()[-1].strip()}")
    if len(rest) > 1:
        _usage_error(f"unexpected arguments {rest[1:]}")
    return rest


def _with_config_file(argv: list[str]) -> list[str]:
    """argv with --config=configs/default.py added when it names no config file."""
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        return argv
    return [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]


def _initialize_distributed() -> None:
    """jax.distributed.initialize() when the launch flags ask for several processes."""
    if not (_COORDINATOR.value or _DISTRIBUTED.value):
        return
    import jax
    # CPU processes need gloo for their collectives; on accelerators the setting is unused. Asking JAX for its
    # backend here would start it, which initialize() refuses.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)


def _unknown_config_field(argv: list[str]) -> str | None:
    """Names the first --config.a.b override whose field the config file lacks, with its full path."""
    config_file = _DEFAULT_CONFIG
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            config_file = argv[i + 1]
    path, _, arg = config_file.partition(":")  # ml_collections' "file.py:argument"
    get_config = runpy.run_path(path)["get_config"]
    config = get_config(arg) if arg else get_config()
    for arg in argv[1:]:
        name = arg.split("=", 1)[0].lstrip("-")
        if not name.startswith(("config.", "noconfig.")):
            continue
        node, path = config, "config"
        for part in name.split(".")[1:]:
            part = part.split("[", 1)[0]
            if not hasattr(node, "keys") or part not in node:
                fields = sorted(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(part, fields, n=1)
                return f"unknown config field {path}.{part} in {arg}" + (
                    f" (did you mean {path}.{close[0]}?)" if close else f"; {path} has {fields}")
            node, path = node[part], f"{path}.{part}"
    return None


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv  # parse_flags refused positional arguments
    from cxr_ldm.io.compilation_cache import enable_compilation_cache
    from cxr_ldm.io.run_folder import WorkdirError
    from cxr_ldm.training.config_check import ConfigError
    from cxr_ldm.training.trainer import run
    enable_compilation_cache(not _NO_COMPILATION_CACHE.value)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value or _CONFIG.value.workdir))
    try:
        run(_CONFIG.value, workdir, _RETRAIN_FROM.value)  # SIGTERM: exit 0
    except ConfigError as e:  # checked before any data or model work
        _usage_error(str(e))
    except WorkdirError as e:  # another run holds the workdir, or it holds stages trained otherwise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        print(f"error: no space left on device writing {full.filename or workdir}: free some space and rerun the "
              "same command to resume (checkpoints and exports are written atomically; the last whole ones are kept)",
              file=sys.stderr)
        return 1
    return 0


def _disk_full(error: BaseException | None) -> OSError | None:
    """The ENOSPC OSError that `error` is or was caused by (Orbax and others wrap it), if any."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=parse_flags))
