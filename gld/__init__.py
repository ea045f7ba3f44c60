"""Geometric Latent Diffusion at scale: the library.

Subpackages: `config` (typed config tree), `geometry` (pure camera functions); later ones
(encoders, models, diffusion, data, train, eval) are listed in README.md.
"""
__version__ = "0.1.0"
