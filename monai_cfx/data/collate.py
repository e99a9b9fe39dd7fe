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
"""Batching of items whose model inputs share a size while their scans keep their own grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import list_data_collate

__all__ = ["collate_scans"]


def collate_scans(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MONAI's ``list_data_collate`` per key, except that tensors whose shapes differ across the batch (a scan on
    its own grid, its mask or twin) stay a list, which ``decollate_batch`` splits back per item.

    Example::

        DataLoader(dataset, batch_size=8, collate_fn=collate_scans)  # model inputs stacked, scans as lists
    """
    collated: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        shapes = {tuple(v.shape) for v in values if isinstance(v, torch.Tensor)}
        if len(shapes) > 1:
            collated[key] = values
        else:
            collated[key] = list_data_collate([{key: v} for v in values])[key]
    return collated
