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
"""Metrics MONAI lacks: KID, distribution distances, latent shift, counterfactual, phrase-grounding and trajectory
measures."""

from __future__ import annotations

from .counterfactual import compute_counterfactual_validity, compute_localization_auroc, compute_masked_l1
from .distribution import (
    KID_NUM_SUBSETS,
    KID_SUBSET_SIZE,
    distribution_distances,
    monte_carlo_l1,
    oracle_predict,
)
from .feature_distance import KIDMetric, compute_kid, compute_off_manifold_fraction
from .grounding import GroundingMetric, compute_binned_auroc, compute_cnr, compute_miou
from .latent import latent_shift
from .reconstruction import compute_finding_contrast_kept
from .traversal import (
    compute_cfrt,
    compute_identity_preservation,
    compute_latent_direction_cosine,
    compute_monotone_fraction,
)

__all__ = [
    "GroundingMetric",
    "KIDMetric",
    "KID_NUM_SUBSETS",
    "KID_SUBSET_SIZE",
    "compute_binned_auroc",
    "compute_cfrt",
    "compute_finding_contrast_kept",
    "compute_cnr",
    "compute_counterfactual_validity",
    "compute_identity_preservation",
    "compute_kid",
    "compute_latent_direction_cosine",
    "compute_localization_auroc",
    "compute_masked_l1",
    "compute_miou",
    "compute_monotone_fraction",
    "compute_off_manifold_fraction",
    "distribution_distances",
    "latent_shift",
    "monte_carlo_l1",
    "oracle_predict",
]
