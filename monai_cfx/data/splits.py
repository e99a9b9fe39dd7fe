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
"""Splitting a dataset into training, validation and testing subjects."""

from __future__ import annotations

from numbers import Integral

__all__ = ["split_fractions"]


def split_fractions(*counts: int) -> list[float]:
    """The ``split`` fractions of :func:`monai_cfx.data.write_phantom_dataset` that give exactly ``counts`` subjects
    per split (training, validation, testing), e.g. ``split_fractions(32, 200, 200)``.

    Example::

        write_phantom_dataset("data", num=432, split=split_fractions(32, 200, 200))

    Raises:
        ValueError: when ``counts`` is not three non-negative ints with a positive sum.
    """
    if len(counts) != 3 or any(isinstance(c, bool) or not isinstance(c, Integral) or c < 0 for c in counts):
        raise ValueError(f"`counts` must be three non-negative ints (training, validation, testing), got {counts!r}.")
    total = sum(counts)
    if total == 0:
        raise ValueError("`counts` must hold at least one subject.")
    return [c / total for c in counts]
