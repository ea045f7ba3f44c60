"""Novel view synthesis end to end: posed source images + target cameras -> generated target
views, depth and poses from DA3's heads, and a coloured point cloud.

    pipe = NVSPipeline.from_folder("runs/tiny/model", device="cuda")      # or .from_release(...)
    out = pipe(src_images, src_K, src_c2w, tgt_K, tgt_c2w, seed=0, progress=True)
    out.images            # (B, T, 3, H, W) generated target views in [0, 1]
    pts, rgb = out.point_cloud(0)                                        # -> gld.eval.ply.write_ply

Stages (timed in `out.timings`, seconds):
1. encode: DA3 encodes the SOURCE images alone (the release's sampler does the same) -> the
   boundary level, raw and normalised; and the camera token of that level.
2. sample: the DiT-DH generates the boundary level of every view from noise (seeded on the CPU,
   `gld.diffusion.sampler`), the sources entering as the clean `source` half of its input; CFG
   runs the conditional and camera-dropped branches as one batch.
3. propagate: the generated targets' level (sources keep their encoded one) is denormalised and
   the deeper levels come from DA3's remaining blocks (`via`: "current" continues from the
   global half as the release does). Token 0 of every view is the FIRST source's encoded token
   of the boundary level, as the release's decode does (targets have no token of their own).
   Levels shallower than the boundary are not generated yet (their cascade comes later): they
   are zeros, which the decoder is trained for by level dropout and the DA3 heads read as an
   absent level.
4. decode: the RGB decoder turns the four levels (DA3's form) of the target views into pixels.
5. geometry: DA3's DualDPT head and camera decoder give depth, confidence and the poses and
   intrinsics of every view (sources and targets, in DA3's own frame and scale).

Views are ordered sources first, then targets (the last view, the pose reference, is a
target). On CUDA the networks run under bf16 autocast (DA3's backbone as its own API does;
heads and the sampler's state in fp32); `compile=True` compiles the DiT's blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from gld.diffusion import SamplerConfig
from gld.diffusion.sampler import initial_noise, sample
from gld.encoders.da3 import PATCH_SIZE, Level
from gld.geometry.cameras import check_cameras
from gld.latents.space import LatentSpace
from gld.models import DiTDH, RGBDecoder

__all__ = ["NVSPipeline", "NVSOutput"]

STAGES = ("encode", "sample", "propagate", "decode", "geometry")


@dataclass
class NVSOutput:
    """What one call produced. B scenes, S sources, T targets, V = S + T views (sources first).

    images (B, T, 3, H, W) generated targets in [0, 1]; sources (B, S, 3, H, W) the inputs;
    depth, depth_conf (B, V, H, W) from DA3's head; w2c (B, V, 4, 4) OpenCV world-to-camera
    and K (B, V, 3, 3) pixel intrinsics from DA3's camera decoder (DA3's frame and scale);
    latents (B, V, N, C) the boundary level (normalised; sources encoded, targets generated);
    timings: seconds per stage (synchronised on CUDA).
    """

    images: Tensor
    sources: Tensor
    depth: Tensor
    depth_conf: Tensor
    w2c: Tensor
    K: Tensor
    latents: Tensor
    timings: dict = field(default_factory=dict)

    @property
    def views_rgb(self) -> Tensor:
        """(B, V, 3, H, W): the source images then the generated targets."""
        return torch.cat([self.sources, self.images], dim=1)

    def point_cloud(self, b: int = 0, stride: int = 1, min_conf: Optional[float] = None
                    ) -> tuple:
        """Scene b's coloured points from every view's depth and predicted camera:
        (points (M, 3) float32 in DA3's world frame, colours (M, 3) uint8). `min_conf` keeps
        pixels whose depth confidence is at least that."""
        import numpy as np

        from gld.eval.ply import depth_to_points

        pts, cols = [], []
        rgb = self.views_rgb[b].float().cpu()
        c2w = torch.linalg.inv(self.w2c[b].double()).float().cpu()
        for v in range(rgb.shape[0]):
            mask = None if min_conf is None else (self.depth_conf[b, v] >= min_conf).cpu().numpy()
            p, c = depth_to_points(self.depth[b, v].float().cpu().numpy(),
                                   self.K[b, v].float().cpu().numpy(), c2w[v].numpy(),
                                   rgb[v].numpy(), mask=mask, stride=stride)
            pts.append(p)
            cols.append(c)
        return np.concatenate(pts), np.concatenate(cols)


class NVSPipeline(nn.Module):
    """The frozen latent space (DA3 + statistics), the DiT-DH and the RGB decoder, with the
    time shift and sampler settings they generate with. See the module doc for the stages."""

    def __init__(self, space: LatentSpace, dit: DiTDH, decoder: Optional[RGBDecoder], *,
                 time_shift: float, sampler: Optional[SamplerConfig] = None,
                 via: str = "current") -> None:
        super().__init__()
        if dit.cfg.latent_channels != space.channels:
            raise ValueError(f"NVSPipeline: the DiT generates {dit.cfg.latent_channels} channels,"
                             f" the {space.encoder.variant} latent has {space.channels}")
        if decoder is not None and decoder.cfg.in_channels != 4 * space.channels:
            raise ValueError(f"NVSPipeline: the decoder reads {decoder.cfg.in_channels} channels,"
                             f" 4 levels of {space.encoder.variant} are {4 * space.channels}")
        self.space, self.dit, self.decoder = space.eval(), dit.eval(), decoder
        if decoder is not None:
            decoder.eval()
        self.requires_grad_(False)
        self.time_shift = float(time_shift)
        self.sampler = sampler or SamplerConfig()
        self.sampler.validate("sampler")
        self.via = via

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
                    da3_weights: Optional[str] = None, sampler: Optional[SamplerConfig] = None
                    ) -> "NVSPipeline":
        """Our model folder (gld/checkpoints/model_folder.py). The DA3 weights are those its
        config names unless `da3_weights` overrides them; the sampler that of its config."""
        from gld.checkpoints.loading import load_into
        from gld.checkpoints.model_folder import read_model_folder
        from gld.latents.space import build_latent_space

        mf = read_model_folder(folder)
        for name in ("dit", "decoder"):
            if getattr(mf, f"{name}_state") is None:
                raise FileNotFoundError(f"{mf.path}: the model folder holds no {name} "
                                        f"({name}.safetensors); export one with launch/export.py")
        latent = mf.config.latent
        if da3_weights is not None:
            latent.weights = da3_weights
        latent.stats = [str(mf.stats_path)] if mf.stats_path is not None else []
        latent.normalize = mf.stats_path is not None
        space = build_latent_space(latent, device)
        dit, dec = DiTDH(mf.dit_config), RGBDecoder(mf.decoder_config)
        load_into(dit, mf.dit_state, where=mf.path / "dit.safetensors")
        load_into(dec, mf.decoder_state, where=mf.path / "decoder.safetensors")
        return cls(space, dit, dec, time_shift=mf.time_shift,
                   sampler=sampler or mf.config.diffusion.sampler).to(device)

    @classmethod
    def from_release(cls, dit_ckpt, dit_yaml, decoder_ckpt, decoder_json, *, da3_weights,
                     stats, dpt_head=None, encoder: str = "da3-base",
                     device: Union[str, torch.device] = "cpu",
                     sampler: Optional[SamplerConfig] = None) -> "NVSPipeline":
        """The release's files: `da3_level1.pt` + its YAML, `mae_decoder.pt` + config.json,
        the DA3 weights, `normalization_stats_level1.pt` and optionally `dpt_decoder.pt`;
        samples as the release's eval does (shift 31.18, Euler 50, CFG 1.5) unless `sampler`."""
        from gld.checkpoints.gld_release import load_release_decoder, load_release_dit
        from gld.latents.config import LatentConfig
        from gld.latents.space import build_latent_space

        stats = [str(stats)] if isinstance(stats, (str, Path)) else [str(s) for s in stats]
        space = build_latent_space(LatentConfig(encoder=encoder, weights=str(da3_weights),
                                                dpt_head=dpt_head, boundary_level=1,
                                                stats=stats, normalize=True), device)
        dit = load_release_dit(dit_ckpt, dit_yaml)
        dec = load_release_decoder(decoder_ckpt, decoder_json, in_channels=4 * space.channels)
        return cls(space, dit, dec, time_shift=dit.release.time_shift,
                   sampler=sampler or dit.release.sampler).to(device)

    def compile(self) -> "NVSPipeline":
        """torch.compile the DiT's blocks (the sampler's cost); first call compiles."""
        for blk in self.dit.blocks:
            blk.compile()
        return self

    # -- inputs --------------------------------------------------------------------------------
    @staticmethod
    def _check(src_images, src_K, src_c2w, tgt_K, tgt_c2w) -> tuple[int, int, int, int, int]:
        if src_images.dim() != 5 or src_images.shape[2] != 3:
            raise ValueError(f"source images: expected (B, S, 3, H, W), got "
                             f"{tuple(src_images.shape)}")
        B, S, _, H, W = src_images.shape
        if H % PATCH_SIZE or W % PATCH_SIZE:
            raise ValueError(f"image size {H}x{W} (HxW): both sides must be multiples of the "
                             f"patch size {PATCH_SIZE} (resize or crop first)")
        if S < 1:
            raise ValueError("at least one source view is needed")
        T = tgt_c2w.shape[1] if tgt_c2w.dim() == 4 else 0
        for name, t, shape in (("source K", src_K, (B, S, 3, 3)),
                               ("source c2w", src_c2w, (B, S, 4, 4)),
                               ("target K", tgt_K, (B, T, 3, 3)),
                               ("target c2w", tgt_c2w, (B, T, 4, 4))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected {shape}, got {tuple(t.shape)}")
        if T < 1:
            raise ValueError("at least one target camera is needed")
        check_cameras(src_c2w, src_K, (H, W), name="source camera")
        check_cameras(tgt_c2w, tgt_K, (H, W), name="target camera")
        return B, S, T, H, W

    def _timer(self, device: torch.device):
        def now() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()
        return now

    # -- the pipeline --------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, src_images: Tensor, src_K: Tensor, src_c2w: Tensor, tgt_K: Tensor,
                tgt_c2w: Tensor, seed: Optional[int] = None, progress: bool = False
                ) -> NVSOutput:
        """src_images (B, S, 3, H, W) in [0, 1] with their pixel intrinsics src_K (B, S, 3, 3)
        and OpenCV camera-to-world src_c2w (B, S, 4, 4); the targets' tgt_K (B, T, 3, 3),
        tgt_c2w (B, T, 4, 4) for the same image size. seed: the noise (default the sampler's)."""
        B, S, T, H, W = self._check(src_images, src_K, src_c2w, tgt_K, tgt_c2w)
        dev = next(self.dit.parameters()).device
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
        now, times = self._timer(dev), {}
        V, grid = S + T, (H // PATCH_SIZE, W // PATCH_SIZE)
        K = torch.cat([src_K, tgt_K], 1).to(dev, torch.float32)
        c2w = torch.cat([src_c2w, tgt_c2w], 1).to(dev, torch.float32)
        is_src = (torch.arange(V, device=dev) < S).expand(B, V)

        t0 = now()
        src_images = src_images.to(dev, torch.float32)
        src_lat = self.space.encode(src_images)          # Latent (B, S, N, C), normalised
        times["encode"] = now() - t0

        t0 = now()
        N, C = src_lat.z.shape[-2:]
        source = torch.zeros(B, V, N, C, device=dev)
        source[:, :S] = src_lat.z.float()
        cond = dict(source=source, is_src=is_src, c2w=c2w, K=K)

        def denoiser(x: Tensor, t: Tensor, drop: Optional[Tensor]) -> Tensor:
            rep = x.shape[0] // B
            kw = {k: v.repeat(rep, *([1] * (v.dim() - 1))) for k, v in cond.items()}
            with amp:
                return self.dit(x, t, image_size=(H, W), drop_camera=drop, **kw).float()

        seed = self.sampler.seed if seed is None else seed
        noise = initial_noise((B, V, N, C), seed, device=dev)
        z = sample(denoiser, noise, self.time_shift, self.sampler, progress=progress)
        z[:, :S] = src_lat.z.float()
        times["sample"] = now() - t0

        t0 = now()
        token = src_lat.cam_token[:, :1].expand(B, V, -1)
        lat = src_lat._replace(z=z.to(src_lat.z.dtype), cam_token=token)
        raw = self.space.raw_level(lat)
        deeper = self.space.propagate(lat, via=self.via)
        enc = self.space.encoder
        # absent shallower levels are zeros in the decoder form itself (not LN of zeros), as
        # the decoder's level dropout masks them
        absent = Level(torch.zeros_like(raw.features, dtype=torch.float32), token, grid)
        levels = ([absent] * lat.level + [enc.decoder_form(raw)]
                  + [enc.decoder_form(lv) for lv in deeper])
        times["propagate"] = now() - t0

        t0 = now()
        images = torch.zeros(B, T, 3, H, W, device=dev)
        if self.decoder is not None:
            with amp:
                feats = [lv.features[:, S:] for lv in levels]
                images = self.decoder(feats, (H, W)).float().clamp(0, 1)
        times["decode"] = now() - t0

        t0 = now()
        geo = enc.geometry(levels, (H, W))
        times["geometry"] = now() - t0
        times["total"] = sum(times[s] for s in STAGES)
        return NVSOutput(images=images, sources=src_images.clamp(0, 1), depth=geo["depth"],
                         depth_conf=geo["depth_conf"], w2c=geo["w2c"], K=geo["K"],
                         latents=z, timings=times)
