"""lcm-kit: latent consistency models for diffusers."""

__version__ = "0.1.0"
