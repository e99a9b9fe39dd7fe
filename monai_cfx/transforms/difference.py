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
"""Difference maps between an image and its counterfactual, and Otsu thresholding of maps."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import GaussianSmooth, MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple

from monai_cfx.utils import check_option

__all__ = [
    "DifferenceMap",
    "DifferenceMapD",
    "DifferenceMapDict",
    "DifferenceMapd",
    "OtsuThreshold",
    "OtsuThresholdD",
    "OtsuThresholdDict",
    "OtsuThresholdd",
]

DIFFERENCE_MODES = ("signed", "absolute")


def _output_keys(
    keys: Sequence[Hashable], output_keys: KeysCollection | None, default: Sequence[Hashable]
) -> tuple[Hashable, ...]:
    """One output key per input key: ``output_keys`` if given, else ``default``."""
    resolved = tuple(default) if output_keys is None else ensure_tuple(output_keys)
    if len(resolved) != len(keys):
        raise ValueError(f"`output_keys` must name one output per key ({len(keys)}), got {len(resolved)}.")
    return resolved


class DifferenceMap(Transform):
    """``image - reference`` (signed) or its magnitude (absolute), optionally smoothed, masked and normalised.

    VALD-MD's attribution map is the difference between an abnormal image and its healthy counterfactual:
    where the model had to change the image to make it healthy. Smoothing happens on the signed difference,
    before the magnitude is taken, so zero-mean detail that the autoencoder does not reproduce (acquisition
    noise) cancels instead of adding up. A body or organ mask then zeroes everything outside it.

    Args:
        mode: ``"signed"`` or ``"absolute"``.
        sigma: standard deviation (pixels) of a Gaussian applied to the signed difference; 0 disables it.
        normalize: divide by the largest magnitude per channel, so maps are in [0, 1] (absolute) or [-1, 1].

    Example::

        difference = DifferenceMap(mode="absolute", sigma=1.5)(image, counterfactual, mask=body_mask)
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, mode: str = "absolute", sigma: float = 0.0, normalize: bool = False) -> None:
        self.mode = check_option("mode", mode, DIFFERENCE_MODES)
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or sigma < 0:
            raise ValueError(f"`sigma` must be a number >= 0, got {sigma!r}.")
        self.sigma = float(sigma)
        self.normalize = normalize

    def __call__(
        self, img: NdarrayOrTensor, reference: NdarrayOrTensor, mask: NdarrayOrTensor | None = None
    ) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first image ``(C, *spatial)``, e.g. the input scan.
            reference: same shape, e.g. its counterfactual.
            mask: optional ``(1 or C, *spatial)`` mask; the map is zero where it is 0.
        """
        image_t = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
        reference_t = convert_to_tensor(reference, dtype=torch.float32, track_meta=False).to(image_t.device)
        if image_t.shape != reference_t.shape:
            raise ValueError(
                f"`reference` must have the shape of `img` {tuple(image_t.shape)}, got {tuple(reference_t.shape)}."
            )
        difference = image_t - reference_t
        if self.sigma > 0:
            difference = convert_to_tensor(GaussianSmooth(self.sigma)(difference), track_meta=False)
        if self.mode == "absolute":
            difference = difference.abs()
        if mask is not None:
            mask_t = convert_to_tensor(mask, dtype=torch.float32, track_meta=False).to(image_t.device)
            if mask_t.shape[1:] != image_t.shape[1:] or mask_t.shape[0] not in (1, image_t.shape[0]):
                raise ValueError(
                    f"`mask` must have shape (1 or {image_t.shape[0]}, {', '.join(map(str, image_t.shape[1:]))}), "
                    f"got {tuple(mask_t.shape)}."
                )
            difference = difference * (mask_t > 0)
        if self.normalize:
            scale = difference.abs().flatten(1).amax(1).clamp_min(1e-12)
            difference = difference / scale.view(-1, *([1] * (difference.ndim - 1)))
        # a difference is signed and fractional whatever the images' dtype (int16 CT, uint8 PNG)
        dtype = torch.float32 if isinstance(img, torch.Tensor) else np.float32
        return convert_to_dst_type(difference, img, dtype=dtype)[0]


class DifferenceMapd(MapTransform):
    """Dictionary version of :class:`DifferenceMap`: ``d[output_key] = DifferenceMap(d[key], d[reference_key])``.

    The output keeps the meta data (affine) of ``key``'s image, so it can be saved and overlaid on it.

    Args:
        keys: the image key(s), e.g. ``"image"``.
        reference_key: the counterfactual's key, e.g. ``"pred"``.
        output_keys: where to write each map; default ``"difference"`` for one key, ``"<key>_difference"`` else.
        mask_key: optional key of a body or organ mask.
        mode, sigma, normalize: see :class:`DifferenceMap`.
        allow_missing_keys: don't raise if a key is absent.
    """

    backend = DifferenceMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str,
        output_keys: KeysCollection | None = None,
        mask_key: str | None = None,
        mode: str = "absolute",
        sigma: float = 0.0,
        normalize: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        default = ("difference",) if len(self.keys) == 1 else tuple(f"{k}_difference" for k in self.keys)
        self.output_keys = _output_keys(self.keys, output_keys, default)
        self.reference_key = reference_key
        self.mask_key = mask_key
        self.difference = DifferenceMap(mode=mode, sigma=sigma, normalize=normalize)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        for key, output_key in self.key_iterator(d, self.output_keys):
            d[output_key] = self.difference(d[key], d[self.reference_key], mask)
        return d


class OtsuThreshold(Transform):
    """Binary (Otsu 1979) or multi-level (multi-Otsu, Liao et al. 2001) threshold of a map, per channel.

    With ``classes=2`` the output is the binary mask ``map > t``; with more classes it is the mask above the
    highest threshold (``return_labels=False``) or the class index of every pixel (``return_labels=True``).
    Constant maps have no threshold: the mask is empty. Used on difference maps and grounding heat maps.

    Args:
        classes: number of classes, >= 2.
        nbins: histogram bins.
        return_labels: return class indices (0 .. classes-1) instead of the top-class mask.
        return_thresholds: also return the thresholds ``(C, classes - 1)``.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self, classes: int = 2, nbins: int = 256, return_labels: bool = False, return_thresholds: bool = False
    ) -> None:
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
            raise ValueError(f"`classes` must be an int >= 2, got {classes!r}.")
        if not isinstance(nbins, int) or nbins < classes:
            raise ValueError(f"`nbins` must be an int >= classes ({classes}), got {nbins!r}.")
        self.classes = classes
        self.nbins = nbins
        self.return_labels = return_labels
        self.return_thresholds = return_thresholds

    def thresholds(self, values: np.ndarray) -> np.ndarray:
        """The ``classes - 1`` thresholds of one channel (``+inf`` when the map is constant)."""
        from skimage.filters import threshold_multiotsu, threshold_otsu

        values = values[np.isfinite(values)]
        if values.size == 0 or values.max() == values.min():
            return np.full(self.classes - 1, np.inf)
        if self.classes == 2:
            return np.array([threshold_otsu(values, nbins=self.nbins)])
        try:
            return np.asarray(threshold_multiotsu(values, classes=self.classes, nbins=self.nbins))
        except ValueError:  # fewer distinct values than classes
            return np.full(self.classes - 1, np.inf)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor | tuple[NdarrayOrTensor, np.ndarray]:
        array = np.asarray(convert_to_tensor(img, track_meta=False).detach().cpu().float().numpy())
        outputs, all_thresholds = [], []
        for channel in array:
            thresholds = self.thresholds(channel)
            all_thresholds.append(thresholds)
            if self.return_labels:
                outputs.append(np.digitize(channel, thresholds, right=True).astype(np.float32))
            else:
                outputs.append((channel > thresholds[-1]).astype(np.float32))
        result = convert_to_dst_type(
            np.stack(outputs), img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32
        )[0]
        if self.return_thresholds:
            return result, np.stack(all_thresholds)
        return result


class OtsuThresholdd(MapTransform):
    """Dictionary version of :class:`OtsuThreshold`; writes ``output_keys`` (default ``"<key>_otsu"``).

    Args:
        keys: maps to threshold.
        output_keys: output key per input key.
        classes, nbins, return_labels: see :class:`OtsuThreshold`.
        allow_missing_keys: don't raise if a key is absent.
    """

    backend = OtsuThreshold.backend

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection | None = None,
        classes: int = 2,
        nbins: int = 256,
        return_labels: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = _output_keys(self.keys, output_keys, tuple(f"{k}_otsu" for k in self.keys))
        self.threshold = OtsuThreshold(classes=classes, nbins=nbins, return_labels=return_labels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, output_key in self.key_iterator(d, self.output_keys):
            d[output_key] = self.threshold(d[key])
        return d


DifferenceMapD = DifferenceMapDict = DifferenceMapd
OtsuThresholdD = OtsuThresholdDict = OtsuThresholdd
