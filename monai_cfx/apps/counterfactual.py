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
"""Glue between the counterfactual bundle's evaluator and its ``metrics.json``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from monai_cfx.utils import write_json

__all__ = ["write_metrics"]


def write_metrics(
    metrics: Mapping[str, Any],
    path: str | os.PathLike,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an evaluator's ``state.metrics`` (scalars; per-image lists under ``per_image``) with the run's
    settings as JSON, atomically; returns what was written. NaN (an undefined mean) is written as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    record = {"settings": dict(settings or {}), **{k: clean(v) for k, v in metrics.items()}}
    write_json(record, path, overwrite=overwrite)
    return record
