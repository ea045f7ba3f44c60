"""Shared pieces of the format readers: the bad-data error and policy, image and camera checks.

Every reader turns its source into `gld.data.schema.Sequence` objects whose frames passed
`make_frame`: the image bytes decode to RGB (JPEG / PNG / WebP bytes are kept as they are, so
JPEG sources are never re-encoded), K is a finite zero-skew pinhole matrix in pixels of that
image with a positive focal length and the principal point inside the image, c2w is a finite
rigid OpenCV camera-to-world transform, and depth (if any) is finite, non-negative, of the
image's size. Anything else raises `BadSample` naming the file, scene and frame, or, with
`--skip-bad`, is counted and left out (`Problems`).
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from gld.data.schema import DataError, Frame, Sequence
from gld.geometry.cameras import CameraError, check_cameras

__all__ = [
    "BadSample", "Problems", "Reader", "check_camera", "check_image", "make_frame",
    "finish_sequence", "natural_key", "read_bytes", "scale_intrinsics", "intrinsics",
    "IMAGE_EXTS",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
_KEEP_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}


class BadSample(DataError):
    """Source data that cannot become a correct sample. The message starts with where it is."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}" if where else what)
        self.where, self.what = where, what


@dataclass
class Problems:
    """Bad-data policy: raise at once (default), or with `skip_bad` count and leave out.

    A bad frame is dropped from its sequence; a sequence left with fewer than `min_frames`
    frames, or one whose metadata is bad (missing or unreadable camera file), is dropped whole.
    """

    skip_bad: bool = False
    min_frames: int = 1
    skipped_frames: int = 0
    skipped_sequences: int = 0
    messages: list[str] = field(default_factory=list)
    max_messages: int = 1000

    def _note(self, err: Exception) -> None:
        if len(self.messages) < self.max_messages:
            self.messages.append(str(err))

    def frame(self, err: BadSample) -> None:
        if not self.skip_bad:
            raise err
        self.skipped_frames += 1
        self._note(err)

    def sequence(self, err: BadSample) -> None:
        if not self.skip_bad:
            raise err
        self.skipped_sequences += 1
        self._note(err)

    def summary(self) -> dict:
        return {"skipped_frames": self.skipped_frames,
                "skipped_sequences": self.skipped_sequences}


class Reader:
    """Base of the format readers.

    `units()` lists the work units (scenes, or chunk files holding several scenes) so that a
    progress bar knows its total; `read(unit, problems)` yields the unit's sequences.
    """

    name = ""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.exists():
            raise BadSample(str(self.root), f"{self.name} input does not exist")

    def units(self) -> list:
        raise NotImplementedError

    def scene_folders(self, marker: str, what: str) -> list[Path]:
        """Units of the formats whose scenes are folders holding `marker` (a glob pattern):
        the input itself when it holds one, else every folder below it that does, in natural
        order; BadSample naming `what` when there is none."""
        if any(p.is_file() for p in self.root.glob(marker)):
            return [self.root]
        scenes = sorted({p.parent for p in self.root.rglob(marker) if p.is_file()},
                        key=lambda p: natural_key(str(p)))
        if not scenes:
            raise BadSample(str(self.root), f"no {what} found")
        return scenes

    def scene_id(self, scene: Path) -> str:
        """A scene folder's id: its path below the input (its name when it is the input)."""
        return scene.name if scene == self.root else scene.relative_to(self.root).as_posix()

    def read(self, unit, problems: Problems) -> Iterator[Sequence]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sequence]:
        problems = Problems()
        for unit in self.units():
            yield from self.read(unit, problems)


def natural_key(s: str) -> list:
    """Sort key that orders 'frame_2' before 'frame_10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def read_bytes(path: Path, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSample(where, f"missing file {path}") from None
    except OSError as e:
        raise BadSample(where, f"cannot read {path}: {e}") from None


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)


def scale_intrinsics(K: np.ndarray, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
    """K for the whole image resized from (H, W) to (H', W') (pixel centres at +0.5)."""
    (h0, w0), (h1, w1) = old_hw, new_hw
    out = np.array(K, dtype=np.float64, copy=True)
    out[0] *= w1 / w0
    out[1] *= h1 / h0
    return out


def check_image(data: bytes, where: str) -> tuple[bytes, tuple[int, int], Optional[np.ndarray]]:
    """Fully decode `data`; returns (bytes to store, (H, W), the RGB array if re-encoded).

    JPEG / PNG / WebP RGB bytes are returned unchanged. Other modes (grey, RGBA, palette) or
    formats are converted to RGB and re-encoded as PNG (lossless for the RGB content).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample(where, f"image does not decode ({type(e).__name__}: {e})") from None
    h, w = img.height, img.width
    if h < 1 or w < 1:
        raise BadSample(where, f"empty image {w}x{h}")
    if img.format in _KEEP_FORMATS and img.mode == "RGB":
        return data, (h, w), None
    rgb = np.asarray(img.convert("RGB"))
    return encode_png(rgb), (h, w), rgb


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_camera(K: np.ndarray, c2w: np.ndarray, size: tuple[int, int],
                 where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one frame's camera (`gld.geometry.check_cameras`; a (3, 4) pose gains its last
    row); returns float64 copies (K (3, 3) pixels, c2w (4, 4))."""
    K = np.array(K, dtype=np.float64)
    c2w = np.array(c2w, dtype=np.float64)
    if c2w.shape == (3, 4):
        c2w = np.concatenate([c2w, [[0, 0, 0, 1]]], axis=0)
    try:
        check_cameras(c2w, K, size)
    except CameraError as e:
        raise BadSample(where, e.what) from None
    return K, c2w


def check_depth(depth: np.ndarray, size: tuple[int, int], where: str) -> np.ndarray:
    depth = np.asarray(depth)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.shape != tuple(size):
        raise BadSample(where, f"depth shape {depth.shape} differs from the image (H, W)={size}")
    depth = depth.astype(np.float32)
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise BadSample(where, "depth has non-finite or negative values (0 marks unknown)")
    return depth


def make_frame(image: bytes, K: np.ndarray, c2w: np.ndarray, index: int, where: str,
               depth: Optional[np.ndarray] = None, timestamp: Optional[int] = None,
               size: Optional[tuple[int, int]] = None) -> Frame:
    """Validated `Frame`. `size` (H, W) skips the decode when the caller already checked it."""
    if size is None:
        image, size, _ = check_image(image, where)
    K, c2w = check_camera(K, c2w, size, where)
    if depth is not None:
        depth = check_depth(depth, size, where)
    return Frame(image=image, K=K, c2w=c2w, index=int(index), depth=depth,
                 timestamp=None if timestamp is None else int(timestamp))


def finish_sequence(scene_id: str, frames: list[Frame], source: str, problems: Problems,
                    where: str) -> Optional[Sequence]:
    """The sequence, or None (counted) when bad frames left it shorter than `min_frames`."""
    if len(frames) >= max(problems.min_frames, 1):
        return Sequence(scene_id=scene_id, frames=frames, source=source)
    problems.sequence(BadSample(where, f"only {len(frames)} usable frames "
                                f"(need {max(problems.min_frames, 1)})"))
    return None


def fit_intrinsics(K: np.ndarray, declared_hw: tuple[int, int], size: tuple[int, int],
                   where: str, declared: str, image: object) -> np.ndarray:
    """K given for a `declared_hw` (H, W) image, scaled to the image actually read (`size`);
    refuses sizes that are not a whole-image resize. `declared` names the source of the size
    in messages (e.g. "camera 1", "transforms.json")."""
    h0, w0 = declared_hw
    if w0 <= 0 or h0 <= 0:
        raise BadSample(where, f"{declared} has a non-positive image size {w0}x{h0}")
    if (h0, w0) == tuple(size):
        return K
    sx, sy = size[1] / w0, size[0] / h0
    if abs(sx / sy - 1) > 0.02:
        raise BadSample(where, f"image {image} is {size[1]}x{size[0]} but {declared} says "
                        f"{w0}x{h0}: "
                        f"not a whole-image resize")
    return scale_intrinsics(K, (h0, w0), size)


def undistorted(data: bytes, rgb: Optional[np.ndarray], K: np.ndarray, dist: dict,
                where: str) -> bytes:
    """Image bytes with OpenCV-model distortion removed (PNG), or `data` unchanged (bit-exact)
    when every coefficient is zero; K stays the same."""
    from gld.data.formats.undistort import is_zero, undistort_image

    if is_zero(dist):
        return data
    if not np.isfinite(list(dist.values())).all():
        raise BadSample(where, f"non-finite distortion {dist}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise BadSample(where, f"non-positive focal length fx={K[0, 0]}, fy={K[1, 1]}")
    rgb = decode_rgb(data) if rgb is None else rgb
    return encode_png(undistort_image(rgb, K, dist))
