"""The built-in procedural world (`synthetic`, gld/data/synthetic.py) as a converter input.

The input is not a path but a spec `key=value[,key=value...]` with keys `scenes` (4),
`frames` (32), `size` (`HxW`, 256x256), `seed` (0), `format` (png | jpeg), `depth` (1 | 0),
`start` (0); e.g. `scenes=100,frames=24,size=256x256,seed=3`. The world already produces
OpenCV c2w, pixel K and planar depth, so nothing is converted; frames are still checked.
"""
from __future__ import annotations

from typing import Iterator

from gld.data.formats.common import BadSample, Problems, Reader, finish_sequence, make_frame
from gld.data.schema import Sequence

__all__ = ["SyntheticReader", "parse_spec"]

_DEFAULTS = {"scenes": "4", "frames": "32", "size": "256x256", "seed": "0", "format": "png",
             "depth": "1", "start": "0"}


def parse_spec(spec: str) -> dict:
    opts = dict(_DEFAULTS)
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in _DEFAULTS:
            raise BadSample(f"synthetic spec {spec!r}", f"expected key=value with keys "
                            f"{sorted(_DEFAULTS)}, got {part!r}")
        opts[key] = value
    size = opts["size"].lower().split("x")
    if len(size) != 2 or not all(s.strip().isdigit() and int(s) > 0 for s in size):
        raise BadSample(f"synthetic spec {spec!r}", f"size must be HxW in pixels like "
                        f"256x256, got {opts['size']!r}")
    try:
        out = {"scenes": int(opts["scenes"]), "frames": int(opts["frames"]),
               "size": (int(size[0]), int(size[1])), "seed": int(opts["seed"]),
               "format": opts["format"], "depth": opts["depth"] not in ("0", "false", "no"),
               "start": int(opts["start"])}
    except ValueError as e:
        raise BadSample(f"synthetic spec {spec!r}", f"bad value: {e}") from None
    if out["format"] not in ("png", "jpeg"):
        raise BadSample(f"synthetic spec {spec!r}", "format must be png or jpeg")
    return out


class SyntheticReader(Reader):
    name = "synthetic"

    def __init__(self, root: str = ""):
        self.root = root  # a spec, not a path
        self.spec = parse_spec(root)

    def units(self) -> list[int]:
        s = self.spec
        return list(range(s["start"], s["start"] + s["scenes"]))

    def read(self, index: int, problems: Problems) -> Iterator[Sequence]:
        from gld.data.synthetic import synthetic_sequence

        s = self.spec
        seq = synthetic_sequence(s["seed"], index, s["frames"], s["size"], s["format"], s["depth"])
        frames = []
        for f in seq.frames:
            try:
                frames.append(make_frame(f.image, f.K, f.c2w, f.index,
                                         f"synthetic scene {seq.scene_id!r} frame {f.index}",
                                         depth=f.depth, timestamp=f.timestamp))
            except BadSample as e:
                problems.frame(e)
        out = finish_sequence(seq.scene_id, frames, self.name, problems, seq.scene_id)
        if out is not None:
            yield out
