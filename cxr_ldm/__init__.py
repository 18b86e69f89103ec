"""cxr-ldm: text-conditioned latent diffusion for chest X-rays in JAX/Flax."""
from cxr_ldm.io.components import load_component, save_component

__all__ = ["load_component", "save_component"]
