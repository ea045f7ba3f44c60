"""Random cameras for tests, built independently of gld.geometry."""
import math

import torch


def random_rotation(n, generator=None, dtype=torch.float64):
    """(n, 3, 3) rotations from QR of Gaussian matrices (Haar measure)."""
    A = torch.randn(n, 3, 3, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    det = torch.linalg.det(Q)
    Q[:, :, 0] *= det[:, None]
    return Q.to(dtype)


def random_c2w(n, generator=None, dtype=torch.float64, radius=2.0):
    T = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    T[:, :3, :3] = random_rotation(n, generator)
    T[:, :3, 3] = radius * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return T.to(dtype)


def random_K(n, height, width, generator=None, dtype=torch.float64):
    f = (0.8 + 0.4 * torch.rand(n, 2, generator=generator, dtype=torch.float64)) * max(height, width)
    c = torch.tensor([width / 2, height / 2], dtype=torch.float64) + \
        3 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    K = torch.zeros(n, 3, 3, dtype=torch.float64)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = f[:, 0], f[:, 1], c[:, 0], c[:, 1], 1
    return K.to(dtype)


def axis_angle(axis, angle):
    axis = torch.as_tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    x, y, z = axis.tolist()
    c, s = math.cos(angle), math.sin(angle)
    C = 1 - c
    return torch.tensor([[c + x * x * C, x * y * C - z * s, x * z * C + y * s],
                         [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
                         [z * x * C - y * s, z * y * C + x * s, c + z * z * C]], dtype=torch.float64)
