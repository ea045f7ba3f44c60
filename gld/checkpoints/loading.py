"""What every checkpoint loader shares: reading untrusted files, loading by name, reporting.

- `read_state_dict(path)`: the tensors of a `.safetensors` file, or of a torch file read with
  `torch.load(weights_only=True)` (no pickled code runs); a torch file may hold the state dict
  itself or under one of a few wrapper keys ("model", "state_dict", ...).
- `load_into(module, state, where=...)`: copies tensors into a module by key name and returns a
  `LoadReport` naming every key the file lacks (`missing`) and every key the module lacks
  (`unexpected`); shape mismatches always raise, naming the key and both shapes.
- `CheckpointError`: what a file that does not fit raises; its message starts with the file.

Key-name mappings of particular releases live beside this module (`da3.py`, `gld_release.py`);
the models themselves know nothing of files.
"""
from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "LoadReport", "read_state_dict", "load_into", "TORCH_SUFFIXES"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model.

    `where` names the file (or what was loaded), `problem` says what is wrong; the message is
    "<where>: <problem>".
    """

    def __init__(self, where: PathLike, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = str(where)
        self.problem = problem


@dataclass
class LoadReport:
    """What a load did: keys absent from the file, keys the module does not have, tied aliases
    filled from one stored copy, file keys deliberately skipped (not part of the module)."""

    where: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    aliases_filled: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def problems(self) -> str:
        """The missing and unexpected keys by name, or "all keys matched"."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {', '.join(self.unexpected)}")
        return "; ".join(parts) if parts else "all keys matched"

    def describe(self) -> str:
        return f"{self.where}: {self.problems()}"


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _read_torch(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; its one line of cause follows this marker.
        cause = str(err).partition("WeightsUnpickler error:")[2].strip().split("\n")[0]
        raise CheckpointError(path, "not loadable with torch.load(weights_only=True): corrupt, "
                              "or holding objects other than tensors and plain containers"
                              + (f" ({cause})" if cause else "")) from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(path, f"not a readable torch file ({err})") from err


def read_state_dict(path: PathLike, nested: tuple[str, ...] = ("model", "state_dict")
                    ) -> dict[str, Tensor]:
    """Tensors of a safetensors or torch file, on the CPU, keys as stored.

    A torch file may hold the state dict itself or under the first key of `nested` that holds
    one. Raises FileNotFoundError for a missing file, `CheckpointError` for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise CheckpointError(path, f"not a readable safetensors file ({err})") from err
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(path, f"unknown checkpoint format {path.suffix!r}; expected "
                              f".safetensors or one of {', '.join(TORCH_SUFFIXES)}")
    obj = _read_torch(path)
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in nested:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        raise CheckpointError(path, f"no state dict found; top-level keys are "
                              f"{sorted(map(str, obj))[:20]}, expected tensors or one of {nested}")
    raise CheckpointError(path, f"expected a dict of tensors, found {type(obj).__name__}")


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """Names that share one tensor (e.g. a LayerNorm used in several places), groups of 2+."""
    by_tensor: dict[int, list[str]] = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False)):
        by_tensor.setdefault(id(t), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def _fill_tied(module: nn.Module, state: dict[str, Tensor], where: str,
               report: LoadReport) -> None:
    """Files store a tied tensor under one of its names; fill the others, check any duplicates."""
    for group in _tied_groups(module):
        present = [n for n in group if n in state]
        if not present:
            continue
        first = state[present[0]]
        for n in present[1:]:
            if state[n].shape != first.shape or not torch.equal(state[n], first):
                raise CheckpointError(where, f"tied keys {present[0]} and {n} hold different "
                                      "values (they are one tensor in the model)")
        for n in group:
            if n not in state:
                state[n] = first
                report.aliases_filled.append(n)


def load_into(module: nn.Module, state: Mapping[str, Tensor], *, where: PathLike,
              strict: bool = True) -> LoadReport:
    """Copy `state` (the module's own key names) into `module`; returns the `LoadReport`.

    `where` names the source in every message. Shape mismatches always raise, listing key,
    expected and found shapes; missing / unexpected keys raise when `strict`, else warn and are
    listed in the report. Values are cast to each parameter's dtype, copied without autograd.
    """
    where = str(where)
    state = dict(state)
    report = LoadReport(where)
    _fill_tied(module, state, where, report)
    own = module.state_dict(keep_vars=True)
    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    bad = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(state[k].shape)}"
           for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(where, f"{len(bad)} shape mismatch(es): " + "; ".join(bad))
    if not report.ok:
        if strict:
            raise CheckpointError(where, report.problems())
        warnings.warn(report.describe(), stacklevel=2)
    with torch.no_grad():
        for k, t in own.items():
            if k in state:
                t.copy_(state[k].to(t.dtype))
    return report
