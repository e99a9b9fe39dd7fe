# Copyright (c) monai_cfx contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Measures on an evaluation network's features that MONAI lacks: the Kernel Inception Distance (Binkowski et al.
2018; MONAI has FID but no KID) and the fraction of samples off a reference set's manifold."""

from __future__ import annotations

import torch
from monai.metrics.metric import Metric

__all__ = ["KIDMetric", "compute_kid", "compute_off_manifold_fraction"]


def _check_features(name: str, features: torch.Tensor, min_samples: int = 2) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"`{name}` must be a (num_samples, num_features) tensor, got {shape}.")
    if features.shape[0] < min_samples:
        raise ValueError(f"`{name}` needs at least {min_samples} samples, got {features.shape[0]}.")
    return features.double()


def compute_kid(
    y_pred: torch.Tensor,
    y: torch.Tensor,
    subset_size: int = 1000,
    num_subsets: int = 100,
    degree: int = 3,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over subsets of the unbiased squared MMD with a polynomial kernel.

    ``k(x, y) = (x . y / d + coef) ** degree`` on ``d``-dimensional features, as in the KID definition and in
    ``torchmetrics`` / ``clean-fid``. Each of ``num_subsets`` draws takes ``m = min(subset_size, n_pred, n_ref)``
    samples of each set without replacement and computes ``MMD^2_u = mean_{i!=j} k(x_i, x_j) +
    mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)``. Unbiased, so it can be slightly negative for
    identical distributions, and unlike FID it is meaningful with few samples.

    Args:
        y_pred: features of generated images ``(N, F)``.
        y: features of reference images ``(M, F)``.
        subset_size: samples per subset (capped by the set sizes).
        num_subsets: number of random subsets.
        degree: degree of the polynomial kernel.
        coef: constant of the polynomial kernel.
        seed: seed of the subset draws.
    """
    x, r = _check_features("y_pred", y_pred), _check_features("y", y)
    if x.shape[1] != r.shape[1]:
        raise ValueError(f"`y_pred` and `y` must have the same feature size, got {x.shape[1]} and {r.shape[1]}.")
    if subset_size < 2 or num_subsets < 1:
        raise ValueError(f"`subset_size` must be >= 2 and `num_subsets` >= 1, got {subset_size} and {num_subsets}.")
    m = min(subset_size, x.shape[0], r.shape[0])
    num_features = x.shape[1]
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(num_subsets):
        xs = x[torch.randperm(x.shape[0], generator=generator)[:m].to(x.device)]
        rs = r[torch.randperm(r.shape[0], generator=generator)[:m].to(r.device)]
        k_xx = (xs @ xs.T / num_features + coef) ** degree
        k_rr = (rs @ rs.T / num_features + coef) ** degree
        k_xr = (xs @ rs.T / num_features + coef) ** degree
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1))
        estimates.append(within - 2 * k_xr.mean())
    values = torch.stack(estimates)
    return values.mean(), values.std(unbiased=True) if num_subsets > 1 else torch.zeros((), dtype=values.dtype)


class KIDMetric(Metric):
    """Kernel Inception Distance on features, called like MONAI's ``FIDMetric``: ``KIDMetric()(y_pred, y)``.

    The features come from any fixed network (Inception, RadImageNet, a finding classifier's ``embed``); see
    :func:`compute_kid` for the estimator. ``__call__`` returns the mean; :attr:`last_std` keeps the standard
    deviation over subsets of the last call.
    """

    def __init__(
        self, subset_size: int = 1000, num_subsets: int = 100, degree: int = 3, coef: float = 1.0, seed: int = 0
    ) -> None:
        super().__init__()
        self.subset_size, self.num_subsets, self.degree, self.coef, self.seed = (
            subset_size,
            num_subsets,
            degree,
            coef,
            seed,
        )
        self.last_std: torch.Tensor | None = None

    def __call__(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean, self.last_std = compute_kid(
            y_pred, y, self.subset_size, self.num_subsets, self.degree, self.coef, self.seed
        )
        return mean


def compute_off_manifold_fraction(
    features: torch.Tensor, reference_features: torch.Tensor, k: int = 3
) -> tuple[float, torch.Tensor]:
    """The fraction of samples outside the manifold of a reference set, in an evaluation network's feature space:
    the complement of Kynkäänniemi et al.'s improved precision (NeurIPS 2019). Each reference sample spans a ball
    reaching its ``k``-th nearest other reference sample; a sample inside no ball is off the manifold, as an image
    with the texture of a scan but not its anatomy is. Measure two real sets against each other for the floor.

    Args:
        features: ``(N, F)`` features of the samples to judge (e.g. generated images).
        reference_features: ``(M, F)`` features of real images, ``M > k``.
        k: the neighbour that sets each ball's radius (3 in the paper).

    Returns:
        the fraction off the manifold, and the per-sample flags ``(N,)`` (True: off).

    Raises:
        ValueError: for feature sets that are not 2D with the same width, or ``k`` outside ``[1, M - 1]``.
    """
    features = _check_features("features", features, min_samples=1)
    reference = _check_features("reference_features", reference_features)
    if features.shape[1] != reference.shape[1]:
        raise ValueError(
            f"`features` and `reference_features` must have the same width, got {features.shape[1]} and "
            f"{reference.shape[1]}."
        )
    if not 1 <= k < reference.shape[0]:
        raise ValueError(f"`k` must be in [1, {reference.shape[0] - 1}] for {reference.shape[0]} references, got {k}.")
    within = torch.cdist(reference, reference)
    # the k-th nearest other reference: index k of the sorted row, whose index 0 is the sample itself
    radii = within.sort(dim=1).values[:, k]
    off = ~(torch.cdist(features, reference) <= radii[None, :]).any(dim=1)
    return float(off.double().mean()), off
