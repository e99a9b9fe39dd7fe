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
"""Safe checkpoint loading with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_weights"]


def load_weights(module: torch.nn.Module, path: str | os.PathLike, key: str | None = None) -> torch.nn.Module:
    """Load a state dict saved at ``path`` into ``module`` (``weights_only=True``: nothing is unpickled blindly).

    Accepts a plain state dict, or a dict holding it under ``key`` (e.g. ``"model"``, as ignite
    checkpoints with several objects do). ``module.`` prefixes left by ``DistributedDataParallel`` are
    stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict, or it is for another architecture (the message names
            the file and the first mismatching keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"checkpoint {str(path)!r} could not be read as a weights-only state dict: {error}") from error
    if key is not None and isinstance(state, dict) and key in state:
        state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a state dict.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        expected, found = set(module.state_dict()), set(state)
        missing, unexpected = sorted(expected - found)[:3], sorted(found - expected)[:3]
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {type(module).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}; shape mismatches: {str(error).splitlines()[-1][:300]}"
        ) from error
    return module
