"""Train the CXR latent diffusion model: python train.py [--config configs/X.py] [--workdir DIR] [--config.a.b=v].

No --config: configs/default.py (phantom data, VAE then LDM, runs on a CPU). Rerunning the same command
resumes from the workdir; SIGTERM saves a checkpoint and exits cleanly. A workdir whose stages were trained
with other settings is refused (exit status 1) unless --retrain_from names the stage to retrain from.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or --distributed on a TPU pod / SLURM
cluster where jax.distributed.initialize() finds them itself.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (default: the config's workdir).")
_RETRAIN_FROM = flags.DEFINE_string(
    "retrain_from", None, "autoencoder | text_pretrain | ldm: when the workdir's stage of that name or a later one "
    "was trained with other settings, delete it and the stages after it and train them again.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    if _COORDINATOR.value or _DISTRIBUTED.value:
        if jax.default_backend() == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    from cxr_ldm.io.run_folder import WorkdirError
    from cxr_ldm.training.trainer import run
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        run(_CONFIG.value, _WORKDIR.value or _CONFIG.value.workdir, _RETRAIN_FROM.value)  # SIGTERM: exit 0
    except WorkdirError as e:  # another run holds the workdir, or it holds stages trained otherwise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
