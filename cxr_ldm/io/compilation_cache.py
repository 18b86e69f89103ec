"""JAX's persistent compilation cache, which the CLIs (train.py, sample.py, `python -m cxr_ldm.evaluate`) turn
on: a program compiled once is read back from disk by later runs instead of being compiled again.

The folder: $CXR_LDM_COMPILATION_CACHE, else JAX's own JAX_COMPILATION_CACHE_DIR, else
$XDG_CACHE_HOME/cxr_ldm/jax (~/.cache/cxr_ldm/jax). Entries are keyed by the program, the JAX version and
the device, so one folder serves every run and checkpoint; deleting it only costs compile time.
"""
from __future__ import annotations

import os

import jax

ENV_VAR = "CXR_LDM_COMPILATION_CACHE"
# The CLIs' --no-compilation-cache help.
NO_CACHE_HELP = ("compile every program afresh: no JAX persistent compilation cache (default: "
                 f"${ENV_VAR}, else ~/.cache/cxr_ldm/jax)")


def compilation_cache_dir() -> str:
    """The cache folder the CLIs use (see the module docstring), its `~` expanded."""
    folder = (os.environ.get(ENV_VAR) or jax.config.jax_compilation_cache_dir
              or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "cxr_ldm", "jax"))
    return os.path.abspath(os.path.expanduser(folder))


def enable_compilation_cache(enabled: bool = True) -> str | None:
    """Turns JAX's persistent compilation cache on in `compilation_cache_dir()` (returned), or off everywhere,
    JAX_COMPILATION_CACHE_DIR's folder too (None). Call it before the first compilation that should be cached.

    Every program is cached, however small and quick to compile: on a laptop CPU the many programs that
    take a fraction of a second each add up to much of a short run's start-up."""
    jax.config.update("jax_enable_compilation_cache", enabled)
    if not enabled:
        return None
    folder = compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no minimum size
    return folder
