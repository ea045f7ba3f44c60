"""Reader -> shard writer: the body of `launch/prepare_data.py`.

The output is written by `gld.data.writers.write_dataset`, which builds it in a hidden
temporary folder and renames it into place with `gld_meta.json` last, so a failed or
interrupted conversion (e.g. bad data without `--skip-bad`) leaves no dataset that looks
complete. With `skip_bad` the counts of skipped frames / sequences and the first messages are
recorded in `gld_meta.json` under `extra`.
"""
from __future__ import annotations

from typing import Iterator, Optional

from gld.data.formats.common import BadSample, Problems, Reader
from gld.data.formats.registry import make_reader
from gld.data.schema import DatasetMeta, Sequence
from gld.data.writers import write_dataset

__all__ = ["convert", "iter_sequences"]


def iter_sequences(reader: Reader, problems: Problems, source: Optional[str] = None,
                   progress: bool = False, stats: Optional[dict] = None) -> Iterator[Sequence]:
    """Every sequence of every unit, with a tqdm bar over the units (scenes or chunks)."""
    from tqdm import tqdm

    stats = {} if stats is None else stats
    stats.update(sequences=0, frames=0)
    units = reader.units()
    bar = tqdm(units, desc=f"converting {source or reader.name}", unit="unit",
               disable=not progress, dynamic_ncols=True)
    for unit in bar:
        try:
            for seq in reader.read(unit, problems):
                if source:
                    seq.source = source
                stats["sequences"] += 1
                stats["frames"] += len(seq.frames)
                yield seq
        except BadSample as e:
            problems.sequence(e)
        bar.set_postfix(seq=stats["sequences"], frames=stats["frames"],
                        bad_frames=problems.skipped_frames, bad_seq=problems.skipped_sequences)
    bar.close()


def convert(fmt: str, input: str, output: str, writer: str = "mds", *, skip_bad: bool = False,
            min_frames: int = 1, max_frames: Optional[int] = None, overwrite: bool = False,
            progress: bool = False, options: Optional[dict] = None) -> tuple[DatasetMeta, Problems]:
    """Convert `input` (format `fmt`) into a dataset at `output`; returns (meta, problems).

    options: reader keyword arguments (e.g. {"image_dir": "images_4"}); None values = default.
    Raises BadSample (naming file / scene / frame) on the first bad item unless `skip_bad`.
    """

    options = {k: v for k, v in (options or {}).items() if v is not None}
    reader = make_reader(fmt, input, **options)
    problems = Problems(skip_bad=skip_bad, min_frames=min_frames)
    meta = DatasetMeta(source=fmt, extra={"converted_from": str(input), "format": fmt,
                                          "options": {k: str(v) for k, v in options.items()}})

    def sequences():
        stats: dict = {}
        yield from iter_sequences(reader, problems, source=fmt, progress=progress, stats=stats)
        if stats["sequences"] == 0:
            first = f"; first: {problems.messages[0]}" if problems.messages else ""
            raise BadSample(str(input), f"nothing to write: {problems.skipped_sequences} "
                            f"sequences and {problems.skipped_frames} frames were bad{first}")
        # runs once the reader is exhausted, before the writer serialises `meta`
        meta.extra.update(problems.summary())
        if problems.messages:
            meta.extra["bad_data"] = problems.messages[:50]

    meta = write_dataset(sequences(), output, writer, meta, max_frames=max_frames,
                         overwrite=overwrite, progress=False)
    return meta, problems
