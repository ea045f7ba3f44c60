"""DiT-DH (gld/models): shapes, the release's parameter layout, camera invariances, CFG, overfit."""
import math

import pytest
import torch

from gld.diffusion import SamplerConfig, flow_loss, guided_velocity, interpolate
from gld.geometry.cameras import rigid_inverse
from gld.geometry.rotations import quat_to_rotmat
from gld.models import DIT_PRESETS, DiTDH, dit_preset
from gld.models.cameras import normalize_cameras

P = 14


def randomize_(model, seed=0, std=0.05):
    """Random weights everywhere (adaLN-Zero would make the output 0 and every test vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny(convention="release", **kw):
    kw = {"camera_dropout": 0.0, **kw}
    cfg = dit_preset("tiny", latent_channels=8, convention=convention, **kw)
    return randomize_(DiTDH(cfg)).eval()


def cameras(B, V, H, W, seed=0):
    """Random rigid c2w looking roughly at the origin and plausible pixel intrinsics."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, V, 4, generator=g, dtype=torch.float64)
    R = quat_to_rotmat(q / q.norm(dim=-1, keepdim=True))
    c2w = torch.eye(4, dtype=torch.float64).repeat(B, V, 1, 1)
    c2w[..., :3, :3] = R
    c2w[..., :3, 3] = torch.randn(B, V, 3, generator=g, dtype=torch.float64) * 2
    f = 0.8 * W + 0.2 * W * torch.rand(B, V, generator=g, dtype=torch.float64)
    K = torch.zeros(B, V, 3, 3, dtype=torch.float64)
    K[..., 0, 0], K[..., 1, 1] = f, f
    K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = W / 2, H / 2, 1
    return c2w.float(), K.float()


def inputs(B=2, V=3, H=28, W=42, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = (H // P) * (W // P)
    x = torch.randn(B, V, N, C, generator=g)
    is_src = torch.zeros(B, V, dtype=torch.bool)
    is_src[:, 0] = True
    src = torch.randn(B, V, N, C, generator=g) * is_src[:, :, None, None]
    t = torch.rand(B, generator=g)
    c2w, K = cameras(B, V, H, W, seed)
    return dict(x_t=x, t=t, source=src, is_src=is_src, c2w=c2w, K=K, image_size=(H, W))


def call(model, d, **over):
    d = {**d, **over}
    x, t = d.pop("x_t"), d.pop("t")
    return model(x, t, **d)


def test_release_parameter_layout_and_size():
    with torch.device("meta"):
        m = DiTDH(dit_preset("level1"))
    sd = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(783.3e6, rel=1e-3)
    expect = {"x_embedder_ref.proj.weight": (2048, 3072, 1, 1),
              "s_embedder_tgt.proj.weight": (768, 3072, 1, 1), "s_projector.weight": (2048, 768),
              "t_embedder.W": (256,), "t_embedder.mlp.0.weight": (768, 512),
              "camera_embedder.proj.weight": (768, 7, 14, 14),
              "blocks.27.attn.qkv.weight": (2304, 768), "blocks.0.mlp.w12.weight": (4096, 768),
              "blocks.0.mlp.w3.weight": (768, 2048), "blocks.0.adaLN_modulation.1.weight": (4608, 768),
              "blocks.33.mlp.w12.weight": (10922, 2048), "blocks.33.mlp.w3.weight": (2048, 5461),
              "blocks.33.adaLN_modulation.1.weight": (12288, 2048),
              "final_layer.linear.weight": (1536, 2048), "final_layer.norm_final.weight": (2048,),
              "final_layer.adaLN_modulation.1.weight": (4096, 2048)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "blocks.34.norm1.weight" not in sd


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_every_preset_builds_with_whole_head_dims(name):
    cfg = dit_preset(name)
    with torch.device("meta"):
        m = DiTDH(cfg)
    assert len(m.blocks) == sum(cfg.depths)
    assert all(w % h == 0 and (w // h) % 8 == 0 for w, h in zip(cfg.widths, cfg.heads))
    if name == "level1":                            # the release's backbone and head head dims
        assert [w // h for w, h in zip(cfg.widths, cfg.heads)] == [48, 128]


def test_narrow_head_is_named():
    # the release's level-1 model and the small preset on DA3-Small's 768 channels are fine
    assert dit_preset("level1").narrow_head() is None
    assert dit_preset("small", latent_channels=768).narrow_head() is None
    msg = dit_preset("tiny", latent_channels=768).narrow_head()
    assert "head width 128 is below the latent's 768 channels" in msg


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_forward_shapes(name):
    m = randomize_(DiTDH(dit_preset(name, latent_channels=8)))
    d = inputs(B=1, V=2, H=14, W=28)
    assert call(m.eval(), d).shape == d["x_t"].shape


def test_adaln_zero_init_predicts_zero():
    m = DiTDH(dit_preset("tiny", latent_channels=8)).eval()
    assert torch.count_nonzero(call(m, inputs())) == 0


@pytest.mark.parametrize("convention", ["release", "textbook"])
def test_output_unchanged_by_one_similarity_of_all_cameras(convention):
    m = tiny(convention)
    d = inputs()
    ref = call(m, d)
    G = torch.eye(4)
    G[:3, :3] = quat_to_rotmat(torch.tensor([0.3, -0.2, 0.5, 0.8]) / math.sqrt(1.02))
    G[:3, 3] = torch.tensor([5.0, -3.0, 2.0])
    moved = G @ d["c2w"]
    moved[..., :3, 3] *= 3.7                        # and one scale of the whole scene
    out = call(m, d, c2w=moved)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert not torch.allclose(call(m, d, c2w=d["c2w"].flip(1)), ref, atol=1e-3)


def test_release_pose_normalisation_is_relative_to_the_last_view_with_linf_scale():
    c2w, _ = cameras(1, 4, 28, 28)
    n = normalize_cameras(c2w, "release")
    torch.testing.assert_close(n[0, -1], torch.eye(4), atol=1e-6, rtol=0)
    assert n[..., :3, 3].abs().amax().item() == pytest.approx(1.0, abs=1e-6)
    rel = rigid_inverse(c2w[:, -1:]) @ c2w
    torch.testing.assert_close(n[..., :3, :3], rel[..., :3, :3])
    t = normalize_cameras(c2w, "textbook")[..., :3, 3]
    assert t.norm(dim=-1).amax().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("convention", ["release", "textbook"])
def test_camera_dropped_branch_ignores_the_cameras(convention):
    m = tiny(convention)
    d = inputs()
    drop = torch.tensor([True, False])
    a = call(m, d, drop_camera=drop)
    c2w2, K2 = cameras(2, 3, 28, 42, seed=5)
    b = call(m, d, drop_camera=drop, c2w=c2w2, K=K2)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert not torch.allclose(a[1], b[1], atol=1e-3)   # the kept sample does see its cameras


def test_conventions_differ_and_embedders_follow_is_src():
    d = inputs()
    rel, tb = tiny("release"), tiny("textbook")
    assert not torch.allclose(call(rel, d), call(tb, d), atol=1e-4)
    is_src = d["is_src"].clone()
    is_src[:, 1] = True
    assert not torch.allclose(call(rel, d, is_src=is_src), call(rel, d), atol=1e-4)


def test_cfg_scale_one_is_the_conditional_prediction_and_branches_batch_cleanly():
    m = tiny()
    d = inputs()
    B = d["x_t"].shape[0]
    rest = {k: v for k, v in d.items() if k not in ("x_t", "t")}

    def den(x, t, drop):
        rep = x.shape[0] // B
        kw = {k: (v.repeat(rep, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v)
              for k, v in rest.items()}
        return m(x, t, drop_camera=drop, **kw)
    cond = call(m, d, t=torch.full((B,), 0.4))
    torch.testing.assert_close(guided_velocity(den, d["x_t"], 0.4, SamplerConfig(cfg_scale=1.0)),
                               cond, rtol=0, atol=0)
    uncond = call(m, d, t=torch.full((B,), 0.4), drop_camera=torch.ones(B, dtype=torch.bool))
    g = guided_velocity(den, d["x_t"], 0.4, SamplerConfig(cfg_scale=2.5))
    torch.testing.assert_close(g, uncond + 2.5 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_input_errors_name_the_problem():
    m = tiny()
    d = inputs()
    with pytest.raises(ValueError, match="last view is the pose reference"):
        call(m, d, is_src=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"multiples of 14"):
        call(m, d, image_size=(28, 28))
    with pytest.raises(ValueError, match=r"K must be \(B, V, 3, 3\)"):
        call(m, d, K=d["K"][:, :2])


def test_training_camera_dropout_draws_per_sample():
    m = tiny(camera_dropout=1.0).train()
    d = inputs()
    a = call(m, d)
    c2w2, K2 = cameras(2, 3, 28, 42, seed=9)
    torch.testing.assert_close(call(m, d, c2w=c2w2, K=K2), a, rtol=0, atol=0)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = DiTDH(dit_preset("tiny", latent_channels=8, camera_dropout=0.0)).train()
    d = inputs(B=2, V=3)
    x = torch.randn_like(d["x_t"])
    eps = torch.randn_like(x)
    t = torch.tensor([0.3, 0.7])
    rest = {k: v for k, v in d.items() if k not in ("x_t", "t")}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = flow_loss(m(interpolate(x, eps, t), t, **rest), x, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # at init the prediction is 0, so the loss is E|eps - x|^2 = 2; a model that fits is far below
    assert losses[0] == pytest.approx(2.0, rel=0.15)
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_attention_choice_is_per_model_and_checked():
    a, b = tiny(), tiny()
    a.set_attention_backend("reference")
    assert {blk.attention_backend for blk in a.blocks} == {"reference"}
    assert {blk.attention_backend for blk in b.blocks} == {"auto"}
    d = inputs()
    torch.testing.assert_close(call(a, d), call(b, d), rtol=0, atol=0)   # CPU: auto = reference
    with pytest.raises(ValueError, match="attention backend 'fast'; choose one of"):
        a.set_attention_backend("fast")


def test_training_flops_match_the_release_anchor():
    """docs/gpu.md: 92.3 TFLOP per level-1 sample at 8 x 504x504 (6 P L + 3 x attention)."""
    from gld.models.measure import train_flops_per_sample
    with torch.device("meta"):
        m = DiTDH(dit_preset("level1"))
    assert train_flops_per_sample(m, 8, 36 * 36) / 1e12 == pytest.approx(92.3, abs=0.05)
