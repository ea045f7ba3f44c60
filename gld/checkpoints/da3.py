"""Published DA3 checkpoints (Hugging Face depth-anything/DA3-{SMALL,BASE,LARGE}) -> `DA3`.

Files: `model.safetensors` (+ `config.json`), or a torch file (.pt/.pth/.bin/.ckpt) holding a
state dict (or {"model": ...} / {"state_dict": ...}); torch files load with weights_only=True.

Key mapping (official -> ours), applied in this order:
    "model." prefix                -> dropped (the official API wraps the network as `.model`)
    "backbone.pretrained."         -> "backbone."
    everything else                -> unchanged (head.*, cam_dec.*, cam_enc.*)
Tied aliases: the official ray head shares one LayerNorm between
`head.scratch.output_conv2_aux.{0,1,2,3}.2` (443 state-dict entries); safetensors stores one name
(437 entries in the file). Our model ties the same parameters, so any one stored name fills the
group; stored names that disagree raise.

Variant: explicit argument > `config.json` beside the weights ("model_name", "variant", "name"
or "preset": "da3-base", "DA3-BASE", "vitb", ...) > the weights' shapes (width of
`backbone.cls_token`, number of blocks). An explicit variant that contradicts the weights is an
error naming both.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from gld.encoders.da3.config import PRESETS, DA3Config, resolve_variant

__all__ = [
    "CheckpointError", "LoadReport", "read_state_dict", "official_to_ours", "ours_to_official",
    "infer_variant", "load_da3", "load_into", "resolve_weights_path",
]

WEIGHT_NAMES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the keys and shapes."""


@dataclass
class LoadReport:
    """What a load did: keys absent from the file, keys the model does not have, tied aliases
    filled from one stored copy, file keys deliberately skipped (not part of the module)."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    aliases_filled: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # file keys outside the loaded module

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {', '.join(self.unexpected)}")
        return f"{self.source}: " + ("; ".join(parts) if parts else "all keys matched")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def read_state_dict(path: Union[str, Path], nested: tuple[str, ...] = ("model", "state_dict")
                    ) -> dict[str, Tensor]:
    """Tensors of a safetensors or torch file (untrusted: no pickled code is run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected "
                              f".safetensors or one of {', '.join(TORCH_SUFFIXES)}")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in nested:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        raise CheckpointError(f"{path}: no state dict found; top-level keys are "
                              f"{sorted(map(str, obj))[:20]}, expected tensors or one of {nested}")
    raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")


def resolve_weights_path(path: Union[str, Path]) -> tuple[Path, Optional[Path]]:
    """A file or a folder -> (weights file, config.json beside it or None)."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                weights = path / name
                break
        else:
            raise FileNotFoundError(f"{path}: no weights file found; expected one of "
                                    f"{', '.join(WEIGHT_NAMES)}")
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"DA3 weights not found: {path}")
    config = weights.parent / "config.json"
    return weights, (config if config.is_file() else None)


def variant_from_config(config_path: Path) -> Optional[DA3Config]:
    """The variant a Hugging Face `config.json` names, or None if it names none."""
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: unreadable config.json ({err})") from err
    for key in ("model_name", "variant", "name", "preset"):
        if isinstance(data, dict) and isinstance(data.get(key), str):
            try:
                return resolve_variant(data[key])
            except ValueError as err:
                raise CheckpointError(f"{config_path}: {key}={data[key]!r} is not a supported "
                                      f"DA3 variant ({err})") from err
    return None


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

def official_to_ours(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        k = key[len("model."):] if key.startswith("model.") else key
        if k.startswith("backbone.pretrained."):
            k = "backbone." + k[len("backbone.pretrained."):]
        out[k] = value
    return out


def ours_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        k = "backbone.pretrained." + key[len("backbone."):] if key.startswith("backbone.") else key
        out["model." + k] = value
    return out


def infer_variant(state: Mapping[str, Tensor]) -> DA3Config:
    """Variant from our-key state dict shapes: width of backbone.cls_token and block count."""
    tok = state.get("backbone.cls_token")
    if tok is None:
        raise CheckpointError("cannot infer the DA3 variant: backbone.cls_token (official "
                              "model.backbone.pretrained.cls_token) is not in the weights; pass "
                              "variant=")
    depth = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("backbone.blocks.")),
                    default=-1)
    for cfg in PRESETS.values():
        if cfg.dim == tok.shape[-1] and cfg.depth == depth:
            return cfg
    raise CheckpointError(f"no DA3 preset has width {tok.shape[-1]} and {depth} blocks "
                          f"(presets: {[(c.name, c.dim, c.depth) for c in PRESETS.values()]})")


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one tensor (e.g. the ray head's LayerNorm), as groups of 2+."""
    by_tensor: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        by_tensor.setdefault(id(t), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def load_into(model: nn.Module, state: Mapping[str, Tensor], source: str,
              strict: bool = True) -> LoadReport:
    """Copy `state` (our key names) into `model`, reporting every mismatch by name.

    Shape mismatches always raise (listing key, expected and found shapes); missing /
    unexpected keys raise when `strict`, else warn. Values are cast to the parameter dtype.
    """
    state = dict(state)
    report = LoadReport(source)
    for group in _tied_groups(model):
        present = [n for n in group if n in state]
        if not present:
            continue
        for n in present[1:]:
            if state[n].shape != state[present[0]].shape or not torch.equal(state[n], state[present[0]]):
                raise CheckpointError(f"{source}: tied keys {present[0]} and {n} hold different "
                                      "values (they are one parameter in DA3)")
        for n in group:
            if n not in state:
                state[n] = state[present[0]]
                report.aliases_filled.append(n)
    own = model.state_dict(keep_vars=True)
    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    bad = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(state[k].shape)}"
           for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} shape mismatch(es): " + "; ".join(bad))
    if not report.ok:
        if strict:
            raise CheckpointError(report.describe())
        warnings.warn(report.describe(), stacklevel=3)
    with torch.no_grad():
        for k, t in own.items():
            if k in state:
                t.copy_(state[k].to(t.dtype))
    return report


def load_da3(path: Union[str, Path], variant: Optional[str] = None, strict: bool = True,
             device: Union[str, torch.device] = "cpu"):
    """A published DA3 file or folder -> a frozen `DA3` in eval mode (see the module docstring)."""
    from gld.encoders.da3.model import DA3

    weights, config_path = resolve_weights_path(path)
    state = official_to_ours(read_state_dict(weights))
    from_weights = infer_variant(state) if "backbone.cls_token" in state else None
    if variant is not None:
        cfg = resolve_variant(variant)
        origin = f"variant={variant!r}"
    elif config_path is not None and variant_from_config(config_path) is not None:
        cfg = variant_from_config(config_path)
        origin = f"{config_path}"
    elif from_weights is not None:
        cfg, origin = from_weights, "the weights' shapes"
    else:
        cfg, origin = infer_variant(state), "the weights' shapes"
    if from_weights is not None and from_weights.name != cfg.name:
        raise CheckpointError(f"{weights}: {origin} asks for {cfg.name} but the weights are "
                              f"{from_weights.name} (width {from_weights.dim}, "
                              f"{from_weights.depth} blocks)")
    model = DA3(cfg)
    model.load_report = load_into(model, state, str(weights), strict=strict)
    return model.to(device)
