"""Geometric Latent Diffusion at scale: the library (README.md "Layout" maps it).

Modules and subpackages: `config` / `configtypes` (the typed config tree composed from each
component's section), `geometry` (pure camera functions), `encoders` (DA3, the frozen geometric
encoder), `checkpoints` (reading published files into the modules), `data` (schema, synthetic
world, format converters, shards, streaming), `diffusion` (flow matching, samplers), `latents` (the latent space over DA3:
normalisation statistics, encode / decode, geometry), `models` (the DiT-DH diffusion transformer
and its camera inputs).
"""
__version__ = "0.1.0"
