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

import contextlib
import io
import logging
import os
from pathlib import Path

import torch

__all__ = ["load_weights"]


def load_weights(
    module: torch.nn.Module,
    path: str | os.PathLike,
    key: str | None = None,
    strict: bool = True,
    legacy_keys: bool = False,
) -> torch.nn.Module:
    """Load a state dict saved at ``path`` into ``module`` (``weights_only=True``: nothing is unpickled blindly).

    Accepts a plain state dict, or a dict holding it under ``key`` (e.g. ``"model"``, as ignite
    checkpoints with several objects do). ``module.`` prefixes left by ``DistributedDataParallel`` are
    stripped.

    ``strict=False`` is for growing a trained network (e.g. adding attention to a UNet level): parameters
    the checkpoint lacks keep their initialisation and are logged. Unexpected keys and shape mismatches
    are still refused, so a checkpoint of another architecture never loads half-way.

    ``legacy_keys=True`` reads checkpoints saved by the superseded ``monai-generative`` package (e.g. the MONAI
    model-zoo's latent diffusion bundles) through the network's own ``load_old_state_dict`` (MONAI's
    ``DiffusionModelUNet``, ``AutoencoderKL``, ...), which renames the changed attention and upsampling keys.

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
    if legacy_keys:
        convert = getattr(module, "load_old_state_dict", None)
        if convert is None:
            raise ValueError(f"`legacy_keys` needs a network with load_old_state_dict, got {type(module).__name__}.")
        leftover = dict(state)  # MONAI's converter pops every key it uses from the dict it is given
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints a line when no key needs renaming
                convert(leftover)
        except (KeyError, RuntimeError) as error:
            raise ValueError(
                f"checkpoint {str(path)!r} does not fit {type(module).__name__} as a monai-generative checkpoint: "
                f"{str(error).splitlines()[0][:300]}"
            ) from error
        # the converter keeps the network's own tensors where the checkpoint has none and ignores extra keys
        used, expected_count = len(state) - len(leftover), len(module.state_dict())
        if strict and (leftover or used != expected_count) and len(leftover) != len(state):
            raise ValueError(
                f"checkpoint {str(path)!r} does not fit {type(module).__name__} as a monai-generative checkpoint: "
                f"{used} of its {expected_count} tensors found, unused keys {sorted(leftover)[:3]}."
            )
        return module
    expected = module.state_dict()
    if not strict and set(state) <= set(expected):
        missing = sorted(set(expected) - set(state))
        state = {**{k: expected[k] for k in missing}, **state}
        if missing:
            logging.getLogger(__name__).info(
                f"{str(path)!r} lacks {len(missing)} tensors of {type(module).__name__} (kept as initialised), "
                f"e.g. {missing[:3]}"
            )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        expected, found = set(expected), set(state)
        missing, unexpected = sorted(expected - found)[:3], sorted(found - expected)[:3]
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {type(module).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}; shape mismatches: {str(error).splitlines()[-1][:300]}"
        ) from error
    return module
