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
"""Shared helpers: argument checks, atomic output writers (JSON, metrics, NIfTI, PNG, figures), checkpoints."""

from __future__ import annotations

from .checkpoint import load_weights
from .io import (
    atomic_directory,
    atomic_path,
    check_writable,
    save_figure,
    write_json,
    write_metrics,
    write_nifti,
    write_png,
)
from .validation import check_finite, check_image_pair, check_images, check_option

__all__ = [
    "atomic_directory",
    "atomic_path",
    "check_finite",
    "check_image_pair",
    "check_images",
    "check_option",
    "check_writable",
    "load_weights",
    "save_figure",
    "write_json",
    "write_metrics",
    "write_nifti",
    "write_png",
]
