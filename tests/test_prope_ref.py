"""PRoPE reference against an explicit per-token D_t construction and its invariances."""
import math

import pytest
import torch

from kernels import (BACKENDS, PRoPECameras, PRoPEKernels, attention, prope_attention,
                     prope_attention_ref)
from kernels.prope.reference import CONVENTIONS, prope_matrices, prope_transform, rope_tables
from tests.geometry_utils import random_c2w, random_K, random_rotation


def make_inputs(B=2, h=2, V=3, patches=(3, 5), d=16, image=(42, 70), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = V * patches[0] * patches[1]
    q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    c2w = random_c2w(B * V, g, radius=1.0).reshape(B, V, 4, 4)
    w2c = torch.linalg.inv(c2w)
    K = random_K(B * V, *image, g).reshape(B, V, 3, 3)
    return q, k, v, w2c, K


def explicit_mats(w2c, K, image, convention="textbook"):
    """(P, A) (B, V, 4, 4) from scratch: P = lift(K_n) T; the key/value matrix A = P^-1
    (textbook) or (lift(K_n)^-1 T)^-1 (release: T^-1 lift(K_n)), by 4x4 inverses."""
    H, W = image
    B, V = w2c.shape[:2]
    Kn = K.clone()
    Kn[..., 0, :] /= W
    Kn[..., 1, :] /= H
    Kn[..., 0, 2] -= 0.5
    Kn[..., 1, 2] -= 0.5
    lift = torch.zeros(B, V, 4, 4, dtype=torch.float64)
    lift[..., :3, :3] = Kn
    lift[..., 3, 3] = 1
    P = lift @ w2c
    if convention == "textbook":
        return P, torch.linalg.inv(P)
    return P, torch.linalg.inv(torch.linalg.inv(lift) @ w2c)


def explicit_D(w2c, K, patches, image, d, convention="textbook"):
    """(B, N, d, d) each: D_t = blockdiag(I_{d/8} (x) P_c, R(x)^T, R(y)^T) and the key/value map
    E_t = blockdiag(I_{d/8} (x) A_c, R(x), R(y)) (textbook: E_t = D_t^-1), built from scratch."""
    B, V = w2c.shape[:2]
    P, A = explicit_mats(w2c, K, image, convention)
    nf = d // 8
    freq = torch.tensor([100.0 ** (-f / nf) for f in range(nf)], dtype=torch.float64)

    def R(pos):  # R applied to [a; b] gives [a cos + b sin; -a sin + b cos]
        c, s = torch.diag(torch.cos(pos * freq)), torch.diag(torch.sin(pos * freq))
        return torch.cat([torch.cat([c, s], 1), torch.cat([-s, c], 1)], 0)

    ph, pw = patches
    Ds, Es = [], []
    eye = torch.eye(d // 8, dtype=torch.float64)
    for b in range(B):
        for c in range(V):
            for y in range(ph):
                for x in range(pw):
                    Ds.append(torch.block_diag(torch.kron(eye, P[b, c]), R(x).T, R(y).T))
                    Es.append(torch.block_diag(torch.kron(eye, A[b, c].contiguous()), R(x), R(y)))
    return (torch.stack(Ds).reshape(B, V * ph * pw, d, d),
            torch.stack(Es).reshape(B, V * ph * pw, d, d))


def explicit_prope(q, k, v, w2c, K, patches, image, convention="textbook"):
    """q' = D^T q, k' = E k, v' = E v per token, plain softmax attention, o = D o'."""
    d = q.shape[-1]
    D, E = (m[:, None] for m in explicit_D(w2c, K, patches, image, d, convention))
    qp = (D.transpose(-1, -2) @ q[..., None])[..., 0]
    kp = (E @ k[..., None])[..., 0]
    vp = (E @ v[..., None])[..., 0]
    att = torch.softmax(qp @ kp.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (D @ (att @ vp)[..., None])[..., 0]


@pytest.mark.parametrize("d", [8, 16, 48])
@pytest.mark.parametrize("patches,V", [((3, 5), 3), ((2, 2), 1), ((1, 4), 2)])
def test_matches_explicit_per_token_construction(d, patches, V):
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(V=V, patches=patches, d=d, image=image)
    ref = explicit_prope(q, k, v, w2c, K, patches, image)
    out = prope_attention_ref(q, k, v, w2c, K, patches, image)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_closed_form_inverse():
    _, _, _, w2c, K = make_inputs()
    P, P_inv = prope_matrices(w2c, K, (42, 70), torch.float64)
    torch.testing.assert_close(P @ P_inv, torch.eye(4, dtype=torch.float64).expand_as(P),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("convention", ["textbook", "release"])
def test_closed_form_matrices_match_4x4_inverses(convention):
    _, _, _, w2c, K = make_inputs()
    want = explicit_mats(w2c, K, (42, 70), convention)
    got = prope_matrices(w2c, K, (42, 70), torch.float64, convention)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert torch.equal(got[0], prope_matrices(w2c, K, (42, 70), torch.float64)[0])


@pytest.mark.parametrize("convention", ["textbook", "release"])
@pytest.mark.parametrize("d,patches,V", [(16, (3, 5), 3), (48, (2, 3), 2)])
def test_conventions_match_explicit_outputs_and_gradients(convention, d, patches, V):
    """Output and dq, dk, dv (autograd through each) of the reference against the per-token
    float64 construction; float64 throughout, so to 1e-10."""
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(V=V, patches=patches, d=d, image=image, seed=d)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for fn in (explicit_prope, prope_attention_ref):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        o = fn(*ins, w2c, K, patches, image, convention=convention)
        o.backward(do)
        results.append([o.detach()] + [t.grad for t in ins])
    for name, a, b in zip(("o", "dq", "dk", "dv"), results[1], results[0]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_release_convention_differs_and_textbook_is_the_default():
    q, k, v, w2c, K = make_inputs()
    out = prope_attention_ref(q, k, v, w2c, K, (3, 5), (42, 70))
    assert torch.equal(out, prope_attention_ref(q, k, v, w2c, K, (3, 5), (42, 70),
                                                convention="textbook"))
    rel = prope_attention_ref(q, k, v, w2c, K, (3, 5), (42, 70), convention="release")
    assert (rel - out).abs().max() > 1e-3 * out.abs().max()


def test_release_gradients_follow_the_transposed_key_value_matrix():
    """3 views of one patch, d = 8 (RoPE angles 0: only the camera part acts): per token of
    camera c, q' = P_c^T q, k' = A_c k, v' = A_c v, o = P_c o', so dq = P_c dq',
    dk = A_c^T dk', dv = A_c^T dv' with dq', dk', dv' plain attention's gradients."""
    q, k, v, w2c, K = make_inputs(B=1, h=1, V=3, patches=(1, 1), d=8, image=(14, 14))
    P, A = prope_matrices(w2c, K, (14, 14), torch.float64, "release")
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = prope_attention_ref(*ins, w2c, K, (1, 1), (14, 14), convention="release")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    o.backward(do)

    def per_token(x, M):   # x (1, 1, 3, 8): token t's two 4-chunks times M[t]; RoPE half kept
        cam = torch.einsum("tij,bhtj->bhti", M[0], x[..., :4])
        return torch.cat([cam, x[..., 4:]], -1)
    primed = [per_token(q, P.transpose(-1, -2)), per_token(k, A), per_token(v, A)]
    primed = [t.clone().requires_grad_(True) for t in primed]
    op = torch.softmax(primed[0] @ primed[1].transpose(-1, -2) / math.sqrt(8), -1) @ primed[2]
    per_token(op, P).backward(do)
    At = A.transpose(-1, -2)
    for got, want in zip((t.grad for t in ins), (per_token(primed[0].grad, P),
                                                 per_token(primed[1].grad, At),
                                                 per_token(primed[2].grad, At))):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_convention_errors_name_the_value_and_choices():
    q, k, v, w2c, K = make_inputs()
    with pytest.raises(ValueError, match="PRoPECameras: convention='paper'; choose one of "
                                         "'textbook', 'release'"):
        PRoPECameras(w2c, K, (3, 5), (42, 70), convention="paper")
    with pytest.raises(ValueError, match="prope_attention: convention='Release'"):
        prope_attention_ref(q, k, v, w2c, K, (3, 5), (42, 70), convention="Release")
    with pytest.raises(ValueError, match="prope_matrices: convention='x'"):
        prope_matrices(w2c, K, (42, 70), convention="x")


def test_invariant_to_one_rigid_transform_of_all_cameras():
    q, k, v, w2c, K = make_inputs()
    g = torch.Generator().manual_seed(5)
    M = torch.eye(4, dtype=torch.float64)
    M[:3, :3] = random_rotation(1, g)[0]
    M[:3, 3] = torch.tensor([0.3, -1.0, 2.0])
    # New world frame x' = M x: world-to-camera becomes w2c @ M^-1.
    moved = w2c @ torch.linalg.inv(M)
    out = prope_attention_ref(q, k, v, w2c, K, (3, 5), (42, 70))
    out2 = prope_attention_ref(q, k, v, moved, K, (3, 5), (42, 70))
    torch.testing.assert_close(out2, out, atol=1e-10, rtol=1e-10)
    # A change of the cameras that is NOT one rigid transform changes the output.
    other = w2c.clone()
    other[:, 0] = other[:, 0] @ torch.linalg.inv(M)
    assert (prope_attention_ref(q, k, v, other, K, (3, 5), (42, 70)) - out).abs().max() > 1e-3


def identity_cameras(B, V, image):
    H, W = image
    K = torch.tensor([[W, 0, W / 2], [0, H, H / 2], [0, 0, 1]], dtype=torch.float64)
    return torch.eye(4, dtype=torch.float64).expand(B, V, 4, 4), K.expand(B, V, 3, 3)


def test_identity_cameras_zero_positions_give_plain_attention():
    B, h, V, d = 2, 3, 6, 32
    q, k, v, _, _ = make_inputs(B=B, h=h, V=V, patches=(1, 1), d=d)
    w2c, K = identity_cameras(B, V, (14, 14))
    P, _ = prope_matrices(w2c, K, (14, 14), torch.float64)
    assert torch.equal(P, torch.eye(4, dtype=torch.float64).expand_as(P))
    out = prope_attention_ref(q, k, v, w2c, K, (1, 1), (14, 14))
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    torch.testing.assert_close(out, plain, atol=1e-12, rtol=1e-12)


def test_identity_cameras_with_positions_differ_from_plain_attention():
    """With P = I the RoPE part still acts on distinct patch positions."""
    B, V, d = 1, 2, 16
    q, k, v, _, _ = make_inputs(B=B, h=1, V=V, patches=(1, 4), d=d)
    w2c, K = identity_cameras(B, V, (14, 56))
    out = prope_attention_ref(q, k, v, w2c, K, (1, 4), (14, 56))
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    assert (out - plain).abs().max() > 1e-3  # positions do matter


def test_gradcheck_float64():
    q, k, v, w2c, K = make_inputs(B=1, h=1, V=2, patches=(2, 2), d=8)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: prope_attention_ref(q, k, v, w2c, K, (2, 2), (28, 28)), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_work(dtype):
    """16-bit / fp32 inputs (cameras fp32): output in the input dtype, max error relative to
    max |o| within the arithmetic's bound. Six roundings to dtype of unit roundoff u (q, k, v,
    their transforms, the attention output) each move o by at most u; the scores s rounded
    through q', k' (and in 16-bit SDPA) change each softmax weight by a factor exp(+-3u|s|), so
    the weights (numerator and normaliser) by at most 6u max|s|; fp32 accumulation over d + N
    terms adds (d + N) u_fp32."""
    q, k, v, w2c, K = make_inputs(d=16)
    ref = prope_attention_ref(q, k, v, w2c, K, (3, 5), (42, 70))
    out = prope_attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), w2c.float(), K.float(),
                              (3, 5), (42, 70))
    assert out.dtype == dtype
    P, P_inv = prope_matrices(w2c, K, (42, 70), torch.float64)
    tables = rope_tables((3, 5), 16, torch.float64)
    scores = (prope_transform(q, P, tables, 3, transpose=True)
              @ prope_transform(k, P_inv, tables, 3).transpose(-1, -2)) / math.sqrt(16)
    u = torch.finfo(dtype).eps / 2
    tol = u * (6 + 6 * scores.abs().max().item()) + (16 + 45) * torch.finfo(torch.float32).eps / 2
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()


def test_shape_errors_name_the_argument():
    q, k, v, w2c, K = make_inputs()
    with pytest.raises(ValueError, match=r"N=45 tokens but V\*ph\*pw = 3\*3\*4 = 36"):
        prope_attention_ref(q, k, v, w2c, K, (3, 4), (42, 56))
    with pytest.raises(ValueError, match=r"head dim d=12 must be divisible by 8"):
        prope_attention_ref(q[..., :12], k[..., :12], v[..., :12], w2c, K, (3, 5), (42, 70))
    with pytest.raises(ValueError, match=r"K must be \(B=2, V=3, 3, 3\)"):
        prope_attention_ref(q, k, v, w2c, K[:, :2], (3, 5), (42, 70))
    with pytest.raises(ValueError, match=r"w2c must be \(B=2, V, 4, 4\)"):
        prope_attention_ref(q, k, v, w2c[:1], K, (3, 5), (42, 70))


def test_attention_entry_point_dispatch():
    q, k, v, w2c, K = make_inputs(dtype=torch.float32)
    cams = PRoPECameras(w2c.float(), K.float(), (3, 5), (42, 70))
    ref = prope_attention_ref(q, k, v, w2c.float(), K.float(), (3, 5), (42, 70))
    for backend in ("auto", "reference"):   # CPU: the reference, whatever the kernel choice
        got = attention(q, k, v, cams, backend=backend, prope_kernels=PRoPEKernels(forward="ws"))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for convention in CONVENTIONS:   # the cameras' convention reaches every path
        cams_c = PRoPECameras(w2c.float(), K.float(), (3, 5), (42, 70), convention=convention)
        want = prope_attention_ref(q, k, v, w2c.float(), K.float(), (3, 5), (42, 70),
                                   convention=convention)
        for got in (attention(q, k, v, cams_c, backend="reference"),
                    prope_attention(q, k, v, w2c.float(), K.float(), (3, 5), (42, 70),
                                    convention=convention)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), -1) @ v
    # both fp32, summing over d = 16 and N = 45 terms: within (d + N) u = 3.6e-6 (u = 2^-24)
    # of each other relative to |o|; 1e-5 leaves room for the softmax's exp
    for backend in ("auto", "sdpa", "sdpa_math"):
        torch.testing.assert_close(attention(q, k, v, backend=backend), plain, atol=1e-5,
                                   rtol=1e-5)


def test_attention_entry_point_errors_name_the_bad_value():
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ValueError, match="unknown attention backend 'fa9'; choose from auto, "
                                         "reference, triton"):
        attention(q, q, q, backend="fa9")
    with pytest.raises(TypeError, match="prope_kernels must be a PRoPEKernels or None, got str"):
        attention(q, q, q, prope_kernels="ws")
    assert BACKENDS[0] == "auto" and len(set(BACKENDS)) == len(BACKENDS)
