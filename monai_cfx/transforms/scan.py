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
"""Transforms that bring a user's scan to a model's input (dimensions, channels, intensity) and refuse what they
cannot bring into range, naming the file.

The spatial part (orientation, size, padding) is MONAI's own invertible transforms in the bundles' configs, so
that ``Invertd`` maps every output back onto the input's grid; these transforms do what MONAI has no transform
for: a 2D DICOM slice loaded as ``(1, H, W, 1)``, RGB radiographs, a documented intensity rule whose parameters
travel with the item (and into the manifests), and refusals of inputs no rule
can make meaningful.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

from monai_cfx.utils import check_option

__all__ = [
    "CheckScand",
    "INTENSITY_MODES",
    "ScaleIntensityToModeld",
    "ScanToModelDimsd",
    "fit_to_size",
    "scan_name",
    "scan_preprocessing",
]

# ITU-R BT.601 luma, the weights of most RGB-to-grey conversions of radiographs exported as colour images
_LUMA = (0.299, 0.587, 0.114)
INTENSITY_MODES = ("percentile", "window", "none")


def scan_name(image: Any, key: Hashable = "image") -> str:
    """The file an image came from (for error messages), or the item key when it carries no file name."""
    name = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    return f"{str(name)!r}" if name else f"item key {str(key)!r}"


class ScanToModelDimsd(MapTransform):
    """Bring a loaded, channel-first image to ``spatial_dims`` spatial dimensions and ``num_channels`` channels.

    - Trailing singleton spatial dimensions are dropped: a 2D DICOM slice loads as ``(1, H, W, 1)``.
    - RGB or RGBA images (3 or 4 channels) become one grey channel (ITU-R BT.601 luma; alpha is ignored) when
      the model takes one channel.

    Anything else (a 3D volume for a 2D model, a 2D image for a 3D model, a 4D series, other channel counts) is
    refused with a ``ValueError`` that names the file, the shape found and the shape expected.

    Args:
        keys: keys of the images (an image and its masks or twins; masks keep their channels).
        spatial_dims: the model's spatial dimensions.
        num_channels: the model's input channels (grey conversion applies to ``image_keys`` only).
        image_keys: keys converted to grey; defaults to the first key.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int,
        num_channels: int = 1,
        image_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ValueError(f"`spatial_dims` must be 2 or 3, got {spatial_dims!r}.")
        self.spatial_dims, self.num_channels = spatial_dims, num_channels
        self.image_keys = set(self.keys[:1] if image_keys is None else ensure_tuple(image_keys))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            shape = tuple(image.shape)
            while image.ndim - 1 > self.spatial_dims and image.shape[-1] == 1:
                image = image[..., 0]
            if image.ndim - 1 != self.spatial_dims:
                raise ValueError(
                    f"{scan_name(d[key], key)} has shape {shape} (channel first): expected {self.spatial_dims} "
                    f"spatial dimensions for this {self.spatial_dims}D model (a 4D series or a volume for a 2D "
                    "model cannot be used; select one image or volume first)."
                )
            if key in self.image_keys and image.shape[0] != self.num_channels:
                if self.num_channels == 1 and image.shape[0] in (3, 4):
                    weights = torch.as_tensor(_LUMA, dtype=torch.float32).reshape(3, *[1] * self.spatial_dims)
                    image = (torch.as_tensor(image[:3]).float() * weights).sum(0, keepdim=True)
                    if isinstance(d[key], MetaTensor):
                        image = MetaTensor(image, meta=d[key].meta, applied_operations=d[key].applied_operations)
                else:
                    raise ValueError(
                        f"{scan_name(d[key], key)} has {shape[0]} channels: expected {self.num_channels}"
                        + (" (or RGB/RGBA, converted to grey)." if self.num_channels == 1 else ".")
                    )
            d[key] = image
        return d


class CheckScand(MapTransform):
    """Refuse a scan that no preprocessing rule can make meaningful, with a ``ValueError`` naming the file.

    Refused: non-finite voxels (NaN or Inf), a constant image (nothing to normalise), an image whose longest side
    is smaller than the model's input (it would be up-sampled into detail it does not have), and voxels more
    than ``max_anisotropy`` times longer along one axis than another (resizing in voxels would distort anatomy;
    resample with ``Spacingd`` first).

    Args:
        keys: keys of the images to check (after :class:`ScanToModelDimsd`).
        min_size: the model's input side in voxels.
        max_anisotropy: largest allowed ratio of the longest to the shortest voxel spacing.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self, keys: KeysCollection, min_size: int, max_anisotropy: float = 2.0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size, self.max_anisotropy = int(min_size), float(max_anisotropy)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image, name = d[key], scan_name(d[key], key)
            values = torch.as_tensor(image)
            if not torch.is_floating_point(values):
                values = values.float()
            finite = torch.isfinite(values)
            if not bool(finite.all()):
                raise ValueError(
                    f"{name} has {int((~finite).sum())} non-finite voxels (NaN or Inf): expected finite intensities."
                )
            if float(values.max() - values.min()) <= 0:
                raise ValueError(f"{name} is constant ({float(values.max())}): expected an image with contrast.")
            spatial = tuple(values.shape[1:])
            if max(spatial) < self.min_size:
                raise ValueError(
                    f"{name} has spatial shape {spatial}: expected a longest side of at least {self.min_size} voxels "
                    "(the model's input size; smaller images would be up-sampled)."
                )
            if isinstance(image, MetaTensor):
                spacing = np.asarray(image.pixdim[: len(spatial)], dtype=np.float64)
                if spacing.size and spacing.min() > 0 and spacing.max() / spacing.min() > self.max_anisotropy:
                    raise ValueError(
                        f"{name} has voxel spacing {tuple(spacing.round(3).tolist())}: expected voxels within "
                        f"{self.max_anisotropy}x of isotropic; resample it (e.g. with Spacingd) first."
                    )
        return d


class ScaleIntensityToModeld(MapTransform):
    """Map a scan's intensities to the model's range with a documented rule, and keep the rule's parameters.

    The value ``lo`` of the scan maps to ``target[0]`` and ``hi`` to ``target[1]``, linearly, then the result is
    clipped to ``clip``. ``lo`` and ``hi`` come from:

    - ``"percentile"``: the scan's own ``lower`` and ``upper`` percentiles. Linear in the input, so a 16-bit PNG,
      a CT range or any scaling of the same image gives the same model input; ``target`` holds the training
      images' mean values of the same percentiles (``network_data_format`` in the bundles' metadata);
    - ``"window"``: a fixed ``window = (lo, hi)``, e.g. a CT window in Hounsfield units;
    - ``"none"``: the scan is used as it is (it must already be in the model's range).

    ``[lo, hi, target[0], target[1]]`` is stored under ``params_key`` (``"<key>_intensity"`` by default); the
    savers record it, so an output ``y`` in the model's units is ``lo + (y - target[0]) * (hi - lo) /
    (target[1] - target[0])`` in the input's. ``companion_keys`` (e.g. a healthy twin) are mapped with the scan's
    parameters.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "percentile",
        lower: float = 0.5,
        upper: float = 99.5,
        target: Sequence[float] = (0.0, 1.0),
        window: Sequence[float] | None = None,
        clip: Sequence[float] | None = (0.0, 1.0),
        companion_keys: KeysCollection = (),
        params_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mode = check_option("mode", mode, INTENSITY_MODES)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
        if mode == "window" and (window is None or len(window) != 2 or not float(window[0]) < float(window[1])):
            raise ValueError(f"`window` must be (lo, hi) with lo < hi for mode 'window', got {window!r}.")
        if len(target) != 2 or not float(target[0]) < float(target[1]):
            raise ValueError(f"`target` must be (lo, hi) with lo < hi, got {target!r}.")
        self.lower, self.upper, self.target, self.window = lower, upper, tuple(map(float, target)), window
        self.clip = None if clip is None else tuple(map(float, clip))
        self.companion_keys = ensure_tuple(companion_keys) if companion_keys else ()
        self.params_key = params_key

    def parameters(self, image: torch.Tensor, name: str) -> tuple[float, float]:
        if self.mode == "none":
            return self.target
        if self.mode == "window":
            return float(self.window[0]), float(self.window[1])
        values = torch.as_tensor(image).float().flatten()
        lo, hi = torch.quantile(values, torch.tensor([self.lower, self.upper]) / 100.0).tolist()
        if not hi > lo:
            raise ValueError(
                f"{name}: its {self.lower} and {self.upper} percentiles are equal ({lo}): almost every voxel has the "
                "same value, so no intensity scale can be inferred; use mode 'window' with a known window."
            )
        return lo, hi

    def map(self, image: Any, lo: float, hi: float) -> Any:
        scaled = (image.float() - lo) * ((self.target[1] - self.target[0]) / (hi - lo)) + self.target[0]
        return scaled.clamp(*self.clip) if self.clip is not None else scaled

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lo, hi = self.parameters(d[key], scan_name(d[key], key))
            d[key] = self.map(d[key], lo, hi)
            for companion in self.companion_keys:
                if companion in d:
                    d[companion] = self.map(d[companion], lo, hi)
            d[self.params_key or f"{key}_intensity"] = torch.tensor([lo, hi, *self.target], dtype=torch.float64)
        return d


def fit_to_size(images: torch.Tensor, size: int, mode: str = "area") -> torch.Tensor:
    """Images ``(B, C, *spatial)`` brought to ``size`` on every side as the bundles' preprocessing does: the
    longest side resized to ``size`` (``mode`` of ``torch.nn.functional.interpolate``), the rest zero-padded
    symmetrically. Unchanged when already that size."""
    spatial = images.shape[2:]
    if all(side == size for side in spatial):
        return images
    scale = size / max(spatial)
    resized = torch.nn.functional.interpolate(images, size=[max(1, round(side * scale)) for side in spatial], mode=mode)
    padding: list[int] = []
    for side in reversed(resized.shape[2:]):
        padding += [(size - side) // 2, size - side - (size - side) // 2]
    return torch.nn.functional.pad(resized, padding)


def scan_preprocessing(
    image_size: int,
    spatial_dims: int,
    intensity: Mapping[str, Any] | None = None,
    axcodes: str | None = None,
    max_anisotropy: float = 2.0,
    image_key: str = "image",
    scan_key: str = "scan",
) -> Any:
    """The chain that brings one scan of a datalist item to a model's input, as the counterfactual and grounding
    bundles' configs spell it out: load (NIfTI, DICOM file or series folder, PNG, JPEG), grey and the model's
    dimensions (:class:`ScanToModelDimsd`), refuse what cannot be made meaningful (:class:`CheckScand`), the
    intensity rule (:class:`ScaleIntensityToModeld`), a copy of the scan in model units under ``scan_key``, then
    MONAI's invertible ``Orientationd`` (when ``axcodes``), ``Resized`` of the longest side to ``image_size`` and
    ``SpatialPadd``. ``Invertd`` with this chain maps a model-grid output back onto the scan's own grid.

    Args:
        image_size: the model's input size along every spatial axis.
        spatial_dims: 2 or 3.
        intensity: ``network_data_format``'s rule, ``{"mode", "percentiles", "target"}`` and optionally
            ``"window"`` (see :class:`ScaleIntensityToModeld`); ``None`` takes scans already in [0, 1].
        axcodes: orientation of the model's input in 3D (e.g. ``"RAS"``), or ``None`` to keep the scan's.
        max_anisotropy: voxels longer than this ratio along one axis are refused.
    """
    from monai.transforms import (
        Compose,
        CopyItemsd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        Resized,
        SelectItemsd,
        SpatialPadd,
    )

    rule = dict(intensity or {"mode": "none"})
    lower, upper = rule.get("percentiles", (0.5, 99.5))
    transforms = [
        SelectItemsd(keys=[image_key, "label"], allow_missing_keys=True),
        LoadImaged(keys=image_key, image_only=True, ensure_channel_first=True),
        EnsureTyped(keys=image_key, dtype=torch.float32),
        ScanToModelDimsd(keys=image_key, spatial_dims=spatial_dims),
        CheckScand(keys=image_key, min_size=image_size, max_anisotropy=max_anisotropy),
        ScaleIntensityToModeld(
            keys=image_key,
            mode=rule.get("mode", "none"),
            lower=lower,
            upper=upper,
            target=rule.get("target", (0.0, 1.0)),
            window=rule.get("window"),
        ),
        CopyItemsd(keys=image_key, names=scan_key),
    ]
    if axcodes:
        transforms.append(Orientationd(keys=image_key, axcodes=axcodes))
    transforms += [
        Resized(
            keys=image_key,
            spatial_size=image_size,
            size_mode="longest",
            mode="bilinear" if spatial_dims == 2 else "trilinear",
            anti_aliasing=True,
        ),
        SpatialPadd(keys=image_key, spatial_size=[image_size] * spatial_dims),
    ]
    return Compose(transforms)
