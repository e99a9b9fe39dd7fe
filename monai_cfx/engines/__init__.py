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
"""PrepareBatch classes and losses for MONAI engines: latent diffusion, fine-tuning, counterfactuals, grounding."""

from __future__ import annotations

from .checks import check_reconstruction
from .counterfactual import CounterfactualPrepareBatch
from .finetune import (
    FINETUNE_MODES,
    FineTunePrepareBatch,
    FineTuning,
    PriorPreservationLoss,
    apply_finetuned,
    generate_prior_latents,
    load_finetuned,
    prompt_with_token,
)
from .grounding import GroundingPrepareBatch
from .joint import (
    CLASSIFIER_LATENTS,
    DiffMatchLoss,
    JointDiffusionInferer,
    JointDiffusionLoss,
    JointDiffusionPrepareBatch,
    LabelledBatchSampler,
    StrongLatentAugment,
    labelled_split,
    mark_labelled,
)
from .latent_diffusion import (
    AutoencoderKLLoss,
    LatentDiffusionPrepareBatch,
    ReconstructionPrepareBatch,
    compute_latent_range,
    compute_scale_factor,
    phrases_by_report,
)

__all__ = [
    "CLASSIFIER_LATENTS",
    "FINETUNE_MODES",
    "AutoencoderKLLoss",
    "CounterfactualPrepareBatch",
    "DiffMatchLoss",
    "FineTunePrepareBatch",
    "FineTuning",
    "GroundingPrepareBatch",
    "JointDiffusionInferer",
    "JointDiffusionLoss",
    "JointDiffusionPrepareBatch",
    "LabelledBatchSampler",
    "LatentDiffusionPrepareBatch",
    "PriorPreservationLoss",
    "ReconstructionPrepareBatch",
    "StrongLatentAugment",
    "apply_finetuned",
    "check_reconstruction",
    "compute_latent_range",
    "compute_scale_factor",
    "generate_prior_latents",
    "labelled_split",
    "load_finetuned",
    "mark_labelled",
    "phrases_by_report",
    "prompt_with_token",
]
