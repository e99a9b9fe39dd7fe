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
"""2D chest-radiograph phantom with findings and its exact healthy twin."""

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

__all__ = ["CHEST_FINDINGS", "chest_phantom"]

CHEST_FINDINGS: tuple[str, ...] = ("opacity", "effusion", "cardiomegaly", "nodule")
SIDES = ("left", "right")
ZONES = ("upper", "middle", "lower")
SIZES = ("small", "moderate", "large")
# which attributes each finding takes (the rest are rejected)
_FINDING_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "opacity": ("side", "zone"),
    "effusion": ("side", "size"),
    "cardiomegaly": (),
    "nodule": ("side", "zone"),
}
_ATTRIBUTE_CHOICES = {"side": SIDES, "zone": ZONES, "size": SIZES}
# probability that a randomly drawn subject is normal, and that it has a second finding
_P_NORMAL = 0.4
_P_SECOND_FINDING = 0.25
_FIELD_OF_VIEW_MM = 400.0
# zone centres as a fraction of lung height, from apex to base
_ZONE_FRACTION = {"upper": 0.22, "middle": 0.5, "lower": 0.75}
_EFFUSION_HEIGHT = {"small": 0.12, "moderate": 0.3, "large": 0.45}


def _random_findings(rng: np.random.Generator) -> list[str]:
    if rng.random() < _P_NORMAL:
        return []
    first = str(rng.choice(CHEST_FINDINGS))
    if rng.random() >= _P_SECOND_FINDING:
        return [first]
    others = [name for name in CHEST_FINDINGS if name != first]
    return [first, str(rng.choice(others))]


def _anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Random, plausible anatomy parameters in normalised coordinates (u: image left->right, v: top->bottom)."""
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731
    lung_height = 1.12 + jitter(0.06)
    return {
        "body_radii": (0.86 + jitter(0.04), 1.1 + jitter(0.04)),
        "lung_center_u": 0.37 + jitter(0.025),
        "lung_top": -0.74 + jitter(0.04),
        "lung_height": lung_height,
        "lung_width": 0.26 + jitter(0.02),
        # the right hemidiaphragm (image left) usually sits a little higher
        "dome_drop": (0.04 + jitter(0.02), 0.0 + jitter(0.02)),
        "heart_center": (0.1 + jitter(0.03), 0.13 + jitter(0.03)),
        "heart_radii": (0.27 + jitter(0.02), 0.23 + jitter(0.02)),
        "rib_spacing": 0.135 + jitter(0.008),
        "rib_curvature": 0.9 + jitter(0.15),
        "soft_tissue": 0.55 + jitter(0.04),
        "lung_air": 0.36 + jitter(0.03),
        "age": int(rng.integers(20, 90)),
        "sex": str(rng.choice(["F", "M"])),
    }


class _ChestGrid:
    """Coordinates in MONAI orientation: axis 0 = horizontal (u), axis 1 = vertical (v), both in [-1, 1]."""

    def __init__(self, size: int):
        axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
        self.u, self.v = np.meshgrid(axis, axis, indexing="ij")
        self.size = size
        self.edge = 3.0 / size  # ~1.5 pixels of soft boundary each side

    def ellipse(self, center, radii, warp=None) -> np.ndarray:
        return ellipsoid((self.u, self.v), center, radii, self.edge, warp)

    def band(self, distance: np.ndarray, half_width: float) -> np.ndarray:
        return smoothstep((half_width - np.abs(distance)) / self.edge + 0.5)


def _lung(grid: _ChestGrid, anatomy: Mapping[str, Any], sign: float, dome_drop: float) -> tuple[np.ndarray, float]:
    """One lung field, bounded below by a dome-shaped hemidiaphragm; returns (alpha, base level at centre)."""
    center_u = sign * anatomy["lung_center_u"]
    top, height, width = anatomy["lung_top"], anatomy["lung_height"], anatomy["lung_width"]
    center_v = top + height / 2
    outline = grid.ellipse((center_u, center_v), (width, height / 2 * 1.15))
    base = top + height + dome_drop
    # dome: highest at the lung's centre, falling towards the costophrenic angle
    dome = base - 0.12 + 1.2 * (grid.u - center_u) ** 2
    below_apex_of_dome = smoothstep((dome - grid.v) / grid.edge + 0.5)
    return outline * below_apex_of_dome, base - 0.12


def _ribs(grid: _ChestGrid, anatomy: Mapping[str, Any], body: np.ndarray) -> np.ndarray:
    ribs = np.zeros_like(grid.u)
    # the rib cage ends a little below the hemidiaphragms
    thorax = smoothstep((anatomy["lung_top"] + anatomy["lung_height"] + 0.02 - grid.v) / 0.06)
    lateral = np.abs(grid.u)
    lateral_window = smoothstep((lateral - 0.07) / 0.05) * smoothstep((0.82 - lateral) / 0.08)
    for index in range(9):
        # posterior ribs: arcs that run laterally and downwards from the spine
        center = anatomy["lung_top"] - 0.06 + index * anatomy["rib_spacing"]
        centerline = center + anatomy["rib_curvature"] * (lateral - 0.1) ** 2
        ribs = np.maximum(ribs, grid.band(grid.v - centerline, 0.028 + 0.002 * index))
    return ribs * lateral_window * thorax * body


def _render(
    grid: _ChestGrid, anatomy: Mapping[str, Any], heart: np.ndarray, lungs: np.ndarray, parts: Mapping[str, Any]
) -> np.ndarray:
    """Attenuation-like composition: soft tissue, minus air in the lungs, plus bone and the heart."""
    lung_air = lungs * (1.0 - heart) * (1.0 - 0.6 * parts["spine"])
    image = anatomy["soft_tissue"] * parts["body"]
    image = image - anatomy["lung_air"] * lung_air
    image = image + 0.035 * parts["markings"] * lung_air
    image = image + 0.08 * heart + 0.22 * parts["spine"] + 0.11 * parts["ribs"] + 0.1 * parts["clavicles"]
    return image


def chest_phantom(
    seed: int,
    size: int = 128,
    findings: Sequence[str | Mapping[str, Any]] | None = None,
    domain: str | Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Generate a 2D chest-radiograph phantom together with its healthy twin and ground truth.

    The anatomy (body, lung fields with dome-shaped hemidiaphragms, heart silhouette, spine, ribs,
    clavicles, vascular markings) is random per ``seed``. Findings are drawn on top; the healthy
    twin has the same anatomy and the same acquisition noise without them, so outside the finding
    masks the two images are identical. Independent random streams are used for the anatomy, the
    findings and the noise: ``chest_phantom(s, findings=[...])["healthy"]`` equals
    ``chest_phantom(s, findings=[])["image"]``.

    Arrays follow MONAI's convention ``(C, W, H)``: spatial axis 0 runs across the image (from the
    patient's right to their left, as on a PA radiograph), axis 1 from top to bottom; ``affine``
    maps them to RAS so that NIfTI viewers show the radiograph upright.

    Args:
        seed: subject seed; the same seed gives identical arrays.
        size: image side in pixels.
        findings: ``None`` draws findings at random from the seed (about 40 % of subjects are
            normal); ``[]`` gives a normal subject; otherwise a list of names from
            ``CHEST_FINDINGS`` or dicts such as ``{"name": "opacity", "side": "left", "zone": "lower"}``
            (``effusion`` takes ``side`` and ``size``; ``cardiomegaly`` takes nothing). Unspecified
            attributes are drawn from the seed.
        domain: acquisition domain: ``None``/``"source"``, ``"target"`` or a mapping of
            ``contrast``, ``gamma``, ``blur``, ``noise``, ``resolution`` (see ``resolve_domain``).

    Returns:
        a dict with ``image``, ``healthy``, ``mask`` (union, ``(1, W, H)`` float32 in [0, 1]),
        ``masks`` and ``boxes`` per finding (MONAI ``StandardMode``, end exclusive), ``labels``
        (multi-hot over ``label_names``), ``report``, ``phrases`` (``{"text", "finding", "box"}``,
        MS-CXR style; each text appears verbatim in ``report``), ``findings`` (resolved specs),
        ``attributes`` (age, sex), ``affine`` (4x4), ``spacing`` and ``domain`` (resolved settings).

    Example::

        subject = chest_phantom(seed=3, findings=[{"name": "effusion", "side": "left", "size": "small"}])
        subject["report"]  # 'Chest radiograph with a small left pleural effusion.'
        (subject["image"] != subject["healthy"])[subject["mask"] == 0].any()  # False
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 32:
        raise ValueError(f"`size` must be an int >= 32, got {size!r}.")
    settings = resolve_domain(domain)
    anatomy_rng, finding_rng, noise_rng, texture_rng = (np.random.default_rng([int(seed), k]) for k in range(4))
    anatomy = _anatomy(anatomy_rng)
    requested = _random_findings(finding_rng) if findings is None else findings
    specs = parse_findings(requested, CHEST_FINDINGS, _FINDING_ATTRIBUTES, _ATTRIBUTE_CHOICES, finding_rng)

    grid = _ChestGrid(int(size))
    body = grid.ellipse((0.0, 0.12), anatomy["body_radii"])
    lungs_by_side, lung_base = {}, {}
    for side, sign, drop in (("right", -1.0, anatomy["dome_drop"][0]), ("left", 1.0, anatomy["dome_drop"][1])):
        lungs_by_side[side], lung_base[side] = _lung(grid, anatomy, sign, drop)
    lungs = np.maximum(lungs_by_side["left"], lungs_by_side["right"])
    spine = grid.band(grid.u, 0.055) * (0.85 + 0.15 * np.cos(grid.v * np.pi / anatomy["rib_spacing"] * 2)) * body
    clavicle_line = anatomy["lung_top"] + 0.06 - 0.18 * (np.abs(grid.u) - 0.15)
    clavicles = (
        grid.band(grid.v - clavicle_line, 0.025) * smoothstep((0.6 - np.abs(grid.u)) / 0.1) * (np.abs(grid.u) > 0.06)
    )
    parts = {
        "body": body,
        "spine": spine,
        "ribs": _ribs(grid, anatomy, body),
        "clavicles": clavicles * body,
        "markings": smooth_field(texture_rng, grid.u.shape, size / 128.0),
    }
    heart = grid.ellipse(anatomy["heart_center"], anatomy["heart_radii"])
    healthy_clean = _render(grid, anatomy, heart, lungs, parts)

    abnormal_heart = heart
    added_density = np.zeros_like(healthy_clean)
    supports: list[tuple[str, np.ndarray]] = []
    phrases: list[str] = []
    for spec in specs:
        name = spec["name"]
        if name == "cardiomegaly":
            scale = float(finding_rng.uniform(1.3, 1.45))
            radii = (anatomy["heart_radii"][0] * scale, anatomy["heart_radii"][1] * (1 + (scale - 1) * 0.6))
            center = (anatomy["heart_center"][0] + 0.03, anatomy["heart_center"][1] - 0.02)
            abnormal_heart = np.maximum(heart, grid.ellipse(center, radii))
            supports.append((name, abnormal_heart - heart))
            phrases.append("cardiomegaly")
            continue
        side_lung = lungs_by_side[spec["side"]] * (1.0 - heart)
        sign = 1.0 if spec["side"] == "left" else -1.0
        if name == "effusion":
            height = _EFFUSION_HEIGHT[spec["size"]] * anatomy["lung_height"] * float(finding_rng.uniform(0.85, 1.15))
            level = lung_base[spec["side"]] + 0.1 - height
            lateral = np.clip(sign * grid.u - anatomy["lung_center_u"] + anatomy["lung_width"], 0, None)
            # meniscus: the fluid climbs the lateral chest wall (concave upper surface)
            surface = level - 0.35 * (lateral / (2 * anatomy["lung_width"])) ** 2 * (0.5 + height)
            fluid = smoothstep((grid.v - surface) / (2 * grid.edge) + 0.5) * side_lung
            added_density += 0.92 * anatomy["lung_air"] * fluid
            supports.append((name, fluid))
            phrases.append(f"{spec['size']} {spec['side']} pleural effusion")
            continue
        zone_v = anatomy["lung_top"] + _ZONE_FRACTION[spec["zone"]] * anatomy["lung_height"]
        center = (sign * (anatomy["lung_center_u"] + float(finding_rng.uniform(-0.06, 0.06))), zone_v)
        if name == "opacity":
            radii = tuple(float(r) for r in finding_rng.uniform(0.09, 0.15, size=2))
            warp = 0.25 * np.tanh(smooth_field(finding_rng, grid.u.shape, size / 24.0))
            blob = grid.ellipse(center, radii, warp) * side_lung
            added_density += 0.7 * anatomy["lung_air"] * blob
            supports.append((name, blob))
            phrases.append(f"{spec['side']} {spec['zone']} zone opacity")
        else:  # nodule
            radius = float(finding_rng.uniform(0.035, 0.055))
            blob = grid.ellipse(center, (radius, radius)) * side_lung
            added_density += 0.8 * anatomy["lung_air"] * blob
            supports.append((name, blob))
            phrases.append(f"{spec['side']} {spec['zone']} zone nodule")
    abnormal_clean = _render(grid, anatomy, abnormal_heart, lungs, parts) + added_density

    subject = assemble_subject(healthy_clean, abnormal_clean, supports, settings, noise_rng)
    spacing = _FIELD_OF_VIEW_MM / size
    # axis 0 runs towards the patient's left (-x in RAS), axis 1 from head to feet; centred on the origin
    affine = np.diag([-spacing, -spacing, 1.0, 1.0])
    affine[:2, 3] = spacing * (size - 1) / 2.0
    return package_subject(
        subject, specs, phrases, anatomy, affine, spacing, settings, "Chest radiograph", CHEST_FINDINGS, _article
    )


def _article(phrase: str) -> str:
    return phrase if phrase == "cardiomegaly" else ("an " if phrase[0] in "aeiou" else "a ") + phrase
