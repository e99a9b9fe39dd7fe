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
"""Building blocks shared by the phantom generators: soft shapes with compact support, smooth random
fields, acquisition-domain effects, and the assembly step that makes a subject and its healthy twin.

Every soft shape here falls to exactly zero a few pixels outside its boundary (a smoothstep, not a
Gaussian), so a finding changes the image only inside its own support. That is what lets the
generators return a healthy twin that equals the image everywhere outside the finding masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from monai_cfx.utils import check_option

__all__ = [
    "DOMAIN_PRESETS",
    "assemble_subject",
    "bounding_box",
    "ellipsoid",
    "package_subject",
    "parse_findings",
    "resolve_domain",
    "smooth_field",
    "smoothstep",
]

# Acquisition settings of the two reference domains; fine-tuning experiments adapt source -> target.
DOMAIN_PRESETS: dict[str, dict[str, float]] = {
    "source": {"contrast": 1.0, "gamma": 1.0, "blur": 0.0, "noise": 0.02, "resolution": 1.0},
    "target": {"contrast": 0.75, "gamma": 1.5, "blur": 0.8, "noise": 0.04, "resolution": 0.5},
}
# fraction of a finding's peak effect under which a blurred support counts as outside the finding
_SUPPORT_EPS = 1e-3


def smoothstep(t: np.ndarray) -> np.ndarray:
    """Cubic smoothstep clamped to [0, 1]: exactly 0 for t <= 0 and exactly 1 for t >= 1."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def ellipsoid(
    grid: Sequence[np.ndarray],
    center: Sequence[float],
    radii: Sequence[float],
    edge: float,
    warp: np.ndarray | None = None,
) -> np.ndarray:
    """Soft ellipse/ellipsoid membership in [0, 1] with an edge ``edge`` wide (grid units).

    Args:
        grid: coordinate arrays, one per spatial dimension (as from ``np.meshgrid(..., indexing="ij")``).
        center: centre per dimension.
        radii: semi-axes per dimension.
        edge: width of the soft boundary, in the grid's units.
        warp: optional field of relative radius changes (e.g. 0.2 * smooth noise) for irregular shapes.
    """
    dist = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)))
    if warp is not None:
        dist = dist / (1.0 + warp)
    mean_radius = float(np.mean(radii))
    return smoothstep((1.0 - dist) * mean_radius / edge + 0.5)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-correlated random field with unit standard deviation (``sigma`` in pixels)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def resolve_domain(domain: str | Mapping[str, float] | None) -> dict[str, float]:
    """Return the full acquisition settings for ``domain``.

    Args:
        domain: ``None`` or ``"source"`` for the default acquisition, ``"target"`` for the shifted one,
            or a mapping that overrides any of ``contrast``, ``gamma``, ``blur`` (Gaussian sigma in
            pixels), ``noise`` (standard deviation) and ``resolution`` (fraction of the sampling
            density, in (0, 1]) on top of the source settings.
    """
    if domain is None:
        return dict(DOMAIN_PRESETS["source"])
    if isinstance(domain, str):
        return dict(DOMAIN_PRESETS[check_option("domain", domain, DOMAIN_PRESETS)])
    if not isinstance(domain, Mapping):
        raise ValueError(f"`domain` must be None, a preset name {list(DOMAIN_PRESETS)} or a mapping, got {domain!r}.")
    settings = dict(DOMAIN_PRESETS["source"])
    for key, value in domain.items():
        check_option("domain key", key, settings)
        if not np.isfinite(value):
            raise ValueError(f"`domain[{key!r}]` must be a finite number, got {value!r}.")
        settings[key] = float(value)
    limits = {"contrast": (0.0, None), "gamma": (0.0, None), "blur": (-1e-12, None), "noise": (-1e-12, None)}
    for key, (low, _) in limits.items():
        if settings[key] <= low:
            raise ValueError(f"`domain[{key!r}]` must be > {max(low, 0.0)}, got {settings[key]}.")
    if not 0.0 < settings["resolution"] <= 1.0:
        raise ValueError(f"`domain['resolution']` must be in (0, 1], got {settings['resolution']}.")
    return settings


def _spatial_degradation(array: np.ndarray, settings: Mapping[str, float]) -> np.ndarray:
    """Blur and resolution loss: linear, so a finding's effect spreads by a bounded amount."""
    if settings["resolution"] < 1.0:
        low = ndimage.zoom(array, settings["resolution"], order=1, mode="nearest", grid_mode=True)
        array = ndimage.zoom(low, np.divide(array.shape, low.shape), order=1, mode="nearest", grid_mode=True)
    if settings["blur"] > 0:
        array = ndimage.gaussian_filter(array, settings["blur"], mode="nearest")
    return array


def _intensity_response(array: np.ndarray, settings: Mapping[str, float]) -> np.ndarray:
    """Point-wise contrast (about mid-grey) and gamma: keeps image == healthy wherever they agree."""
    array = np.clip(0.5 + settings["contrast"] * (array - 0.5), 0.0, 1.0)
    return array ** settings["gamma"] if settings["gamma"] != 1.0 else array


def bounding_box(mask: np.ndarray) -> list[int]:
    """MONAI ``StandardMode`` box ``[start_0, start_1, (start_2,) end_0, end_1, (end_2)]``, ends exclusive."""
    coords = np.nonzero(mask)
    starts = [int(c.min()) for c in coords]
    ends = [int(c.max()) + 1 for c in coords]
    return starts + ends


def assemble_subject(
    healthy_clean: np.ndarray,
    abnormal_clean: np.ndarray,
    finding_supports: Sequence[tuple[str, np.ndarray]],
    settings: Mapping[str, float],
    noise_rng: np.random.Generator,
) -> dict[str, Any]:
    """Apply one acquisition to a subject and its healthy twin, and derive the finding masks and boxes.

    Both renderings go through the same degradation and the same noise draw. Finding masks are the
    supports of each finding's (degraded) effect, so outside their union the image *is* the healthy
    twin, bit for bit.

    Args:
        healthy_clean: noise-free rendering without findings, in display orientation.
        abnormal_clean: the same anatomy with the findings.
        finding_supports: ``(finding name, effect weight)`` per finding instance; weight > 0 where the
            finding changes the rendering.
        settings: resolved acquisition settings (see :func:`resolve_domain`).
        noise_rng: the generator of the acquisition noise, independent of the findings.
    """
    healthy = _spatial_degradation(healthy_clean, settings)
    abnormal = _spatial_degradation(abnormal_clean, settings)
    masks: dict[str, np.ndarray] = {}
    boxes: dict[str, list[list[int]]] = {}
    instance_masks: list[np.ndarray] = []
    for name, weight in finding_supports:
        spread = _spatial_degradation(weight.astype(np.float64), settings)
        support = spread > _SUPPORT_EPS * max(float(weight.max()), 1e-12)
        masks[name] = masks.get(name, np.zeros_like(support)) | support
        boxes.setdefault(name, []).append(bounding_box(support) if support.any() else [])
        instance_masks.append(support)
    union = np.zeros(healthy.shape, dtype=bool)
    for support in masks.values():
        union |= support
    image = np.where(union, abnormal, healthy)
    noise = settings["noise"] * noise_rng.standard_normal(healthy.shape)
    healthy = np.clip(_intensity_response(healthy, settings) + noise, 0.0, 1.0)
    image = np.clip(_intensity_response(image, settings) + noise, 0.0, 1.0)
    # the noise is identical, but keep the twin property exact even where rounding could differ
    image = np.where(union, image, healthy)
    return {
        "image": image.astype(np.float32),
        "healthy": healthy.astype(np.float32),
        "mask": union.astype(np.float32),
        "masks": {name: m.astype(np.float32) for name, m in masks.items()},
        "boxes": boxes,
        "instance_masks": instance_masks,
    }


def parse_findings(
    findings: Sequence[str | Mapping[str, Any]] | None,
    known: Sequence[str],
    attributes: Mapping[str, Sequence[str]],
    choices: Mapping[str, Sequence[str]],
    rng: np.random.Generator,
    repeatable: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Validate a findings request and fill unspecified attributes from ``rng``.

    Each item is a finding name or a mapping ``{"name": ..., <attribute>: <value>}``.
    """
    if isinstance(findings, (str, Mapping)) or not isinstance(findings, Sequence):
        raise ValueError(f"`findings` must be None or a list of names/dicts, got {findings!r}.")
    resolved: list[dict[str, Any]] = []
    for item in findings:
        spec = {"name": item} if isinstance(item, str) else dict(item)
        if "name" not in spec:
            raise ValueError(f"each entry of `findings` needs a 'name', got {item!r}.")
        name = check_option("findings name", spec["name"], known)
        if name not in repeatable and any(r["name"] == name for r in resolved):
            raise ValueError(f"`findings` lists {name!r} twice; each finding type may appear once.")
        for key in spec:
            if key != "name":
                check_option(f"findings[{name!r}] attribute", key, attributes[name])
        for key in attributes[name]:
            if key in spec:
                check_option(f"findings[{name!r}][{key!r}]", spec[key], choices[key])
            else:
                spec[key] = str(rng.choice(choices[key]))
        resolved.append(spec)
    return resolved


def _join_phrases(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def package_subject(
    subject: dict[str, Any],
    specs: Sequence[Mapping[str, Any]],
    phrases: Sequence[str],
    anatomy: Mapping[str, Any],
    affine: np.ndarray,
    spacing: float,
    settings: Mapping[str, float],
    modality_text: str,
    label_names: Sequence[str],
    article: Callable[[str], str],
) -> dict[str, Any]:
    """Add channel axes, labels, report and MS-CXR-style phrases to an assembled subject."""
    instance_masks = subject.pop("instance_masks")
    if phrases:
        report = f"{modality_text} with {_join_phrases([article(p) for p in phrases])}."
    else:
        report = f"Normal {modality_text[0].lower()}{modality_text[1:]}."
    labels = np.zeros(len(label_names), dtype=np.float32)
    phrase_items = []
    for spec, text, support in zip(specs, phrases, instance_masks):
        labels[label_names.index(spec["name"])] = 1.0
        box = bounding_box(support) if support.any() else []
        phrase_items.append({"text": text, "finding": spec["name"], "box": box})
    return {
        "image": subject["image"][None],
        "healthy": subject["healthy"][None],
        "mask": subject["mask"][None],
        "masks": {name: m[None] for name, m in subject["masks"].items()},
        "boxes": subject["boxes"],
        "labels": labels,
        "label_names": list(label_names),
        "report": report,
        "phrases": phrase_items,
        "findings": [dict(spec) for spec in specs],
        "attributes": {"age": int(anatomy["age"]), "sex": anatomy["sex"]},
        "affine": affine,
        "spacing": [float(spacing)] * subject["image"].ndim,
        "domain": dict(settings),
    }
