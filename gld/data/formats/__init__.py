"""Converters from public multi-view dataset formats to the stored `Sequence` schema.

One small module per format; each reader lists its work units (`units()`, for the progress
bar) and yields validated `gld.data.schema.Sequence`s (`read(unit, problems)`). Conventions of
every format and the exact files read are in each module's docstring. `convert()` drives a
reader into `gld.data.writers.write_dataset` (atomic output); `launch/prepare_data.py` is its
command line. The name -> reader table is `READERS` (registry.py).

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

from gld.data.formats.common import BadSample, Problems, Reader
from gld.data.formats.convert import convert, iter_sequences
from gld.data.formats.registry import READERS, make_reader

__all__ = ["READERS", "make_reader", "convert", "iter_sequences", "BadSample", "Problems",
           "Reader"]
