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
"""Ignite handlers for MONAI engines: counterfactual and grounding savers and metrics, feature distances, and the
resumable training state, and the gradient averaging of data-parallel training."""

from __future__ import annotations

from .counterfactual import CounterfactualMetricsHandler, CounterfactualSaver, iterate_items
from .distributed import GradientAllReduce
from .feature_distance import FeatureDistanceHandler
from .grounding import GroundingMetricsHandler, GroundingSaver
from .training_state import BestMetricState, ParamSchedulerState, SeededRunHandler, TrainingStateHandler

__all__ = [
    "BestMetricState",
    "CounterfactualMetricsHandler",
    "CounterfactualSaver",
    "FeatureDistanceHandler",
    "GradientAllReduce",
    "GroundingMetricsHandler",
    "GroundingSaver",
    "ParamSchedulerState",
    "SeededRunHandler",
    "TrainingStateHandler",
    "iterate_items",
]
