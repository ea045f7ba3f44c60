"""The latent space over the frozen DA3 encoder (README.md "Latent space").

config.py: the `latent` config section; space.py: `LatentSpace` (images -> normalised raw
boundary level -> levels and geometry), `Latent`, `build_latent_space`; stats.py:
`LatentStats` (per-level, per-channel mean / variance; normalise, denormalise), its safetensors
files and the release's .pt files; moments.py: `Moments`, the exact Chan merge; ranks.py: the
merge across torch.distributed ranks; collect.py: the statistics pass over a data stream
(`launch/compute_stats.py` runs it).
"""
from gld.latents.config import LatentConfig
from gld.latents.moments import Moments
from gld.latents.space import Latent, LatentSpace, build_latent_space
from gld.latents.stats import EPS, LatentStats, load_stats, save_stats

__all__ = ["EPS", "Latent", "LatentConfig", "LatentSpace", "LatentStats", "Moments",
           "build_latent_space", "load_stats", "save_stats"]
