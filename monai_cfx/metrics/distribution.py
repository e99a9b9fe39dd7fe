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
"""Distances between a set of generated images and a set of target images: the Monte-Carlo L1 by which Latent
Drifting (Yeganeh et al., arXiv 2412.20651) chooses its drift, and FID / KID on an evaluation classifier's
(the "oracle"'s) embeddings."""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics import FIDMetric

from monai_cfx.utils import check_image_pair

from .feature_distance import compute_kid

__all__ = [
    "KID_NUM_SUBSETS",
    "KID_SUBSET_SIZE",
    "distribution_distances",
    "monte_carlo_l1",
    "oracle_predict",
]

# KID subsets: samples per subset (capped by the set sizes) and number of subsets
KID_SUBSET_SIZE, KID_NUM_SUBSETS = 100, 50

# elements of |x - y| held at once when averaging over pairs (about 64 MiB in float32)
_CHUNK_ELEMENTS = 1 << 24


def oracle_predict(
    oracle: torch.nn.Module, images: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid probabilities ``(N, K)`` and embeddings ``(N, F)`` of ``images`` under the oracle
    (a ``FindingClassifier``, or any module with ``logits_and_embedding``)."""
    oracle = oracle.to(device).eval()
    probabilities, embeddings = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device)
            logits, embedding = oracle.logits_and_embedding(batch)
            probabilities.append(torch.sigmoid(logits).cpu())
            embeddings.append(embedding.cpu())
    return torch.cat(probabilities), torch.cat(embeddings)


def _pair_l1_sum(generated: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    """Sum over the pairs ``(generated[rows[k]], target[cols[k]])`` of the mean absolute voxel difference."""
    voxels = generated[0].numel()
    chunk = max(1, _CHUNK_ELEMENTS // voxels)
    total = 0.0
    for start in range(0, len(rows), chunk):
        x = generated[rows[start : start + chunk]].float()
        y = target[cols[start : start + chunk]].float()
        total += float((x - y).abs().flatten(1).mean(1).double().sum())
    return total


def monte_carlo_l1(generated: torch.Tensor, target: torch.Tensor, num_pairs: int = 4096, seed: int = 0) -> float:
    """Monte-Carlo estimate of ``E|x - y|``, the mean absolute voxel difference between an image ``x`` of
    ``generated`` and an image ``y`` of ``target`` drawn independently: the distance by which Latent
    Drifting chooses δ.

    When ``N * M <= num_pairs`` every pair is used and the value is exact (and symmetric in the two sets);
    otherwise ``num_pairs`` pairs are drawn uniformly with replacement from a ``torch.Generator`` seeded
    with ``seed``, so the estimate is reproducible.

    Example::

        distance = monte_carlo_l1(samples, target_images)  # both (N, C, *spatial)

    Args:
        generated: images ``(N, C, *spatial)``, 2D or 3D.
        target: images ``(M, C, *spatial)`` with the same ``(C, *spatial)`` shape.
        num_pairs: the most pairs to average over.
        seed: seed of the pair draws (used only when pairs are sampled).

    Returns:
        the mean absolute difference, a float.

    Raises:
        ValueError: when a set is not a 4D/5D tensor, is empty, or the shapes differ beyond the batch
            dimension, or ``num_pairs`` < 1.
    """
    generated, target = check_image_pair(generated, target)
    if num_pairs < 1:
        raise ValueError(f"`num_pairs` must be >= 1, got {num_pairs}.")
    target = target.to(generated.device)
    n, m = generated.shape[0], target.shape[0]
    if n * m <= num_pairs:
        rows = torch.arange(n).repeat_interleave(m)
        cols = torch.arange(m).repeat(n)
    else:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(n, (num_pairs,), generator=generator)
        cols = torch.randint(m, (num_pairs,), generator=generator)
    rows, cols = rows.to(generated.device), cols.to(target.device)
    return _pair_l1_sum(generated, target, rows, cols) / len(rows)


def distribution_distances(
    generated: torch.Tensor,
    target: torch.Tensor,
    oracle: torch.nn.Module | None,
    device: str | torch.device = "cpu",
    kid_subset_size: int = KID_SUBSET_SIZE,
    kid_num_subsets: int = KID_NUM_SUBSETS,
    seed: int = 0,
    target_embeddings: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Distances between a set of generated images and a set of target images.

    ``l1`` is :func:`monte_carlo_l1` on the voxels; ``fid`` (MONAI's ``FIDMetric``) and ``kid`` /
    ``kid_std`` (:func:`monai_cfx.metrics.compute_kid`) are computed on the oracle's embeddings. FID is
    biased upwards with few samples, so compare FIDs only between sets of the same sizes; KID is
    unbiased and can be slightly negative.

    Example::

        distances = distribution_distances(samples, target_images, oracle=classifier)
        print(distances["l1"], distances["fid"], distances["kid"])

    Args:
        generated: images ``(N, C, *spatial)``, 2D or 3D.
        target: images ``(M, C, *spatial)`` with the same ``(C, *spatial)`` shape.
        oracle: a module with ``logits_and_embedding(images) -> (logits, embedding)`` (e.g. a
            ``FindingClassifier``), or None for the L1 distance only.
        device: where the oracle runs.
        kid_subset_size: samples per KID subset (capped by the set sizes).
        kid_num_subsets: number of KID subsets.
        seed: seed of the L1 pair draws and of the KID subsets.
        target_embeddings: the oracle's embeddings of ``target`` when already computed (several generated
            sets compared with one target set); None computes them.

    Returns:
        ``{"l1", "fid", "kid", "kid_std", "num_generated", "num_target"}``; ``fid``, ``kid`` and
        ``kid_std`` are None without an oracle.

    Raises:
        ValueError: when the sets are not image batches of the same ``(C, *spatial)`` shape, are empty,
            or (with an oracle) hold fewer than 2 images each, which KID needs.
    """
    generated, target = check_image_pair(generated, target, min_count=1 if oracle is None else 2)
    metrics: dict[str, Any] = {"l1": monte_carlo_l1(generated, target, seed=seed)}
    metrics.update(fid=None, kid=None, kid_std=None)
    if oracle is not None:
        _, generated_embeddings = oracle_predict(oracle, generated, device=device)
        if target_embeddings is None:
            _, target_embeddings = oracle_predict(oracle, target, device=device)
        metrics["fid"] = float(FIDMetric()(generated_embeddings.double(), target_embeddings.double()))
        kid, kid_std = compute_kid(
            generated_embeddings, target_embeddings, subset_size=kid_subset_size, num_subsets=kid_num_subsets, seed=seed
        )
        metrics["kid"], metrics["kid_std"] = float(kid), float(kid_std)
    metrics["num_generated"], metrics["num_target"] = int(generated.shape[0]), int(target.shape[0])
    return metrics
