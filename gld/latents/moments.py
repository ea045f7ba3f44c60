"""Per-channel moments that merge exactly: the building block of the latent statistics.

`Moments` holds, per channel, the count n, the mean and M2 = sum (x - mean)^2 in float64.
Two sets of moments merge with Chan, Golub and LeVeque's pairwise update ("Algorithms for
computing the sample variance", The American Statistician 37, 1983):

    delta = mean_b - mean_a,  n = n_a + n_b
    mean  = mean_a + delta n_b / n
    M2    = M2_a + M2_b + delta^2 n_a n_b / n

which is stable (no difference of large sums, unlike E[x^2] - E[x]^2) and associative up to
float64 rounding, so the statistics of a data set do not depend on how it was split into
batches or ranks. The variance is the population one, M2 / n, as the release's files hold.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Moments"]


@dataclass(frozen=True)
class Moments:
    """count: values per channel; mean, m2: (C,) float64 on any device."""

    count: int
    mean: Tensor
    m2: Tensor

    @classmethod
    def empty(cls, channels: int, device=None) -> "Moments":
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros.clone())

    @classmethod
    def of(cls, x: Tensor) -> "Moments":
        """Moments of x (..., C) over every leading position, computed in float64 (two passes:
        the mean, then squared deviations from it)."""
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        if flat.shape[0] == 0:
            return cls.empty(x.shape[-1], x.device)
        mean = flat.mean(dim=0)
        return cls(flat.shape[0], mean, (flat - mean).square().sum(dim=0))

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    @property
    def var(self) -> Tensor:
        """Population variance M2 / n, (C,) float64."""
        if self.count == 0:
            raise ValueError("Moments: the variance of no values is undefined")
        return self.m2 / self.count

    def merge(self, other: "Moments") -> "Moments":
        """The moments of both sets of values together (Chan et al., module docstring)."""
        if other.channels != self.channels:
            raise ValueError(f"Moments.merge: {self.channels} channels against {other.channels}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        other_mean, other_m2 = other.mean.to(self.mean.device), other.m2.to(self.mean.device)
        delta = other_mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other_m2 + delta.square() * (self.count * other.count / n)
        return Moments(n, mean, m2)

    def add(self, x: Tensor) -> "Moments":
        """`self.merge(Moments.of(x))`."""
        return self.merge(Moments.of(x))

    def to(self, device) -> "Moments":
        return Moments(self.count, self.mean.to(device), self.m2.to(device))
