"""Files of the GLD authors' release (Hugging Face SeonghuJeon/GLD) that map onto `DA3`.

`pretrained_models/da3/dpt_decoder.pt`: the DualDPT depth / ray head, fine-tuned by the authors.
A torch pickle (loaded here with weights_only=True) of a dict whose "model" entry is a state
dict (we also accept "ema" or a bare state dict). Key mapping, as the release's
`RAE_DA3._init_dpt_decoder` applies it:
    "decoder.<key>"  -> head "<key>"      (ours: "head.<key>", official "model.head.<key>")
    "pred.<key>"     -> head "<key>"
    anything else    -> not part of the head: ignored, and listed in the report
where <key> are the official DualDPT names (norm, projects.{i}, resize_layers.{i},
scratch.layer{i}_rn, scratch.refinenet{i}[_aux].*, scratch.output_conv{1,2}[_aux].*). The release
loads it over the head of the DA3-Base weights with strict=False; here the head keys it lacks are
reported as missing (strict=True raises), keys outside the two prefixes are reported as ignored,
and the tied ray LayerNorm fills its aliases.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Union

import torch
from torch import Tensor

from gld.checkpoints.da3 import CheckpointError, LoadReport, load_into

__all__ = ["DPT_DECODER_PREFIXES", "dpt_decoder_to_head", "load_gld_dpt_decoder"]

DPT_DECODER_PREFIXES = ("decoder.", "pred.")


def dpt_decoder_to_head(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Release keys -> (head state dict with DualDPT key names, ignored release keys)."""
    head, ignored = {}, []
    for key, value in state.items():
        for prefix in DPT_DECODER_PREFIXES:
            if key.startswith(prefix):
                head[key[len(prefix):]] = value
                break
        else:
            ignored.append(key)
    return head, ignored


def load_gld_dpt_decoder(model, path: Union[str, Path], strict: bool = True) -> LoadReport:
    """Load `dpt_decoder.pt` into `model.head` (a `DA3`); returns the report.

    Head keys DualDPT lacks are `unexpected`, DualDPT keys the file lacks `missing` (strict:
    either raises, naming them); release keys outside the head prefixes are `ignored`.
    """
    path = Path(path)
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    state = None
    if isinstance(obj, Mapping):
        for key in ("model", "ema"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
        else:
            if all(isinstance(v, Tensor) for v in obj.values()):
                state = obj
    if not state:
        raise CheckpointError(f"{path}: expected {{'model': state dict}} as in the GLD release, "
                              f"found {type(obj).__name__} with keys "
                              f"{sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else '-'}")
    head_state, ignored = dpt_decoder_to_head(state)
    if not head_state:
        raise CheckpointError(f"{path}: no keys start with {DPT_DECODER_PREFIXES}; found e.g. "
                              f"{list(state)[:5]}")
    report = load_into(model.head, head_state, str(path), strict=strict)
    report.ignored = ignored
    return report
