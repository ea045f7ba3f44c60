"""Files of the GLD authors' release (Hugging Face SeonghuJeon/GLD, code cvlab-kaist/
Geometric-Latent-Diffusion at 01ec537) that map onto the project's modules.

**The level-1 diffusion model** (`checkpoints/da3_level1.pt` with `configs/training/
DA3_level1.yaml`) -> `DiTDH` through `load_release_dit(ckpt_path, release_yaml_path)`.
- The YAML's `stage_2` section (`target: stage2.models.DDT.DiTwDDTHead`, `params`) gives the
  sizes: hidden_size [w0, w1] -> DiTConfig.widths, depth -> depths, num_heads (int or pair) ->
  heads, in_channels -> latent_channels, mlp_ratio, cam_patch_size -> the patch size. A missing
  param takes the release constructor's default (`DiTwDDTHead.__init__`), except
  architecture_mode, which must be written out: the constructor defaults to "new" but the
  release's eval reads a missing one as "old" (`eval_gld_metric.py:539`). Every setting our
  DiT-DH does not implement is an error naming the YAML and the key (`RELEASE_DIT_REQUIRED`):
  the cascade ("old"), RoPE, sin-cos position tables, qk-norm, a CLS or special tokens,
  LayerNorm / GELU / shift-free blocks, a non-concat input, camray cameras. cam_in_channels = 7
  is injected by the release's trainer from `dataset.camera_mode: plucker`, not written in
  `params`.
- The checkpoint (`torch.load(weights_only=True)`: no pickled code runs) is the trainer's dict
  {"model", "ema", "opt", ...}: "ema" is taken when present, else "model", else the file is
  the state dict itself, as the release's eval does (`eval_gld_metric.py:587-589`).
- Key mapping: a leading "module." (a DDP wrapper) is dropped; everything else is the identity,
  because DiTDH uses the release's parameter names (`x_embedder_{ref,tgt}.proj`,
  `s_embedder_{ref,tgt}.proj`, `camera_embedder.proj`, `t_embedder.{W,mlp.0,mlp.2}`,
  `blocks.{i}.{norm1,norm2,attn.qkv,attn.proj,mlp.w12,mlp.w3,adaLN_modulation.1}`,
  `s_projector`, `final_layer.{norm_final,linear,adaLN_modulation.1}`; level-1 shapes in
  docs/release-facts.md "DiT checkpoint"). The release loads with strict=False and would hide
  a missing key; here any missing or unexpected key raises `CheckpointError` naming the file
  and every such key, and a shape mismatch names the key and both shapes.
- The model comes back in eval mode with convention "release" (gld/models/cameras.py) and a
  `ReleaseDiT` as `.release`: the files it came from, which weights were taken, and what the
  release samples with, which the files do not store (time shift 31.18 at eval, 19.60 in
  training; Euler, 50 grid points from t = 1 to shift(0.001), CFG 1.5 on the camera-dropped
  branch at every t; gld/diffusion/flow.py, docs/release-facts.md "Flow matching, loss, sampler").

**The fine-tuned DA3 head** `pretrained_models/da3/dpt_decoder.pt` (docs/da3.md "Checkpoints"):
the DualDPT depth / ray head. A torch pickle (read with weights_only=True) of a dict whose
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

**The RGB decoder** (`mae_decoder.pt` with `configs/decoder/ViTXL/config.json`) -> `RGBDecoder`
through `load_release_decoder(mae_decoder_path, config_json)` (docs/release-facts.md "RGB
decoder (mae_decoder.pt)"). The config gives width, depth, heads and MLP size
(decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads,
decoder_intermediate_size); its hidden_size and patch_size are overridden by the release's loader
(6144 = 4 x 1536 input channels, patch 14) and the position table is built for 504 x 504. The
checkpoint entry is "ema", else "model", else the file; keys "decoder.<name>" map to "<name>",
which are RGBDecoder's own names (`decoder_embed`, `trainable_cls_token`, `decoder_pos_embed`,
`decoder_layers.{i}.attention.attention.{query,key,value}`, `.attention.output.dense`,
`.intermediate.dense`, `.output.dense`, `.layernorm_before/_after`, `decoder_norm`,
`decoder_pred`). Any missing or unexpected key raises `CheckpointError` naming them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from torch import Tensor

from gld.checkpoints.loading import (TORCH_SUFFIXES, CheckpointError, LoadReport, PathLike,
                                     _read_torch, load_into, read_state_dict)
from gld.diffusion import RELEASE_EVAL_SHIFT, RELEASE_TRAIN_SHIFT, SamplerConfig
from gld.encoders.da3 import DA3
from gld.encoders.da3.config import PATCH_SIZE
from gld.models import DecoderConfig, DiTConfig, DiTDH, RGBDecoder

__all__ = ["DPT_DECODER_PREFIXES", "dpt_decoder_to_head", "load_gld_dpt_decoder",
           "RELEASE_DIT_TARGET", "RELEASE_DIT_REQUIRED", "ReleaseDiT", "release_dit_config",
           "release_dit_state", "load_release_dit", "RELEASE_DECODER_IN_CHANNELS",
           "RELEASE_DECODER_BASE_IMAGE", "release_decoder_config", "release_decoder_state",
           "load_release_decoder"]

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


# ---------------------------------------------------------------------------------------------
# The level-1 DiT-DH

RELEASE_DIT_TARGET = "stage2.models.DDT.DiTwDDTHead"

# Release constructor params (stage2/models/DDT.py, DiTwDDTHead.__init__) our DiTDH maps or
# ignores, with the constructor's default for a missing one.
_MAPPED = {"in_channels": 768, "hidden_size": [1152, 2048], "depth": [28, 2],
           "num_heads": [16, 16], "mlp_ratio": 4.0, "cam_patch_size": 16}
# Settings that change nothing our model computes or stores: the nominal grid size of the
# (non-strict) patch embedders, the unused class-label settings, the informational level.
_IGNORED = {"input_size": 1, "cam_input_size": 256, "class_dropout_prob": 0.1,
            "num_classes": 1000, "level": 3}
# Settings whose value our DiTDH implements -> (that value, the release's default, what another
# value would need).
RELEASE_DIT_REQUIRED: dict[str, tuple[Any, Any, str]] = {
    "architecture_mode": ("new", None, "'old' is the cascade (stage2/models/DDT_old.py: one "
                          "source and one target embedder)"),
    "patch_size": (1, 1, "latent patches larger than one token"),
    "use_rope": (False, True, "2D RoPE on the tokens"),
    "use_pos_embed": (False, True, "sin-cos position tables"),
    "use_prope": (True, False, "attention without PRoPE"),
    "use_qknorm": (False, False, "qk-norm"),
    "use_swiglu": (True, True, "a GELU MLP"),
    "use_rmsnorm": (True, True, "LayerNorm"),
    "wo_shift": (False, False, "adaLN without shift"),
    "predict_cls": (False, False, "a CLS token"),
    "num_special_tokens": (0, 0, "special tokens"),
    "is_concat_mode": (True, False, "the noisy latent alone as input"),
    "source_condition_mode": (None, None, "source-conditioned encoder input"),
    "cfg_mode": ("new", "new", "the 'old' unconditional branch that keeps the poses"),
    "cam_in_channels": (7, 7, "camray cameras (4 channels)"),
}


@dataclass(frozen=True)
class ReleaseDiT:
    """What a DiT-DH loaded from the release came from and how the release samples with it
    (none of which its checkpoint stores).

    checkpoint, yaml: the files; weights: which entry was loaded ("ema", "model" or "state
    dict"); level: the YAML's feature level. time_shift: the release's evaluation shift
    sqrt(1536 * 18 * 18 * 8 / 4096) = 31.18, train_time_shift its training one (19.60); sampler:
    Euler over 50 grid points from t = 1 down to shift(0.001) (0.030 at eval), CFG 1.5 against
    the camera-dropped branch at every t.
    """

    checkpoint: str
    yaml: str
    weights: str
    level: Any = None
    time_shift: float = RELEASE_EVAL_SHIFT
    train_time_shift: float = RELEASE_TRAIN_SHIFT
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(
        method="euler", steps=50, t_min=0.001, cfg_scale=1.5, cfg_interval=(0.0, 1.0)))


def _pair(yaml_path: PathLike, key: str, value: Any) -> tuple[int, int]:
    """A (backbone, head) pair of positive ints; num_heads may be one int for both."""
    if key == "num_heads" and isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise CheckpointError(yaml_path, f"stage_2.params.{key}: expected two positive "
                              f"integers [backbone, head], got {value!r}")
    return int(value[0]), int(value[1])


def _load_yaml(yaml_path: PathLike) -> dict:
    path = Path(yaml_path)
    if not path.is_file():
        raise FileNotFoundError(f"release DiT config not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise CheckpointError(path, f"not readable YAML ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("stage_2"), dict):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(path, f"expected the release's DiT config with a 'stage_2' "
                              f"section (target, params); found {found}")
    return data


def release_dit_config(yaml_path: PathLike) -> tuple[DiTConfig, int, Any]:
    """(DiTConfig with convention "release", patch size, level) from a release YAML.

    Raises `CheckpointError` naming the YAML and the key for a setting DiTDH does not implement,
    an unknown param (the release's constructor would reject it too) or a malformed size.
    """
    data = _load_yaml(yaml_path)
    stage2 = data["stage_2"]
    target = stage2.get("target", RELEASE_DIT_TARGET)
    if target != RELEASE_DIT_TARGET:
        raise CheckpointError(yaml_path, f"stage_2.target: {target!r} is not the DiT-DH this "
                              f"loader reads ({RELEASE_DIT_TARGET!r})")
    params = stage2.get("params") or {}
    if not isinstance(params, dict):
        raise CheckpointError(yaml_path, f"stage_2.params: expected a mapping, got "
                              f"{type(params).__name__}")
    unknown = sorted(set(params) - set(_MAPPED) - set(_IGNORED) - set(RELEASE_DIT_REQUIRED))
    if unknown:
        raise CheckpointError(yaml_path, f"stage_2.params: unknown key(s) {unknown} (not "
                              f"parameters of the release's DiTwDDTHead)")
    if "architecture_mode" not in params:
        raise CheckpointError(yaml_path, "stage_2.params.architecture_mode: missing; the "
                              "release's trainer reads that as 'new' and its eval as 'old' (the "
                              "cascade): write it out")
    for key, (value, default, meaning) in RELEASE_DIT_REQUIRED.items():
        got = params.get(key, default)
        if key == "patch_size" and isinstance(got, (list, tuple)) and len(set(got)) == 1:
            got = got[0]
        if got != value or type(got) is not type(value):
            given = "" if key in params else " (the release's default when absent)"
            raise CheckpointError(yaml_path, f"stage_2.params.{key}: {got!r}{given} is not "
                                  f"supported: DiTDH implements only {value!r}, not {meaning}")
    camera_mode = (data.get("dataset") or {}).get("camera_mode", "plucker")
    if camera_mode != "plucker":
        raise CheckpointError(yaml_path, f"dataset.camera_mode: {camera_mode!r} is not "
                              f"supported: DiTDH implements only 'plucker' (7 camera channels)")
    p = {k: params.get(k, d) for k, d in _MAPPED.items()}
    widths = _pair(yaml_path, "hidden_size", p["hidden_size"])
    if widths[0] == widths[1]:
        raise CheckpointError(yaml_path, f"stage_2.params.hidden_size: equal widths {widths} "
                              f"make the release's s_projector an identity; DiTDH always has "
                              f"the projection")
    for key in ("in_channels", "cam_patch_size"):
        v = p[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(yaml_path, f"stage_2.params.{key}: expected a positive "
                                  f"integer, got {v!r}")
    if not isinstance(p["mlp_ratio"], (int, float)) or p["mlp_ratio"] <= 0:
        raise CheckpointError(yaml_path, f"stage_2.params.mlp_ratio: expected a positive "
                              f"number, got {p['mlp_ratio']!r}")
    camera_drop = (data.get("training") or {}).get("camera_drop", DiTConfig.camera_dropout)
    if not isinstance(camera_drop, (int, float)) or isinstance(camera_drop, bool):
        raise CheckpointError(yaml_path, f"training.camera_drop: expected a probability, got "
                              f"{camera_drop!r}")
    cfg = DiTConfig(widths=widths, depths=_pair(yaml_path, "depth", p["depth"]),
                    heads=_pair(yaml_path, "num_heads", p["num_heads"]),
                    latent_channels=p["in_channels"], mlp_ratio=float(p["mlp_ratio"]),
                    convention="release", camera_dropout=float(camera_drop))
    try:
        cfg.validate("stage_2.params")
    except ValueError as err:
        raise CheckpointError(yaml_path, str(err)) from err
    return cfg, p["cam_patch_size"], params.get("level", _IGNORED["level"])


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _release_entry(path: Path) -> tuple[Mapping, str]:
    """The release's pick from a torch file: `ckpt['ema']`, else `['model']`, else the file
    itself (its `ckpt.get('ema', ckpt.get('model', ckpt))`), checked to be a state dict; with
    which entry it was ("ema", "model" or "state dict")."""
    obj = _read_torch(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict, found {type(obj).__name__}")
    which = next((k for k in ("ema", "model") if k in obj), "state dict")
    state = obj[which] if which != "state dict" else obj
    if not _is_state_dict(state):
        what = f"entry {which!r}" if which != "state dict" else "the file"
        raise CheckpointError(path, f"{what} is not a state dict (str -> tensor); top-level "
                              f"keys are {sorted(map(str, obj))[:20]}")
    return state, which


def release_dit_state(ckpt_path: PathLike) -> tuple[dict[str, Tensor], str]:
    """(state dict under DiTDH's key names, which entry: "ema", "model" or "state dict").

    The release's choice, `ckpt.get('ema', ckpt.get('model', ckpt))`, then a leading "module."
    dropped from every key.
    """
    path = Path(ckpt_path)
    if path.suffix == ".safetensors":
        state, which = read_state_dict(path), "state dict"
    else:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        if path.suffix not in TORCH_SUFFIXES:
            raise CheckpointError(path, f"unknown checkpoint format {path.suffix!r}; expected "
                                  f".safetensors or one of {', '.join(TORCH_SUFFIXES)}")
        state, which = _release_entry(path)
    prefix = "module."
    out = {}
    for key, value in state.items():
        k = key[len(prefix):] if key.startswith(prefix) else key
        if k in out:
            raise CheckpointError(path, f"keys {key!r} and {k!r} collide once {prefix!r} is "
                                  f"dropped")
        out[k] = value
    return out, which


def load_release_dit(ckpt_path: PathLike, release_yaml_path: PathLike) -> DiTDH:
    """The release's DiT-DH: built from its YAML, weights from its checkpoint, in eval mode,
    convention "release", with `.release` a `ReleaseDiT` (see the module docstring).

    Raises `CheckpointError` naming the file and the keys when any key is missing or
    unexpected or a shape differs, and naming the YAML and the key for an unsupported setting.
    """
    cfg, patch, level = release_dit_config(release_yaml_path)
    state, which = release_dit_state(ckpt_path)
    model = DiTDH(cfg, patch_size=patch)
    try:
        load_into(model, state, where=ckpt_path, strict=True)
    except CheckpointError as err:
        raise CheckpointError(ckpt_path, f"{err.problem} (weights {which!r}, model built from "
                              f"{release_yaml_path})") from err
    model.eval()
    model.release = ReleaseDiT(checkpoint=str(ckpt_path), yaml=str(release_yaml_path),
                               weights=which, level=level)
    return model


# ---------------------------------------------------------------------------------------------
# The RGB decoder

# The release's loader sets these itself, whatever its config.json says (RAE_DA3.__init__,
# stage1/rae_da3.py:106-117): the input is four DA3-Giant levels of 2 x 768 channels, and
# GeneralDecoder_Variable's position table is defined for 504 x 504 images.
RELEASE_DECODER_IN_CHANNELS = 1536 * 4
RELEASE_DECODER_BASE_IMAGE = (504, 504)
# config.json keys -> DecoderConfig fields
_DECODER_SIZES = {"decoder_hidden_size": "width", "decoder_num_hidden_layers": "depth",
                  "decoder_num_attention_heads": "heads", "decoder_intermediate_size": "mlp_dim"}
# settings RGBDecoder implements only at one value -> (that value, the transformers default)
_DECODER_REQUIRED = {"hidden_act": ("gelu", "gelu"), "qkv_bias": (True, True),
                     "num_channels": (3, 3)}


def release_decoder_config(config_path: PathLike, *,
                           in_channels: int = RELEASE_DECODER_IN_CHANNELS,
                           base_image_size: tuple[int, int] = RELEASE_DECODER_BASE_IMAGE
                           ) -> DecoderConfig:
    """DecoderConfig from the release's ViT-MAE decoder `config.json` (a file, or the folder
    holding it, as `AutoConfig.from_pretrained` takes). Its hidden_size and patch_size are
    ignored: the release overrides them (in_channels, patch 14). Raises `CheckpointError`
    naming the file and the key for a missing size or a setting RGBDecoder does not implement.
    """
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"release decoder config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(path, f"not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a JSON object, found {type(data).__name__}")
    sizes = {}
    for key, field_name in _DECODER_SIZES.items():
        v = data.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(path, f"{key}: expected a positive integer, got {v!r}")
        sizes[field_name] = v
    for key, (value, default) in _DECODER_REQUIRED.items():
        got = data.get(key, default)
        if got != value:
            raise CheckpointError(path, f"{key}: {got!r} is not supported; RGBDecoder "
                                  f"implements only {value!r}")
    eps = data.get("layer_norm_eps", 1e-12)
    p = PATCH_SIZE
    if base_image_size[0] % p or base_image_size[1] % p:
        raise ValueError(f"base_image_size {base_image_size} must be multiples of {p}")
    cfg = DecoderConfig(**sizes, patch_size=p, in_channels=in_channels,
                        base_grid=(base_image_size[0] // p, base_image_size[1] // p),
                        layer_norm_eps=float(eps))
    try:
        cfg.validate(str(path))
    except ValueError as err:
        raise CheckpointError(path, str(err)) from err
    return cfg


def release_decoder_state(ckpt_path: PathLike) -> tuple[dict[str, Tensor], str, list[str]]:
    """(state dict under RGBDecoder's names, which entry, ignored keys).

    The release's rule: `ckpt['ema']`, else `['model']`, else the file itself; of that, the keys
    starting with "decoder." with it removed. Other keys are not the decoder's (the release
    skips them too) and come back as ignored; a file with no such key raises, where the release
    would silently keep a random decoder (e.g. the stage-1 trainer's unprefixed format).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    state, which = _release_entry(path)
    prefix = "decoder."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = [k for k in state if not k.startswith(prefix)]
    if not out:
        raise CheckpointError(path, f"no key of entry {which!r} starts with {prefix!r} (the "
                              f"release loads only those); found e.g. {list(state)[:5]}")
    return out, which, ignored


def load_release_decoder(mae_decoder_path: PathLike, release_decoder_config_json: PathLike, *,
                         in_channels: int = RELEASE_DECODER_IN_CHANNELS,
                         base_image_size: tuple[int, int] = RELEASE_DECODER_BASE_IMAGE
                         ) -> RGBDecoder:
    """The release's RGB decoder (`mae_decoder.pt` with its config.json) as an `RGBDecoder` in
    eval mode. in_channels and base_image_size are what the release's loader fixes (6144 and
    504 x 504); other values only serve smaller test files.

    Raises `CheckpointError` naming the file and every missing or unexpected key (the release
    loads with strict=False and would hide them), or the key and both shapes on a mismatch.
    `.release_weights` says which entry was loaded ("ema", "model" or "state dict").
    """
    cfg = release_decoder_config(release_decoder_config_json, in_channels=in_channels,
                                 base_image_size=base_image_size)
    state, which, _ = release_decoder_state(mae_decoder_path)
    model = RGBDecoder(cfg)
    try:
        load_into(model, state, where=mae_decoder_path, strict=True)
    except CheckpointError as err:
        raise CheckpointError(mae_decoder_path, f"{err.problem} (weights {which!r} without "
                              f"their 'decoder.' prefix, model built from "
                              f"{release_decoder_config_json})") from err
    model.eval()
    model.release_weights = which
    return model
