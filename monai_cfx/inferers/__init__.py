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
"""The one sampling loop (also running DDIM inversion), its step hooks, and each method's MONAI-style inferer."""

from __future__ import annotations

from .counterfactual import CounterfactualInferer, RegionBlendHook
from .drift import Drift, DriftDiffusionInferer, DriftHook, DriftLatentDiffusionInferer
from .grounding import CaptureWindowHook, CrossAttentionGroundingInferer
from .guidance import ClassifierGuidanceHook, ClipOriginalSampleHook
from .inversion import ddim_invert
from .latent_diffusion import TextGuidedLatentDiffusionInferer, sample_prompts
from .sampling import GuidedStepsHook, KeepSamples, SamplingHook, SamplingState, denoise, seeded_noise
from .traversal import PromptSwapHook, TrajectoryTraversalInferer, TraversalResult, bezier_curve, linear_path

__all__ = [
    "CaptureWindowHook",
    "ClassifierGuidanceHook",
    "ClipOriginalSampleHook",
    "CounterfactualInferer",
    "CrossAttentionGroundingInferer",
    "Drift",
    "DriftDiffusionInferer",
    "DriftHook",
    "DriftLatentDiffusionInferer",
    "GuidedStepsHook",
    "KeepSamples",
    "PromptSwapHook",
    "RegionBlendHook",
    "SamplingHook",
    "SamplingState",
    "TextGuidedLatentDiffusionInferer",
    "TrajectoryTraversalInferer",
    "TraversalResult",
    "bezier_curve",
    "ddim_invert",
    "denoise",
    "linear_path",
    "sample_prompts",
    "seeded_noise",
]
