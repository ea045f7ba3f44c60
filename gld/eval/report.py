"""The run report: `<run_dir>/report/` with metrics.json, grid.png and summary.md.

metrics is a nested dict whose leaves are numbers (Python, numpy or 0-dim torch), strings or
None. None means "not computed"; why goes in the top-level `"unavailable"` dict, keyed by the
metric's dotted path. A section whose values are all dicts is rendered as one table with a
column per sub-dict, so a comparison lines up by itself, for example

    {"nvs": {"generated": {"psnr": 17.2, "ssim": 0.61, "lpips": None},
             "mean_image": {"psnr": 12.9, "ssim": 0.42, "lpips": None}},
     "depth": {"abs_rel": 0.08, "rmse": 0.31, "delta1": 0.93},
     "unavailable": {"nvs.generated.lpips": "LPIPS backbone 'alex' not found: ..."}}

gives a table `metric | generated | mean_image | generated - mean_image` (rows psnr, ssim,
lpips; a two-column section gets the difference column) and a table `metric | value` for depth;
top-level numbers share one table. Non-finite numbers are written to JSON as null (JSON has no
inf or NaN) and listed in the markdown as they were.

summary has free-form keys; these are rendered specially: "name", "config", "wall_time_s",
"stages" (dict name -> dict of values, or a list of dicts with a "name"), "notes" (a string or
a list of strings). Any other key is listed as `key: value`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from gld.eval.images import save_png, write_atomic

__all__ = ["write_report"]


def _plain(x: Any) -> Any:
    """Metrics leaves to JSON-able Python values (tensors and numpy scalars to float)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (str, bool)):
        return x
    if hasattr(x, "detach"):                                   # torch tensor
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.size != 1:
            raise ValueError(f"write_report: a metric must be a scalar, got an array of shape "
                             f"{x.shape}")
        x = x.reshape(()).item()
    if isinstance(x, (int, float, np.integer, np.floating)):
        return int(x) if isinstance(x, (int, np.integer)) else float(x)
    raise ValueError(f"write_report: cannot write a {type(x).__name__} as a metric: {x!r}")


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _fmt_any(v: Any) -> str:
    """Summary values are free-form: metric-like values formatted as metrics, the rest as str."""
    try:
        v = _plain(v)
    except ValueError:
        v = str(v)
    return _fmt(v)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _metric_section(name: str, section: dict) -> list[str]:
    lines = [f"### {name}", ""]
    if section and all(isinstance(v, dict) for v in section.values()):
        cols = {c: _flatten(v) for c, v in section.items()}
        keys = list(dict.fromkeys(k for flat in cols.values() for k in flat))
        rows = [[k] + [_fmt(cols[c].get(k)) for c in cols] for k in keys]
        header = ["metric"] + list(cols)
        if len(cols) == 2:                                  # a comparison: say the difference
            a, b = cols.values()
            header.append(f"{header[1]} - {header[2]}")
            for row, k in zip(rows, keys):
                va, vb = a.get(k), b.get(k)
                num = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                          for v in (va, vb))
                row.append(_fmt(float(va - vb)) if num else "")
        return lines + _table(header, rows) + [""]
    flat = _flatten(section)
    return lines + _table(["metric", "value"], [[k, _fmt(v)] for k, v in flat.items()]) + [""]


def _summary_md(metrics: dict, summary: dict, has_grid: bool) -> str:
    s = dict(summary)
    lines = [f"# Report: {s.pop('name', 'run')}", ""]
    facts = [f"- {label}: {_fmt_any(s[key])}" for key, label in
             (("config", "config"), ("wall_time_s", "wall time (s)")) if key in s]
    facts += [f"- {k}: {_fmt_any(v)}" for k, v in s.items()
              if k not in ("config", "wall_time_s", "stages", "notes")]
    if facts:
        lines += facts + [""]
    stages = s.get("stages")
    if stages:
        items = (list(stages.items()) if isinstance(stages, dict)
                 else [(st.get("name", str(i)), {k: v for k, v in st.items() if k != "name"})
                       for i, st in enumerate(stages)])
        cols = list(dict.fromkeys(k for _, st in items for k in st))
        lines += ["## Stages", ""] + _table(
            ["stage"] + cols, [[str(n)] + [_fmt_any(st.get(c)) for c in cols]
                               for n, st in items]) + [""]
    lines += ["## Metrics", ""]
    reasons = metrics.get("unavailable") or {}
    scalars = {k: v for k, v in metrics.items() if k != "unavailable" and not isinstance(v, dict)}
    if scalars:
        lines += _table(["metric", "value"], [[k, _fmt(v)] for k, v in scalars.items()]) + [""]
    for name, section in metrics.items():
        if name != "unavailable" and isinstance(section, dict):
            lines += _metric_section(name, section)
    missing = [k for k, v in _flatten({k: v for k, v in metrics.items() if k != "unavailable"}
                                      ).items() if v is None]
    listed = list(dict.fromkeys(list(reasons) + missing))
    if listed:
        lines += ["## Unavailable metrics", ""]
        lines += [f"- `{k}`: {reasons.get(k, 'not computed (no reason given)')}" for k in listed]
        lines.append("")
    notes = s.get("notes")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in ([notes] if isinstance(notes, str)
                                                          else notes)] + [""]
    if has_grid:
        lines += ["## Samples", "", "![samples](grid.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: str | os.PathLike, metrics: dict, grid: np.ndarray | None,
                 summary: dict) -> dict[str, str | None]:
    """Write `<run_dir>/report/{metrics.json, grid.png, summary.md}`, each atomically.

    Args:
        metrics: nested dict of metric values (see the module docstring for the layout).
        grid: (H, W, 3) uint8 image or None (then no grid.png; an old one is removed).
        summary: free-form run facts (name, config, wall_time_s, stages, notes, ...).
    Returns:
        {"metrics": path, "grid": path or None, "summary": path}.
    """
    if not isinstance(metrics, dict) or not isinstance(summary, dict):
        raise ValueError(f"write_report: metrics and summary must be dicts, got "
                         f"{type(metrics).__name__} and {type(summary).__name__}")
    reasons = metrics.get("unavailable", {})
    if not isinstance(reasons, dict) or not all(isinstance(v, str) for v in reasons.values()):
        raise ValueError(f"write_report: metrics['unavailable'] must map metric paths to reason "
                         f"strings, got {reasons!r}")
    plain = _plain(metrics)
    folder = os.path.join(os.fspath(run_dir), "report")
    paths: dict[str, str | None] = {"metrics": os.path.join(folder, "metrics.json"),
                                    "grid": None, "summary": os.path.join(folder, "summary.md")}
    text = json.dumps(_json_safe(plain), indent=2, allow_nan=False) + "\n"
    write_atomic(paths["metrics"], lambda f: f.write(text.encode()))
    grid_path = os.path.join(folder, "grid.png")
    if grid is not None:
        paths["grid"] = save_png(grid, grid_path)
    elif os.path.exists(grid_path):
        os.remove(grid_path)
    md = _summary_md(plain, summary, grid is not None)
    write_atomic(paths["summary"], lambda f: f.write(md.encode()))
    return paths
