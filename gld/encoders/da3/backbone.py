"""The DA3 backbone: a DINOv2 ViT/14 with alternating local / global attention (docs/da3.md).

Tokens per view: token 0 (class token, overwritten by the camera token before block `alt_start`)
followed by the N = (H/14) * (W/14) patch tokens in row-major order.

Blocks i < alt_start attend within each view, without qk-norm or RoPE. From alt_start on, every
block has per-head LayerNorm on q and k, then 2D RoPE; odd blocks attend over all views' tokens
at once (global), even ones within each view (local). Local blocks place token 0 at (0, 0) and
patch (y, x) at (y+1, x+1); global blocks place every patch at (1, 1), so global attention
carries no patch position.

Level l (out block L = out_layers[l], a global block; `local` = output of block L-1):
    features  = cat[local, LN(out_L)][:, :, 1:]   (B, V, N, 2C)   decoder form (the default)
    features  = cat[local, out_L][:, :, 1:]       (B, V, N, 2C)   raw form (form="raw")
    cam_token = cat[local, out_L][:, :, 0]         (B, V, 2C)   (neither half normalised)
LN is the backbone's final LayerNorm (`norm`, eps 1e-5) on the second half only; `decoder_form`
turns raw features into the decoder form, bit-identically. The decoder form is what the heads
read; GLD's diffusion latent is the raw form (docs/release-facts.md).
`propagate` rebuilds the raw output of block L-1 from the local half and token 0 and runs the
deeper blocks, which reproduces the deeper levels exactly; with via="current" it instead
continues at block L+1 from the raw global half (the GLD release's route).

Attention goes through `kernels.attention.attention`, so the GPU gets the fast path; each
attention module passes its `attention_backend` ("auto" unless a caller chose one, see
`DA3.set_attention_backend`). Under autocast, q / k / v are cast to the autocast dtype before
that call (what autocast does inside SDPA anyway, so numbers are unchanged) because the
dispatcher picks its kernel from the dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gld.encoders.da3.config import PATCH_SIZE, DA3Config
from kernels.attention import BACKENDS, attention

__all__ = ["Level", "Block", "DA3Backbone", "rope_tables", "apply_rope", "sign_fold",
           "check_attention_backend", "FORMS", "check_form"]

FORMS = ("decoder", "raw")  # features [local | LN(global)] or [local | global]


class Level(NamedTuple):
    """One feature level of the latent space.

    features: (B, V, N, 2C) = [local | LN(global)] patch tokens (decoder form), or
              [local | global] (raw form, when asked for), N = gh * gw, row-major;
    cam_token: (B, V, 2C) = [local | global] token 0, raw (needed for exact propagation);
    grid: (gh, gw) patch grid, or None when unknown (then `propagate` needs the image size).
    """

    features: Tensor
    cam_token: Tensor
    grid: Optional[tuple[int, int]] = None


# ---------------------------------------------------------------------------------------------
# 2D RoPE
# ---------------------------------------------------------------------------------------------

def _rope_1d_table(half_dim: int, max_pos: int, base: float, device) -> tuple[Tensor, Tensor]:
    """cos / sin tables (max_pos + 1, half_dim) in fp32 for positions 0..max_pos.

    Built like the official code (table over all positions, then gathered) so that the fp32
    numbers are bit-identical.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, half_dim, 2, device=device).float() / half_dim))
    pos = torch.arange(max_pos + 1, device=device, dtype=torch.float32)
    angles = torch.einsum("i,j->ij", pos, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rope_tables(grid: tuple[int, int], head_dim: int, base: float, device,
                kind: str) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (1 + gh * gw, head_dim) fp32, for one view's tokens.

    kind "local": token 0 at (0, 0), patch (y, x) at (y+1, x+1); kind "global": every patch at
    (1, 1). Channels [0, d/2) rotate with the row position, [d/2, d) with the column.
    """
    gh, gw = grid
    if kind == "local":
        ys = torch.arange(gh, device=device).repeat_interleave(gw) + 1
        xs = torch.arange(gw, device=device).repeat(gh) + 1
    elif kind == "global":
        ys = torch.ones(gh * gw, dtype=torch.long, device=device)
        xs = ys
    else:
        raise ValueError(f"rope_tables: kind must be 'local' or 'global', got {kind!r}")
    zero = torch.zeros(1, dtype=torch.long, device=device)
    ys, xs = torch.cat([zero, ys]), torch.cat([zero, xs])
    cos_t, sin_t = _rope_1d_table(head_dim // 2, int(max(ys.max(), xs.max())), base, device)
    cos = torch.cat([cos_t[ys], cos_t[xs]], dim=-1)
    sin = torch.cat([sin_t[ys], sin_t[xs]], dim=-1)
    return cos, sin


def _swap_quarters(x: Tensor) -> Tensor:
    """[a, b | c, e] -> [b, a | e, c] along the last dim (one gather kernel)."""
    d = x.shape[-1]
    return x.unflatten(-1, (2, 2, d // 4)).flip(-2).flatten(-3)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x (B, h, T, d) with tables (T, d) -> rotated x, computed in fp32, returned in x.dtype.

    Rotate-half inside each half: x * cos + [-b, a | -e, c] * sin, written as
    x * cos + [b, a | e, c] * sin_signed with the sign folded into the table (bit-identical:
    negation is exact), which saves kernels.
    """
    xf = x.float()
    return (xf * cos + _swap_quarters(xf) * sin_signed).to(x.dtype)


def sign_fold(sin: Tensor) -> Tensor:
    """sin table (T, d) -> the table `apply_rope` takes: quarters 0 and 2 negated."""
    d = sin.shape[-1]
    sign = torch.ones(4, device=sin.device, dtype=sin.dtype)
    sign[0] = sign[2] = -1
    return (sin.unflatten(-1, (4, d // 4)) * sign[:, None]).flatten(-2)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (biases on)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out or dim_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _attention_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        return q.to(dt), k.to(dt), v.to(dt)
    return q, k, v


def check_form(form: str) -> str:
    """`form` if it names a level form ("decoder" or "raw"), else a ValueError."""
    if form not in FORMS:
        raise ValueError(f"unknown level form {form!r}; choose from {', '.join(FORMS)}")
    return form


def check_attention_backend(name: str) -> str:
    """`name` if `kernels.attention.attention` accepts it as `backend=`, else a ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name


class Attention(nn.Module):
    """Multi-head self-attention; optional per-head qk LayerNorm (eps 1e-5) and 2D RoPE.

    x (B, T, C) -> (B, T, C); rope: (cos, sign-folded sin) each (T, d) or None.
    `attention_backend` is passed to `kernels.attention.attention` as `backend=`.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = False,
                 attention_backend: str = "auto") -> None:
        super().__init__()
        self.attention_backend = check_attention_backend(attention_backend)
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-5) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-5) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, T, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = attention(*_attention_dtype(q, k, v), backend=self.attention_backend)
        return self.proj(o.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm ViT block with LayerScale on both branches. x (B, T, C) -> (B, T, C)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, eps: float = 1e-6,
                 ls_init: float = 1.0, mlp_ratio: int = 4, attention_backend: str = "auto") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qk_norm, attention_backend)
        self.ls1 = LayerScale(dim, ls_init)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.ls2 = LayerScale(dim, ls_init)

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        """(B', 3, H, W) -> (B', N, C)."""
        return self.proj(x).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------

class DA3Backbone(nn.Module):
    """ImageNet-normalised images (B, V, 3, H, W) -> four `Level`s (see the module docstring).

    Parameters keep the official module names below `backbone.pretrained.` (our prefix is
    `backbone.`): patch_embed.proj, cls_token (1, 1, C), camera_token (1, 2, C),
    pos_embed (1, 1 + 37*37, C), blocks.{i}, norm. `attention_backend`: see `Attention`.
    """

    def __init__(self, cfg: DA3Config, attention_backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.dim
        self.patch_embed = PatchEmbed(C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid ** 2, C))
        self.blocks = nn.ModuleList(
            Block(C, cfg.heads, qk_norm=i >= cfg.alt_start, attention_backend=attention_backend)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(C, eps=1e-5)
        self._rope_cache: dict = {}

    # -- tokens --------------------------------------------------------------------------------
    def _pos_embed_for(self, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """Learned table resized to the grid: (1, 1 + gh*gw, C).

        Bicubic with scale_factor ((gh+0.1)/37, (gw+0.1)/37), antialias off, fp32, as DINOv2
        does (passing the scale factor, not the size, is what makes it bit-exact). At the
        training grid the table is used as stored (fp32).
        """
        gh, gw = grid
        M = self.cfg.pos_grid
        if gh == gw == M:
            return self.pos_embed
        table = self.pos_embed.float()
        patch = table[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, scale_factor=((gh + 0.1) / M, (gw + 0.1) / M),
                              mode="bicubic", antialias=False)
        if patch.shape[-2:] != (gh, gw):
            raise RuntimeError(f"position table resized to {tuple(patch.shape[-2:])}, expected "
                               f"{(gh, gw)}")
        patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([table[:, :1], patch], dim=1).to(dtype)

    def embed(self, images: Tensor) -> Tensor:
        """Normalised images (B, V, 3, H, W), H and W multiples of 14 -> tokens (B, V, 1+N, C)."""
        B, V, _, H, W = images.shape
        grid = (H // PATCH_SIZE, W // PATCH_SIZE)
        x = self.patch_embed(images.reshape(B * V, 3, H, W))
        cls = self.cls_token.expand(B * V, 1, -1)
        # Under autocast the conv gives bf16 and the fp32 class token promotes the stream to fp32
        # (as in the official code); the position table follows the stream's dtype.
        x = torch.cat([cls, x], dim=1)
        x = x + self._pos_embed_for(grid, x.dtype)
        return x.reshape(B, V, *x.shape[1:])

    def _ropes(self, grid: tuple[int, int], views: int, device) -> dict[str, tuple[Tensor, Tensor]]:
        key = (grid, views, str(device))
        if key not in self._rope_cache:
            d, base = self.cfg.head_dim, self.cfg.rope_base
            local = rope_tables(grid, d, base, device, "local")
            glob = rope_tables(grid, d, base, device, "global")
            local = (local[0], sign_fold(local[1]))
            glob = (glob[0].repeat(views, 1), sign_fold(glob[1]).repeat(views, 1))
            if len(self._rope_cache) > 16:
                self._rope_cache.clear()
            self._rope_cache[key] = {"local": local, "global": glob}
        return self._rope_cache[key]

    def default_camera_tokens(self, batch: int, views: int) -> Tensor:
        """(B, V, C): view 0 gets camera_token[:, 0], every other view camera_token[:, 1]."""
        ref = self.camera_token[:, :1].expand(batch, 1, -1)
        src = self.camera_token[:, 1:2].expand(batch, views - 1, -1)
        return torch.cat([ref, src], dim=1)

    # -- blocks --------------------------------------------------------------------------------
    def decoder_form(self, features: Tensor) -> Tensor:
        """Raw features (..., 2C) = [local | global] -> [local | LN(global)], same shape."""
        C = self.cfg.dim
        return torch.cat([features[..., :C], self.norm(features[..., C:])], dim=-1)

    def run_blocks(self, x: Tensor, start: int, local: Optional[Tensor], grid: tuple[int, int],
                   cam_token: Optional[Tensor] = None, collect: Sequence[int] = (),
                   form: str = "decoder") -> list[Level]:
        """Run blocks start.. on tokens x (B, V, 1+N, C).

        local: the latest local-block output (needed when `start` is a global block);
        cam_token (B, V, C) replaces token 0 before block alt_start (None: learned tokens);
        collect: the out blocks whose levels are returned, in order, in `form` (FORMS).
        """
        raw = check_form(form) == "raw"
        cfg = self.cfg
        B, V, T, C = x.shape
        ropes = self._ropes(grid, V, x.device)
        levels = []
        last = max(collect) if collect else cfg.depth - 1
        for i in range(start, last + 1):
            if i == cfg.alt_start:
                tok = self.default_camera_tokens(B, V) if cam_token is None else cam_token
                x = torch.cat([tok[:, :, None].to(x.dtype), x[:, :, 1:]], dim=2)
            rope_on = i >= cfg.alt_start
            if cfg.is_global(i):
                y = self.blocks[i](x.reshape(B, V * T, C), ropes["global"] if rope_on else None)
                x = y.reshape(B, V, T, C)
            else:
                y = self.blocks[i](x.reshape(B * V, T, C), ropes["local"] if rope_on else None)
                x = local = y.reshape(B, V, T, C)
            if i in collect:
                if local is None:
                    raise RuntimeError(f"level at block {i} needs the output of a local block")
                glob = x[:, :, 1:] if raw else self.norm(x[:, :, 1:])
                feats = torch.cat([local[:, :, 1:], glob], dim=-1)
                cam = torch.cat([local[:, :, 0], x[:, :, 0]], dim=-1)
                levels.append(Level(feats, cam, grid))
        return levels

    def forward(self, images: Tensor, cam_token: Optional[Tensor] = None,
                form: str = "decoder") -> list[Level]:
        """Normalised images (B, V, 3, H, W) [+ camera tokens (B, V, C)] -> levels 0..3 in
        `form` ("decoder" or "raw")."""
        B, V, _, H, W = images.shape
        if H % PATCH_SIZE or W % PATCH_SIZE:
            raise ValueError(f"DA3: image size {(H, W)} must be a multiple of {PATCH_SIZE} "
                             "on both sides")
        grid = (H // PATCH_SIZE, W // PATCH_SIZE)
        x = self.embed(images)
        return self.run_blocks(x, 0, None, grid, cam_token, collect=self.cfg.out_layers, form=form)

    def propagate(self, level: Level, from_level: int, grid: tuple[int, int],
                  form: str = "decoder", via: str = "local") -> list[Level]:
        """Level `from_level` -> levels from_level+1 .. 3 in `form`, exactly.

        via "local": token 0's local half and the patch features' local half rebuild the raw
        output of block L-1 (L = out_layers[from_level]); blocks L.. then run as in `forward`.
        Either form of the level works (only its local half is read).
        via "current": the raw global half (features in the RAW form, token 0's second half)
        is the output of block L; blocks L+1.. run from it. The same for an encoded level; for
        a generated one it uses the generated global half instead of recomputing it.
        """
        if via not in ("local", "current"):
            raise ValueError(f"propagate: via must be 'local' or 'current', got {via!r}")
        check_form(form)
        cfg = self.cfg
        C = cfg.dim
        feats, cam = level.features, level.cam_token
        B, V, N, C2 = feats.shape
        if C2 != 2 * C or cam.shape != (B, V, C2) or N != grid[0] * grid[1]:
            raise ValueError(
                f"propagate: expected features (B, V, {grid[0] * grid[1]}, {2 * C}) and cam_token "
                f"(B, V, {2 * C}) for grid {grid}; got {tuple(feats.shape)} and {tuple(cam.shape)}")
        if from_level == len(cfg.out_layers) - 1:
            return []
        deeper = cfg.out_layers[from_level + 1:]
        if via == "local":
            raw = torch.cat([cam[..., :C][:, :, None], feats[..., :C]], dim=2)
            return self.run_blocks(raw, cfg.out_layers[from_level], raw, grid, collect=deeper,
                                   form=form)
        # Block L+1 is local (L is global and odd), so it sets `local` before any level.
        out = torch.cat([cam[..., C:][:, :, None], feats[..., C:]], dim=2)
        return self.run_blocks(out, cfg.out_layers[from_level] + 1, None, grid, collect=deeper,
                               form=form)
