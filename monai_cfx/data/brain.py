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
"""3D brain MRI phantom (FLAIR-like contrast) with focal lesions, age-dependent ventricles, and its
exact healthy twin."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .synthesis import (
    assemble_subject,
    ellipsoid,
    package_subject,
    parse_findings,
    resolve_domain,
    smooth_field,
    smoothstep,
)

__all__ = ["BRAIN_FINDINGS", "brain_phantom"]

BRAIN_FINDINGS: tuple[str, ...] = ("lesion",)
REGIONS = ("frontal", "parietal", "occipital", "periventricular")
_FINDING_ATTRIBUTES = {"lesion": ("side", "region")}
_ATTRIBUTE_CHOICES = {"side": ("left", "right"), "region": REGIONS}
# lesion centres (|x|, y, z) in normalised RAS coordinates (x: right, y: anterior, z: superior)
_REGION_CENTERS = {
    "frontal": (0.28, 0.45, 0.2),
    "parietal": (0.3, -0.2, 0.38),
    "occipital": (0.25, -0.6, 0.1),
    "periventricular": (0.2, 0.0, 0.18),
}
_P_NORMAL = 0.4
_MAX_RANDOM_LESIONS = 3
_FIELD_OF_VIEW_MM = 200.0
_AGE_RANGE = (20, 90)
# FLAIR-like tissue intensities
_TISSUE = {"scalp": 0.35, "skull": 0.05, "csf": 0.08, "gray": 0.66, "white": 0.48, "lesion": 0.92}


def _article(phrase: str) -> str:
    return "a " + phrase


def _check_age(age: Any) -> float | tuple[float, float] | None:
    """``age`` as a number, a ``(low, high)`` tuple or ``None``, all within the phantoms' age range."""
    if age is None:
        return None
    values = [age] if np.isscalar(age) else list(age) if isinstance(age, Sequence) else []
    valid = (
        len(values) in (1, 2)
        and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)
        and all(np.isfinite(v) and _AGE_RANGE[0] <= v <= _AGE_RANGE[1] for v in values)
        and values == sorted(values)
        and (np.isscalar(age) or len(values) == 2)
    )
    if not valid:
        raise ValueError(
            f"`age` must be a number in {list(_AGE_RANGE)}, a range (low, high) within it, or None, got {age!r}."
        )
    return float(values[0]) if np.isscalar(age) else (float(values[0]), float(values[1]))


def _anatomy(rng: np.random.Generator, age: float | tuple[float, float] | None) -> dict[str, Any]:
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731
    if age is None or isinstance(age, tuple):
        age = float(rng.uniform(*(age or _AGE_RANGE)))
    return {
        "head_radii": (0.74 + jitter(0.03), 0.9 + jitter(0.03), 0.78 + jitter(0.03)),
        "age": float(age),
        "sex": str(rng.choice(["F", "M"])),
    }


def brain_phantom(
    seed: int,
    size: int = 64,
    findings: Sequence[str | Mapping[str, Any]] | None = None,
    age: float | Sequence[float] | None = None,
    domain: str | Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Generate a 3D brain MRI phantom together with its healthy twin and ground truth.

    Anatomy: scalp, skull, a CSF rim, folded cortex (gray matter), white matter, the interhemispheric
    fissure and lateral ventricles. Ageing enlarges the ventricles and the CSF spaces (atrophy).
    Findings are focal white-matter ``lesion``\\ s, hyperintense as on FLAIR. The healthy twin shares
    the anatomy, the age and the noise. Arrays are ``(1, X, Y, Z)`` in RAS orientation (index 0
    increases towards the patient's right), with a matching ``affine``.

    Args:
        seed: subject seed; the same seed gives identical arrays.
        size: volume side in voxels.
        findings: ``None`` draws 0-3 lesions at random from the seed (about 40 % normal); ``[]`` is
            normal; otherwise a list of ``"lesion"`` or ``{"name": "lesion", "side": "left",
            "region": "frontal"}`` (regions: ``REGIONS``); a lesion may be listed several times.
        age: years, in [20, 90]; a range ``(low, high)`` within it, or ``None`` for all of it, draws the age from
            the seed (an ageing population: ``age=(70, 90)``). It is anatomy, shared by the twin.
        domain: acquisition domain (see ``monai_cfx.data.resolve_domain``).

    Returns:
        the same keys as :func:`monai_cfx.data.chest_phantom`; ``attributes`` holds ``age`` and
        ``sex``; ``label_names`` is ``["lesion"]``.

    Example::

        subject = brain_phantom(seed=0, findings=[{"name": "lesion", "side": "left", "region": "frontal"}], age=70)
        subject["image"].shape  # (1, 64, 64, 64)
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 16:
        raise ValueError(f"`size` must be an int >= 16, got {size!r}.")
    age = _check_age(age)
    settings = resolve_domain(domain)
    anatomy_rng, finding_rng, noise_rng, texture_rng = (np.random.default_rng([int(seed), k]) for k in range(4))
    anatomy = _anatomy(anatomy_rng, age)
    if findings is None:
        count = 0 if finding_rng.random() < _P_NORMAL else int(finding_rng.integers(1, _MAX_RANDOM_LESIONS + 1))
        findings = ["lesion"] * count
    specs = parse_findings(
        findings, BRAIN_FINDINGS, _FINDING_ATTRIBUTES, _ATTRIBUTE_CHOICES, finding_rng, repeatable=("lesion",)
    )

    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    grid, edge = (x, y, z), 3.0 / size
    ageing = (anatomy["age"] - _AGE_RANGE[0]) / (_AGE_RANGE[1] - _AGE_RANGE[0])  # 0 (young) .. 1 (old)
    head_radii = np.asarray(anatomy["head_radii"])
    head = ellipsoid(grid, (0, 0, 0), head_radii, edge)
    inside_skull = ellipsoid(grid, (0, 0, 0), head_radii * 0.86, edge)
    brain_scale = 0.82 - 0.05 * ageing  # atrophy widens the CSF rim
    folding = 0.06 * np.tanh(smooth_field(anatomy_rng, x.shape, size / 20.0))
    brain = ellipsoid(grid, (0, 0, 0), head_radii * brain_scale, edge, warp=folding)
    white = ellipsoid(grid, (0, 0, 0), head_radii * (brain_scale - 0.12), edge, warp=1.5 * folding)
    fissure = smoothstep((0.02 + 0.015 * ageing - np.abs(x)) / edge + 0.5) * smoothstep((z - 0.3) / 0.1)
    ventricle_scale = 0.7 + 1.1 * ageing
    ventricles = np.zeros_like(x)
    for sign in (-1.0, 1.0):
        radii = (0.07 * ventricle_scale, 0.3 + 0.04 * ageing, 0.1 * ventricle_scale)
        horn = ellipsoid(grid, (sign * (0.08 + 0.03 * ventricle_scale), 0.02, 0.12), radii, edge)
        ventricles = np.maximum(ventricles, horn)

    texture = smooth_field(texture_rng, x.shape, size / 48.0)
    gray_matter = brain * (1.0 - white)
    white_matter = white * (1.0 - ventricles)
    tissue = (_TISSUE["gray"] * gray_matter + _TISSUE["white"] * white_matter) * (1.0 - fissure)
    csf = _TISSUE["csf"] * inside_skull * (1.0 - brain * (1.0 - fissure)) + _TISSUE["csf"] * white * ventricles
    skull = _TISSUE["skull"] * (head - inside_skull) + _TISSUE["scalp"] * (
        head * smoothstep((np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, head_radii))) - 0.94) / 0.04)
    )
    healthy_clean = tissue + csf + skull + 0.025 * texture * brain

    lesion_density = np.zeros_like(x)
    supports, phrases = [], []
    for spec in specs:
        cx, cy, cz = _REGION_CENTERS[spec["region"]]
        sign = 1.0 if spec["side"] == "right" else -1.0  # RAS: +x is the patient's right
        center = (sign * cx + finding_rng.uniform(-0.06, 0.06), cy + finding_rng.uniform(-0.08, 0.08), cz)
        radii = finding_rng.uniform(0.07, 0.14, size=3)
        warp = 0.2 * np.tanh(smooth_field(finding_rng, x.shape, size / 16.0))
        # lesions live in white matter, never in the ventricles
        lesion = ellipsoid(grid, center, radii, edge, warp=warp) * white_matter
        lesion_density = np.maximum(lesion_density, lesion)
        supports.append(("lesion", lesion))
        phrases.append(f"{spec['side']} {spec['region']} white matter lesion")
    abnormal_clean = healthy_clean + (_TISSUE["lesion"] - _TISSUE["white"]) * lesion_density

    subject = assemble_subject(healthy_clean, abnormal_clean, supports, settings, noise_rng)
    spacing = _FIELD_OF_VIEW_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2.0
    attributes_source = {"age": anatomy["age"], "sex": anatomy["sex"]}
    packaged = package_subject(
        subject, specs, phrases, attributes_source, affine, spacing, settings, "Brain MRI", BRAIN_FINDINGS, _article
    )
    packaged["attributes"]["age"] = round(float(anatomy["age"]), 1)
    return packaged
