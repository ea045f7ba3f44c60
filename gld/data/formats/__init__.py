"""Converters from public multi-view dataset formats to the stored `Sequence` schema.

One small module per format; each reader lists its work units (`units()`, for the progress
bar) and yields validated `gld.data.schema.Sequence`s (`read(unit, problems)`). Conventions of
every format and the exact files read are in each module's docstring. `convert()` drives a
reader into `gld.data.writers.write_dataset` (atomic output); `launch/prepare_data.py` is its
command line.

| name | module | input |
|---|---|---|
| re10k | re10k | pixelSplat `.torch` chunks (+ index.json) |
| re10k_txt | re10k | RealEstate10K camera txt files + frames/<scene>/<timestamp>.png |
| nerfstudio, dl3dv | nerfstudio | transforms.json scenes (DL3DV images_4) |
| colmap, mipnerf360 | colmap | sparse/0 cameras/images .bin or .txt + images/ |
| tartanair | tartanair | pose_left.txt + image_left/ + depth_left/ |
| hypersim | hypersim | _detail/cam_XX HDF5 poses + tonemap.jpg + depth_meters.hdf5 |
| npz_folder | npz_folder | <name>.png + <name>.npz (intrinsic, pose) |
| synthetic | synthetic | the procedural world (a spec, not a path) |
"""
from __future__ import annotations

from gld.data.formats.colmap import ColmapReader
from gld.data.formats.common import BadSample, Problems, Reader
from gld.data.formats.convert import convert, iter_sequences
from gld.data.formats.hypersim import HypersimReader
from gld.data.formats.nerfstudio import NerfstudioReader
from gld.data.formats.npz_folder import NpzFolderReader
from gld.data.formats.re10k import Re10kChunkReader, Re10kTxtReader
from gld.data.formats.synthetic import SyntheticReader
from gld.data.formats.tartanair import TartanAirReader

__all__ = ["READERS", "make_reader", "convert", "iter_sequences", "BadSample", "Problems",
           "Reader"]

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
