"""Geometric Latent Diffusion at scale: the library (README.md "Layout" maps it).

Modules and subpackages: `config` / `configtypes` (the typed config tree composed from each
component's section), `geometry` (pure camera functions), `encoders` (DA3, the frozen geometric
encoder), `checkpoints` (reading published files into the modules; our model folder), `data`
(schema, synthetic world, format converters, shards, streaming), `diffusion` (flow matching,
samplers), `latents` (the latent space over DA3: normalisation statistics, encode / decode,
geometry), `models` (the DiT-DH diffusion transformer and its camera inputs, the RGB decoder),
`eval` (metrics, images, point clouds, reports), `train` (stages, DeepSpeed, checkpoints: the
only DeepSpeed user), `pipeline` (novel view synthesis end to end).
"""
__version__ = "0.1.0"
