"""Test-wide settings: tiny models compile in less time with XLA's backend optimisations off (the
numbers are the same to float rounding), which matters more than run time on a small CPU."""
import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# PyTorch's OpenMP threads spin while waiting by default, which starves JAX (and other processes)
# on a small shared CPU; the reference models are small.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
