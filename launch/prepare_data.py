"""Convert a multi-view dataset into GLD shards.

    python launch/prepare_data.py <format> <input> <output> [--writer mds|wds] [--skip-bad]

Formats (conventions in gld/data/formats/<module>.py): re10k (pixelSplat .torch chunks),
re10k_txt (camera txt + frames/<scene>/<timestamp>.png), nerfstudio | dl3dv (transforms.json),
colmap | mipnerf360 (sparse/0 + images/), tartanair, hypersim, npz_folder, synthetic (input =
spec such as `scenes=8,frames=32,size=256x256,seed=0`). The output (local folder or s3://
prefix) appears only when complete (gld_meta.json written last).
"""
from __future__ import annotations

import argparse
import sys

from gld.data.formats import READERS, convert
from gld.data.s3 import S3AccessError
from gld.data.schema import DataError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=sorted(READERS))
    p.add_argument("input", help="input folder (synthetic: a key=value spec)")
    p.add_argument("output", help="output folder or s3:// prefix (must not exist)")
    p.add_argument("--writer", choices=("mds", "wds"), default="mds")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out and count bad frames / sequences instead of failing")
    p.add_argument("--min-frames", type=int, default=1,
                   help="drop (and count) sequences left with fewer usable frames")
    p.add_argument("--max-frames", type=int, default=None,
                   help="split longer sequences into records of this many frames")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("format options")
    g.add_argument("--frames-dir", help="re10k_txt: frames folder (default <input>/frames)")
    g.add_argument("--image-dir", help="nerfstudio: image folder replacing images/ "
                   "(default: file_path, else images_4, images_2, images_8)")
    g.add_argument("--images", help="colmap: image folder, e.g. images_4 (default images)")
    g.add_argument("--split", choices=("all", "train", "test"),
                   help="colmap: test = every 8th image by name (default all)")
    g.add_argument("--camera-csv", help="hypersim: metadata_camera_parameters.csv "
                   "(default <input>/metadata_camera_parameters.csv if present)")
    g.add_argument("--no-depth", action="store_true", help="tartanair / hypersim: skip depth")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    per_format = {
        "re10k_txt": {"frames_dir": a.frames_dir},
        "nerfstudio": {"image_dir": a.image_dir}, "dl3dv": {"image_dir": a.image_dir},
        "colmap": {"images": a.images, "split": a.split},
        "mipnerf360": {"images": a.images, "split": a.split},
        "tartanair": {"depth": False if a.no_depth else None},
        "hypersim": {"camera_csv": a.camera_csv, "depth": False if a.no_depth else None},
    }
    try:
        meta, problems = convert(a.format, a.input, a.output, a.writer, skip_bad=a.skip_bad,
                                 min_frames=a.min_frames, max_frames=a.max_frames,
                                 overwrite=a.overwrite, progress=not a.no_progress,
                                 options=per_format.get(a.format, {}))
    except FileExistsError:
        return _error(f"{a.output} already exists; add --overwrite to replace it")
    except (DataError, S3AccessError, ImportError) as e:  # BadSample is a DataError
        return _error(str(e))
    print(f"wrote {a.output}: {meta.num_sequences} sequences, {meta.num_records} records, "
          f"{meta.num_frames} frames ({meta.writer}); skipped {problems.skipped_frames} frames, "
          f"{problems.skipped_sequences} sequences")
    for msg in problems.messages[:20]:
        print(f"  skipped: {msg}")
    return 0


def _error(message: str) -> int:
    print(f"prepare_data: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
