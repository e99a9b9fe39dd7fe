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
"""Load a monai_cfx bundle's configs from Python, from any working directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["default_bundle_dir", "load_bundle_config"]


def default_bundle_dir(name: str = "latent_diffusion") -> Path:
    """The bundle folder ``bundles/<name>`` of this source tree (bundles are not inside the installed package)."""
    folder = Path(__file__).resolve().parents[2] / "bundles" / name
    if not (folder / "configs").is_dir():
        raise FileNotFoundError(
            f"bundle folder {str(folder)!r} not found; pass the folder of a copy of the {name!r} bundle explicitly."
        )
    return folder


def load_bundle_config(
    bundle_dir: str | os.PathLike, config_files: Sequence[str] = ("configs/inference.json",), **overrides: Any
) -> ConfigParser:
    """Read and parse a bundle's configs (merged in order, as ``--config_file "[...]"`` does), with overrides.

    ``config_files`` are relative to ``bundle_dir``; ``bundle_root`` is set to its absolute path and its
    ``configs/metadata.json`` is read as ``_meta_`` (as MONAI's CLI does), so the returned parser's
    ``get_parsed_content`` works from any working directory. In monai_cfx bundles ``configs/inference.json`` holds
    the definitions and runs alone; every other config merges on top of it.

    Example::

        parser = load_bundle_config(
            default_bundle_dir(), ["configs/inference.json", "configs/evaluate.json", "configs/3d.json"], device="cpu"
        )
        generate = parser.get_parsed_content("generate")
        images = generate(["Normal brain MRI."], [0])
    """
    bundle_dir = Path(bundle_dir).resolve()
    if not (bundle_dir / "configs").is_dir():
        raise FileNotFoundError(
            f"bundle folder {str(bundle_dir)!r} has no configs/ folder; pass the bundle's folder (from the MONAI "
            "CLI: --bundle_root <bundle folder>)."
        )
    missing = [name for name in config_files if not (bundle_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"`config_files` {missing} not found in bundle folder {str(bundle_dir)!r}.")
    parser = ConfigParser()
    parser.read_config([str(bundle_dir / name) for name in config_files])
    if (bundle_dir / "configs" / "metadata.json").is_file():
        parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(bundle_dir), **overrides})
    parser.parse()
    return parser
