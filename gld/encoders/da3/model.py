"""DA3: the frozen geometric encoder whose four feature levels are GLD's latent space.

    model = DA3("da3-base")                               # or gld.checkpoints.da3.load_da3(path)
    levels = model.encode(images)                         # images (B, V, 3, H, W) in [0, 1]
    deeper = model.propagate(levels[1], from_level=1)     # == levels[2:], exactly
    raw = model.encode(images, form="raw")                # [local | global]: GLD's latent form
    assert model.decoder_form(raw[1]).features.equal(levels[1].features)
    geo = model.geometry(levels, images.shape[-2:])       # depth, poses, intrinsics, rays

Precision: the backbone runs under bf16 autocast on CUDA (`amp="auto"`; fp32 on CPU), the heads
and camera modules in fp32, as the official API does. The model is frozen (no parameter requires
grad), in eval mode, and its entry points run without autograd (`torch.no_grad`, not inference
mode, so outputs can feed a trained network). Training and eval mode compute the same thing.
Attention runs through `kernels.attention.attention` with the backend the model was given
(`attention_backend`, default "auto"; `set_attention_backend` changes it on every block).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from gld.encoders.da3.backbone import (
    Attention, DA3Backbone, Level, check_attention_backend, check_form,
)
from gld.encoders.da3.camera import (
    CameraDecoder, CameraEncoder, normalize_extrinsics, pose_encoding_to_cameras,
)
from gld.encoders.da3.config import (
    IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, PRESETS, DA3Config, resolve_variant,
)
from gld.encoders.da3.heads import DualDPT

__all__ = ["DA3", "Level"]

AmpArg = Union[str, None, torch.dtype]


class DA3(nn.Module):
    """Depth Anything 3 (Small / Base / Large), weight-compatible with the published files.

    Submodules (state-dict prefixes): backbone, head (DualDPT), cam_dec, cam_enc, named as in
    the official network so that published weights map by name (`gld.checkpoints.da3`).
    `attention_backend`: what every attention call passes to `kernels.attention.attention` as
    `backend=` ("auto", "reference", "sdpa", ...; checked here).
    """

    def __init__(self, config: Union[DA3Config, str] = "da3-base", frozen: bool = True,
                 attention_backend: str = "auto") -> None:
        super().__init__()
        cfg = resolve_variant(config) if isinstance(config, str) else config
        self.config = cfg
        self.backbone = DA3Backbone(cfg, attention_backend)
        self.head = DualDPT(2 * cfg.dim, cfg.dpt_features, cfg.dpt_channels)
        self.cam_dec = CameraDecoder(2 * cfg.dim)
        self.cam_enc = CameraEncoder(cfg.dim, cfg.cam_enc_heads, cfg.cam_enc_depth,
                                     attention_backend)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        if frozen:
            self.requires_grad_(False)
            self.eval()

    # -- attention backend ---------------------------------------------------------------------
    @property
    def attention_backend(self) -> str:
        """The backend every attention call of this model passes to `kernels.attention`."""
        return next(m for m in self.modules() if isinstance(m, Attention)).attention_backend

    def set_attention_backend(self, name: str) -> "DA3":
        """Use attention backend `name` in every block (backbone and camera encoder); returns
        the model. No global state: other models keep their own choice."""
        check_attention_backend(name)
        for m in self.modules():
            if isinstance(m, Attention):
                m.attention_backend = name
        return self

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _amp_dtype(amp: AmpArg, device: torch.device) -> Optional[torch.dtype]:
        if amp == "auto":
            return torch.bfloat16 if device.type == "cuda" else None
        if amp is None or isinstance(amp, torch.dtype):
            return amp
        raise ValueError(f"DA3: amp must be 'auto', None or a torch dtype, got {amp!r}")

    def _autocast(self, device: torch.device, amp: AmpArg):
        dt = self._amp_dtype(amp, device)
        return torch.autocast(device.type, dtype=dt or torch.float32, enabled=dt is not None)

    def normalize_images(self, images: Tensor) -> Tensor:
        """(B, V, 3, H, W) RGB in [0, 1] -> ImageNet-normalised, same shape."""
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"DA3: expected images (B, V, 3, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % PATCH_SIZE or W % PATCH_SIZE:
            raise ValueError(f"DA3: image size {(H, W)} must be a multiple of {PATCH_SIZE} on "
                             "both sides (resize or crop first)")
        return (images - self.pixel_mean) / self.pixel_std

    @staticmethod
    def _grid(level: Level, image_size: Optional[Sequence[int]]) -> tuple[int, int]:
        if image_size is not None:
            return (int(image_size[0]) // PATCH_SIZE, int(image_size[1]) // PATCH_SIZE)
        if level.grid is not None:
            return tuple(level.grid)
        raise ValueError("DA3: the patch grid of this level is unknown; pass image_size=(H, W)")

    # -- entry points --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor, w2c: Optional[Tensor] = None, K: Optional[Tensor] = None,
               normalize_poses: bool = True, amp: AmpArg = "auto",
               form: str = "decoder") -> list[Level]:
        """Images (B, V, 3, H, W) in [0, 1], H, W multiples of 14 -> 4 `Level`s.

        Each level: features (B, V, N, 2C), cam_token (B, V, 2C), grid (H/14, W/14). `form`
        "decoder": features [local | LN(global)], what `geometry` reads; "raw": [local | global]
        before the final LayerNorm (GLD's diffusion latent; `decoder_form` converts).
        Posed input: w2c (B, V, 4, 4) OpenCV world-to-camera and K (B, V, 3, 3) pixel intrinsics
        of the same image size; the camera encoder then provides the camera tokens. With
        `normalize_poses` the poses are first normalised as the official API does
        (`normalize_extrinsics`). View order is kept (the official "first" reference strategy).
        """
        check_form(form)
        x = self.normalize_images(images)
        B, V, _, H, W = x.shape
        cam_token = None
        if (w2c is None) != (K is None):
            raise ValueError("DA3.encode: pass both w2c and K (posed input) or neither")
        if w2c is not None:
            if w2c.shape != (B, V, 4, 4) or K.shape != (B, V, 3, 3):
                raise ValueError(f"DA3.encode: expected w2c {(B, V, 4, 4)} and K {(B, V, 3, 3)}, "
                                 f"got {tuple(w2c.shape)} and {tuple(K.shape)}")
            w2c = w2c.float()
            if normalize_poses:
                w2c = normalize_extrinsics(w2c)
            cam_token = self.cam_enc(w2c, K.float(), (H, W))
        with self._autocast(x.device, amp):
            return self.backbone(x, cam_token=cam_token, form=form)

    @torch.no_grad()
    def propagate(self, level_output: Level, from_level: int,
                  image_size: Optional[Sequence[int]] = None, amp: AmpArg = "auto",
                  form: str = "decoder", via: str = "local") -> list[Level]:
        """Level `from_level` (features (B, V, N, 2C), cam_token (B, V, 2C)) -> the deeper levels.

        Returns levels from_level+1 .. 3 in `form` (a list, empty for level 3); exact:
        propagating an encoded level reproduces `encode`'s deeper levels. The patch grid comes
        from `image_size` or, failing that, from the level. via "local" (default) reads only
        the local half, so the level may be in either form; via "current" continues from the
        raw global half and needs the raw form (see `DA3Backbone.propagate`).
        """
        n = len(self.config.out_layers)
        if not 0 <= from_level < n:
            raise ValueError(f"DA3.propagate: from_level must be in [0, {n - 1}], got {from_level}")
        level = Level(*level_output) if not isinstance(level_output, Level) else level_output
        grid = self._grid(level, image_size)
        with self._autocast(level.features.device, amp):
            return self.backbone.propagate(level, from_level, grid, form=form, via=via)

    @torch.no_grad()
    def decoder_form(self, level: Level) -> Level:
        """A raw level ([local | global] features) -> the decoder form ([local | LN(global)]):
        the backbone's final LayerNorm on the second half of the features, in fp32 as `encode`
        applies it (bit-identical to encoding with form="decoder"). cam_token and grid are
        unchanged (token 0 is raw in both forms)."""
        level = Level(*level)
        with torch.autocast(level.features.device.type, enabled=False):
            return Level(self.backbone.decoder_form(level.features), level.cam_token, level.grid)

    @torch.no_grad()
    def geometry(self, levels: Sequence[Level], image_size: Sequence[int],
                 chunk: int = 8) -> dict[str, Tensor]:
        """Four levels -> geometry per view, all fp32:

        depth (B, V, H, W), depth_conf (B, V, H, W), ray (B, V, 8H/14, 8W/14, 6) (direction,
        origin), ray_conf (B, V, 8H/14, 8W/14), pose_enc (B, V, 9), w2c (B, V, 4, 4) OpenCV
        world-to-camera, K (B, V, 3, 3) pixel intrinsics (from the last level's camera token).
        """
        if len(levels) != 4:
            raise ValueError(f"DA3.geometry: expected the 4 levels, got {len(levels)}")
        H, W = int(image_size[0]), int(image_size[1])
        feats = [Level(*lv).features.float() for lv in levels]
        B, V, N, C2 = feats[0].shape
        if N != (H // PATCH_SIZE) * (W // PATCH_SIZE) or C2 != 2 * self.config.dim:
            raise ValueError(f"DA3.geometry: features {tuple(feats[0].shape)} do not match image "
                             f"size {(H, W)} (expected N={(H // PATCH_SIZE) * (W // PATCH_SIZE)}, "
                             f"2C={2 * self.config.dim})")
        with torch.autocast(feats[0].device.type, enabled=False):
            out = self.head([f.reshape(B * V, N, C2) for f in feats], H, W, views=V, chunk=chunk)
            out = {k: v.reshape(B, V, *v.shape[1:]) for k, v in out.items()}
            enc = self.cam_dec(Level(*levels[-1]).cam_token.float())
            out["pose_enc"] = enc
            out["w2c"], out["K"] = pose_encoding_to_cameras(enc, (H, W))
        return out

    def forward(self, images: Tensor, w2c: Optional[Tensor] = None, K: Optional[Tensor] = None,
                amp: AmpArg = "auto") -> dict[str, Tensor]:
        """`encode` then `geometry`; the levels are returned under "levels"."""
        levels = self.encode(images, w2c, K, amp=amp)
        out = self.geometry(levels, images.shape[-2:])
        out["levels"] = levels
        return out

    @property
    def variant(self) -> str:
        return self.config.name

    @staticmethod
    def presets() -> list[str]:
        return sorted(PRESETS)
