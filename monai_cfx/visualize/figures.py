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
"""Drawing helpers shared by the handlers' PNG outputs and the main job's figures."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["draw_heatmap"]


def draw_heatmap(
    axis: Any, image: np.ndarray, heatmap: np.ndarray, box: np.ndarray | None = None, origin: str = "upper"
) -> Any:
    """Draw a 2D ``image`` in grey with ``heatmap`` (in [0, 1]) over it and ``box`` (a mask) outlined, on a
    matplotlib axis without ticks. Arrays are in MONAI's (W, H) order; ``origin="lower"`` for axial slices of
    volumes. Returns the heat map's image, for a colour bar."""
    axis.imshow(image.T, cmap="gray", vmin=0, vmax=1, origin=origin)
    shown = axis.imshow(heatmap.T, cmap="jet", vmin=0, vmax=1, alpha=0.45, origin=origin)
    if box is not None and box.any():
        axis.contour(box.T, levels=[0.5], colors="white", linewidths=0.9)  # follows the image's y direction
    axis.set_xticks([])
    axis.set_yticks([])
    return shown
