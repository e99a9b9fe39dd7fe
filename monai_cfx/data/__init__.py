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
"""Phantoms with healthy twins (2D chest, 3D brain), their MONAI datasets and datalists, and data splits."""

from __future__ import annotations

from .brain import BRAIN_FINDINGS, brain_phantom
from .chest import CHEST_FINDINGS, chest_phantom
from .collate import OwnGrid, UnwrapOwnGridd, collate_scans, own_grid_value
from .dataset import (
    PHANTOM_KINDS,
    PhantomDataset,
    ensure_phantom_datalist,
    generate_phantom,
    phantom_affine,
    subject_to_item,
    write_phantom_dataset,
)
from .splits import split_fractions
from .synthesis import DOMAIN_PRESETS, resolve_domain

__all__ = [
    "BRAIN_FINDINGS",
    "CHEST_FINDINGS",
    "DOMAIN_PRESETS",
    "PHANTOM_KINDS",
    "PhantomDataset",
    "brain_phantom",
    "collate_scans",
    "own_grid_value",
    "OwnGrid",
    "UnwrapOwnGridd",
    "ensure_phantom_datalist",
    "chest_phantom",
    "generate_phantom",
    "phantom_affine",
    "resolve_domain",
    "split_fractions",
    "subject_to_item",
    "write_phantom_dataset",
]
