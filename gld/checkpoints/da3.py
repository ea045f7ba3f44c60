"""Published DA3 checkpoints (Hugging Face depth-anything/DA3-{SMALL,BASE,LARGE}) -> `DA3`.

    from gld.checkpoints.da3 import load_da3
    model = load_da3("checkpoints/DA3-BASE")   # a downloaded depth-anything/DA3-BASE folder

Files: `model.safetensors` (+ `config.json`), or a torch file (.pt/.pth/.bin/.ckpt) holding a
state dict (or {"model": ...} / {"state_dict": ...}); see `gld.checkpoints.loading`.

Key mapping (official -> ours), applied in this order (docs/da3.md "Checkpoints"):
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
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from gld.checkpoints.loading import CheckpointError, PathLike, load_into, read_state_dict
from gld.encoders.da3 import DA3, PRESETS, DA3Config, resolve_variant

__all__ = [
    "DA3Checkpoint", "read_da3", "load_da3", "official_to_ours", "ours_to_official",
    "infer_variant", "resolve_weights_path", "WEIGHT_NAMES",
]

WEIGHT_NAMES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")


@dataclass(frozen=True)
class DA3Checkpoint:
    """A published DA3 file, read: the variant it holds, its tensors under our key names, and
    the weights file they came from (named in every load message)."""

    config: DA3Config
    state: dict[str, Tensor]
    weights: Path


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


def resolve_weights_path(path: PathLike) -> tuple[Path, Optional[Path]]:
    """A file or a folder -> (weights file, config.json beside it or None)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in WEIGHT_NAMES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no weights file found; expected one of "
                                    f"{', '.join(WEIGHT_NAMES)}")
        weights = found[0]
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
        raise CheckpointError(config_path, f"unreadable config.json ({err})") from err
    for key in ("model_name", "variant", "name", "preset"):
        if isinstance(data, dict) and isinstance(data.get(key), str):
            try:
                return resolve_variant(data[key])
            except ValueError as err:
                raise CheckpointError(config_path, f"{key}={data[key]!r} is not a supported "
                                      f"DA3 variant ({err})") from err
    return None


def infer_variant(state: Mapping[str, Tensor], where: PathLike = "DA3 weights") -> DA3Config:
    """Variant from our-key state dict shapes: width of backbone.cls_token and block count."""
    tok = state.get("backbone.cls_token")
    if tok is None:
        raise CheckpointError(where, "cannot infer the DA3 variant: backbone.cls_token (official "
                              "model.backbone.pretrained.cls_token) is not in the weights; pass "
                              "variant=")
    depth = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("backbone.blocks.")),
                    default=-1)
    for cfg in PRESETS.values():
        if cfg.dim == tok.shape[-1] and cfg.depth == depth:
            return cfg
    raise CheckpointError(where, f"no DA3 preset has width {tok.shape[-1]} and {depth} blocks "
                          f"(presets: {[(c.name, c.dim, c.depth) for c in PRESETS.values()]})")


def read_da3(path: PathLike, variant: Optional[str] = None) -> DA3Checkpoint:
    """A published DA3 file or folder -> its variant and tensors (our key names), unloaded.

    With `load_into(DA3(ckpt.config), ckpt.state, where=ckpt.weights)` the caller gets the
    `LoadReport`; `load_da3` does both steps.
    """
    weights, config_path = resolve_weights_path(path)
    state = official_to_ours(read_state_dict(weights))
    from_weights = infer_variant(state, weights) if "backbone.cls_token" in state else None
    if variant is not None:
        cfg, origin = resolve_variant(variant), f"variant={variant!r}"
    elif config_path is not None and (from_config := variant_from_config(config_path)):
        cfg, origin = from_config, str(config_path)
    else:
        cfg, origin = from_weights or infer_variant(state, weights), "the weights' shapes"
    if from_weights is not None and from_weights.name != cfg.name:
        raise CheckpointError(weights, f"{origin} asks for {cfg.name} but the weights are "
                              f"{from_weights.name} (width {from_weights.dim}, "
                              f"{from_weights.depth} blocks)")
    return DA3Checkpoint(cfg, state, weights)


def load_da3(path: PathLike, variant: Optional[str] = None, *, strict: bool = True,
             device: Union[str, torch.device] = "cpu", attention_backend: str = "auto") -> DA3:
    """A published DA3 file or folder -> a frozen `DA3` in eval mode, weights loaded.

    Missing / unexpected keys raise `CheckpointError` listing them by name (`strict=False`: a
    warning naming them); a shape mismatch always raises, naming the key and both shapes.
    `attention_backend` is passed to `DA3`.
    """
    ckpt = read_da3(path, variant)
    model = DA3(ckpt.config, attention_backend=attention_backend)
    load_into(model, ckpt.state, where=ckpt.weights, strict=strict)
    return model.to(device)
