"""Test-wide settings: tiny models compile in less time with XLA's backend optimisations off (the
numbers are the same to float rounding), which matters more than run time on a small CPU."""
import os

import pytest

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# PyTorch's OpenMP threads spin while waiting by default, which starves JAX (and other processes)
# on a small shared CPU; the reference models are small.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache_in_tmp(tmp_path_factory):
    """The CLIs (train.py, sample.py, the evaluator) keep their JAX compilation cache in the session's temporary
    folder, not in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CXR_LDM_COMPILATION_CACHE", str(tmp_path_factory.mktemp("jax_compilation_cache")))
        yield
