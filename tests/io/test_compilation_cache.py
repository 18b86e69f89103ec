"""The CLIs' persistent compilation cache: a second process reads what the first compiled; off writes nothing."""
from __future__ import annotations

import os
import subprocess
import sys

_RUN = """
import sys
import jax
from cxr_ldm.io.compilation_cache import enable_compilation_cache

hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                       if event == "/jax/compilation_cache/cache_hits" else None)
print(enable_compilation_cache(sys.argv[1] == "on"))
jax.block_until_ready(jax.jit(lambda x: (x * 3.0 + 1.0).sum())(jax.numpy.arange(4.0)))
print(len(hits))
"""


def _run(switch: str, env: dict) -> tuple[str, int]:
    """(the folder enable_compilation_cache returned, cache hits) of a fresh process that compiles a small program."""
    result = subprocess.run([sys.executable, "-c", _RUN, switch], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert result.returncode == 0, result.stderr
    folder, hits = result.stdout.split()
    return folder, int(hits)


def test_a_second_process_reads_the_programs_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    assert _run("on", {"CXR_LDM_COMPILATION_CACHE": str(cache)}) == (str(cache), 0)
    assert any(cache.iterdir())
    folder, hits = _run("on", {"CXR_LDM_COMPILATION_CACHE": str(cache)})
    assert folder == str(cache) and hits > 0


def test_the_default_folder_is_in_the_user_cache(tmp_path):
    env = {"CXR_LDM_COMPILATION_CACHE": "", "JAX_COMPILATION_CACHE_DIR": "", "XDG_CACHE_HOME": str(tmp_path)}
    folder, _ = _run("on", env)
    assert folder == str(tmp_path / "cxr_ldm" / "jax") and os.listdir(folder)


def test_off_writes_nothing_even_where_jax_is_told_to_cache(tmp_path):
    cache = tmp_path / "cache"
    assert _run("off", {"CXR_LDM_COMPILATION_CACHE": str(cache), "JAX_COMPILATION_CACHE_DIR": str(cache)}) == (
        "None", 0)
    assert not cache.exists()
