"""The format names `launch/prepare_data.py` accepts, each mapped to its reader class."""
from __future__ import annotations

from gld.data.formats.colmap import ColmapReader
from gld.data.formats.common import Reader
from gld.data.formats.hypersim import HypersimReader
from gld.data.formats.nerfstudio import NerfstudioReader
from gld.data.formats.npz_folder import NpzFolderReader
from gld.data.formats.re10k import Re10kChunkReader, Re10kTxtReader
from gld.data.formats.synthetic import SyntheticReader
from gld.data.formats.tartanair import TartanAirReader

__all__ = ["READERS", "make_reader"]

READERS: dict[str, type[Reader]] = {
    "re10k": Re10kChunkReader,
    "re10k_txt": Re10kTxtReader,
    "nerfstudio": NerfstudioReader,
    "dl3dv": NerfstudioReader,
    "colmap": ColmapReader,
    "mipnerf360": ColmapReader,
    "tartanair": TartanAirReader,
    "hypersim": HypersimReader,
    "npz_folder": NpzFolderReader,
    "synthetic": SyntheticReader,
}


def make_reader(name: str, input: str, **options) -> Reader:
    """Reader for format `name`; options are the reader's keyword arguments (None = default)."""
    if name not in READERS:
        raise ValueError(f"unknown format {name!r}; known: {sorted(READERS)}")
    options = {k: v for k, v in options.items() if v is not None}
    return READERS[name](input, **options)
