"""A folder of images with one `.npz` per frame (`npz_folder`).

Input: a scene folder, or a folder whose sub-folders (searched recursively) are scenes. A scene
holds `<name>.png|jpg|jpeg|webp` beside `<name>.npz` with `intrinsic` (3, 3) in pixels of that
image (pixel centres at +0.5) and `pose` (4, 4) (or (3, 4)) camera-to-world, OpenCV axes,
optionally `depth` (H, W) planar z (0 = unknown). Frames are ordered by name (natural sort);
an image without its `.npz` (or the reverse) is a bad frame.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from gld.data.formats.common import (
    IMAGE_EXTS, BadSample, Problems, Reader, finish_sequence, make_frame, natural_key, read_bytes,
)
from gld.data.schema import Sequence

__all__ = ["NpzFolderReader"]


class NpzFolderReader(Reader):
    name = "npz_folder"

    def units(self) -> list[Path]:
        return self.scene_folders("*.npz", ".npz camera files")

    def read(self, scene: Path, problems: Problems) -> Iterator[Sequence]:
        scene_id = self.scene_id(scene)
        stems: dict[str, dict] = {}
        for p in scene.iterdir():
            if p.is_file() and (p.suffix.lower() in IMAGE_EXTS or p.suffix == ".npz"):
                kind = "npz" if p.suffix == ".npz" else "image"
                entry = stems.setdefault(p.stem, {})
                if kind in entry:
                    problems.frame(BadSample(f"{scene} (scene {scene_id!r}) frame {p.stem!r}",
                                             f"two images {entry[kind].name} and {p.name}"))
                    entry["dup"] = True
                entry[kind] = p
        frames = []
        for index, stem in enumerate(sorted(stems, key=natural_key)):
            e = stems[stem]
            fwhere = f"{scene} (scene {scene_id!r}) frame {index} ({stem})"
            try:
                if e.get("dup"):
                    continue
                if "image" not in e or "npz" not in e:
                    missing = "image" if "image" not in e else f"{stem}.npz"
                    raise BadSample(fwhere, f"missing {missing} for {stem}")
                frames.append(self._frame(e["image"], e["npz"], index, fwhere))
            except BadSample as err:
                problems.frame(err)
        seq = finish_sequence(scene_id, frames, self.name, problems, str(scene))
        if seq is not None:
            yield seq

    @staticmethod
    def _frame(image: Path, npz: Path, index: int, where: str):
        try:
            with np.load(npz, allow_pickle=False) as z:
                if "intrinsic" not in z or "pose" not in z:
                    raise BadSample(where, f"{npz} needs 'intrinsic' and 'pose', has {sorted(z.files)}")
                K, pose = z["intrinsic"], z["pose"]
                depth = z["depth"] if "depth" in z else None
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise BadSample(where, f"unreadable {npz}: {e}") from None
        return make_frame(read_bytes(image, where), K, pose, index, f"{where} [{image.name}, {npz.name}]",
                          depth=depth)
