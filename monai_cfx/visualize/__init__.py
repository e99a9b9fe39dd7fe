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
"""Cross-attention recording and every figure: phantoms, samples, counterfactuals, heat maps, drift searches,
trajectories."""

from __future__ import annotations

from .attention import CrossAttentionRecorder, cross_attention_layers
from .drifting import middle_slice, plot_drift_samples, plot_drift_search
from .figures import (
    draw_heatmap,
    plot_brain_phantoms,
    plot_chest_phantoms,
    plot_counterfactual_rows,
    plot_grounding_panels,
    plot_manifold_check,
    plot_sample_grid,
)
from .traversal import plot_image_strip, plot_trajectory, plot_traversal_curves, save_trajectory_gif

__all__ = [
    "CrossAttentionRecorder",
    "cross_attention_layers",
    "draw_heatmap",
    "middle_slice",
    "plot_image_strip",
    "plot_manifold_check",
    "plot_trajectory",
    "plot_traversal_curves",
    "save_trajectory_gif",
    "plot_brain_phantoms",
    "plot_chest_phantoms",
    "plot_counterfactual_rows",
    "plot_drift_samples",
    "plot_drift_search",
    "plot_grounding_panels",
    "plot_sample_grid",
]
