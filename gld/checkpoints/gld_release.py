"""Files of the GLD authors' release (Hugging Face SeonghuJeon/GLD) that map onto `DA3`.

`pretrained_models/da3/dpt_decoder.pt` (docs/da3.md "Checkpoints"): the DualDPT depth / ray
head, fine-tuned by the authors. A torch pickle (read with weights_only=True) of a dict whose
"model" entry is a state dict (we also accept "ema" or a bare state dict). Key mapping, as the
release's `RAE_DA3._init_dpt_decoder` (`stage1/rae_da3.py` in the release) applies it:
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

from typing import Mapping

from torch import Tensor

from gld.checkpoints.loading import CheckpointError, LoadReport, PathLike, load_into, read_state_dict
from gld.encoders.da3 import DA3

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


def load_gld_dpt_decoder(model: DA3, path: PathLike, *, strict: bool = True) -> LoadReport:
    """Load `dpt_decoder.pt` into `model.head`; returns the report.

    Head keys DualDPT lacks are `unexpected`, DualDPT keys the file lacks `missing` (strict:
    either raises, naming them); release keys outside the head prefixes are `ignored`.
    """
    state = read_state_dict(path, nested=("model", "ema"))
    head_state, ignored = dpt_decoder_to_head(state)
    if not head_state:
        raise CheckpointError(path, f"no keys start with {DPT_DECODER_PREFIXES}; found e.g. "
                              f"{list(state)[:5]}")
    report = load_into(model.head, head_state, where=path, strict=strict)
    report.ignored = ignored
    return report
