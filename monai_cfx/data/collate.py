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
from monai.data import MetaTensor, list_data_collate
from torch.utils.data import default_collate

__all__ = ["OwnGrid", "collate_scans", "own_grid_value", "UnwrapOwnGridd"]


class OwnGrid:
    """One item's tensor on its own grid, held so that MONAI's ``decollate_batch`` hands it back to its item whole
    (a plain list of differently shaped tensors would be zipped along their first dimension)."""

    __slots__ = ("value",)
    # decollate_batch returns ``item()`` of 0-d objects as they are: the holder reaches its item unsplit
    ndim = 0

    def __init__(self, value: Any) -> None:
        self.value = value

    def item(self) -> OwnGrid:
        return self


def own_grid_value(value: Any) -> Any:
    """``value`` without its :class:`OwnGrid` holder (lists of holders become lists of values)."""
    if isinstance(value, OwnGrid):
        return value.value
    if isinstance(value, list) and value and all(isinstance(v, OwnGrid) for v in value):
        return [v.value for v in value]
    return value


class UnwrapOwnGridd:
    """Postprocessing: every :class:`OwnGrid` value of an item back to its tensor."""

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        return {key: own_grid_value(value) for key, value in data.items()}


def collate_scans(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MONAI's ``list_data_collate`` per key, except that tensors whose shapes differ across the batch (scans on
    their own grids, their masks or twins) become a list of :class:`OwnGrid` holders, which ``decollate_batch``
    gives back per item (unwrap them with :class:`UnwrapOwnGridd`), and that MetaTensors of scans read by different
    readers keep only the meta data keys they share.

    Example::

        DataLoader(dataset, batch_size=8, collate_fn=collate_scans)  # model inputs stacked, scans held per item
    """
    collated: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        shapes = {tuple(v.shape) for v in values if isinstance(v, torch.Tensor)}
        if len(shapes) > 1:
            collated[key] = [OwnGrid(v) for v in values]
            continue
        if all(isinstance(v, MetaTensor) for v in values):
            values = _shared_meta(values)
        collated[key] = list_data_collate([{key: v} for v in values])[key]
    return collated


def _shared_meta(values: list[MetaTensor]) -> list[MetaTensor]:
    """The tensors with only the meta data keys that every one has and that batch together: scans read by different
    readers (a PNG, a DICOM slice) carry different keys, which MONAI's collation cannot stack. The affine, file
    name and applied operations (what ``Invertd`` needs) are common to all."""
    common = set(values[0].meta).intersection(*(v.meta for v in values[1:]))
    kept = []
    for name in common:
        try:
            default_collate([v.meta[name] for v in values])
        except (RuntimeError, TypeError, ValueError):
            continue
        kept.append(name)
    return [
        MetaTensor(v.as_tensor(), meta={name: v.meta[name] for name in kept}, applied_operations=v.applied_operations)
        for v in values
    ]
