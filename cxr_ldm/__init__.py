"""cxr-ldm: text-conditioned latent diffusion for chest X-rays in JAX/Flax."""
from cxr_ldm.io.components import load_component, save_component
from cxr_ldm.pipeline import Pipeline

__all__ = ["Pipeline", "load_component", "save_component"]
