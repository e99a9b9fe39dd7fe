from __future__ import annotations

import unittest

import numpy as np
from parameterized import parameterized

from monai_cfx.data import BRAIN_FINDINGS, CHEST_FINDINGS, brain_phantom, chest_phantom, generate_phantom

CHEST_CASES = [
    ["normal", []],
    ["opacity", [{"name": "opacity", "side": "left", "zone": "lower"}]],
    ["effusion", [{"name": "effusion", "side": "right", "size": "moderate"}]],
    ["cardiomegaly", ["cardiomegaly"]],
    ["nodule", [{"name": "nodule", "side": "right", "zone": "upper"}]],
    ["two_findings", ["effusion", "nodule"]],
    ["target_domain", ["opacity"], "target"],
    ["custom_domain", ["effusion"], {"blur": 1.5, "resolution": 0.6, "gamma": 0.8}],
]
BRAIN_CASES = [
    ["normal", []],
    ["one_lesion", [{"name": "lesion", "side": "left", "region": "frontal"}]],
    ["two_lesions", ["lesion", "lesion"]],
    ["target_domain", ["lesion"], "target"],
]


def _check_subject(test: unittest.TestCase, subject: dict, spatial_ndim: int, label_names) -> None:
    for key in ("image", "healthy", "mask"):
        array = subject[key]
        test.assertEqual(array.dtype, np.float32, key)
        test.assertEqual(array.ndim, spatial_ndim + 1, key)
        test.assertEqual(array.shape[0], 1, key)
        test.assertGreaterEqual(float(array.min()), 0.0, key)
        test.assertLessEqual(float(array.max()), 1.0, key)
    outside = subject["mask"] == 0
    # the twin property: outside the finding masks the image *is* its healthy twin
    np.testing.assert_array_equal(subject["image"][outside], subject["healthy"][outside])
    test.assertEqual(subject["label_names"], list(label_names))
    test.assertEqual(subject["labels"].shape, (len(label_names),))
    test.assertEqual(subject["affine"].shape, (4, 4))
    union = np.zeros_like(subject["mask"], dtype=bool)
    for name, mask in subject["masks"].items():
        test.assertEqual(subject["labels"][label_names.index(name)], 1.0)
        test.assertTrue(mask.any(), name)
        union |= mask > 0
        # inside each finding the image differs from the twin somewhere: the finding is visible
        test.assertGreater(float(np.abs(subject["image"] - subject["healthy"])[mask > 0].max()), 0.05, name)
    np.testing.assert_array_equal(union, subject["mask"] > 0)
    for phrase in subject["phrases"]:
        test.assertIn(phrase["text"], subject["report"])
        box = np.asarray(phrase["box"])
        test.assertEqual(len(box), 2 * spatial_ndim)
        test.assertTrue(np.all(box[:spatial_ndim] < box[spatial_ndim:]))
        # the box is tight around its finding's mask
        region = tuple(slice(b, e) for b, e in zip(box[:spatial_ndim], box[spatial_ndim:]))
        test.assertTrue(subject["masks"][phrase["finding"]][0][region].any())
    if not subject["phrases"]:
        test.assertTrue(subject["report"].startswith("Normal"))
        test.assertFalse(subject["mask"].any())
        np.testing.assert_array_equal(subject["image"], subject["healthy"])


class TestChestPhantom(unittest.TestCase):
    @parameterized.expand(CHEST_CASES)
    def test_contract(self, _, findings, domain=None):
        subject = chest_phantom(seed=7, size=96, findings=findings, domain=domain)
        self.assertEqual(subject["image"].shape, (1, 96, 96))
        _check_subject(self, subject, 2, CHEST_FINDINGS)
        self.assertEqual(int(subject["labels"].sum()), len(findings))

    def test_deterministic_and_seed_dependent(self):
        first, again, other = chest_phantom(3), chest_phantom(3), chest_phantom(4)
        for key in ("image", "healthy", "mask"):
            np.testing.assert_array_equal(first[key], again[key])
        self.assertEqual(first["report"], again["report"])
        self.assertGreater(float(np.abs(first["healthy"] - other["healthy"]).mean()), 0.01)

    def test_healthy_twin_is_the_normal_subject(self):
        # anatomy, findings and noise use separate streams, so asking for findings leaves the twin unchanged
        abnormal = chest_phantom(11, findings=["effusion", "opacity"])
        normal = chest_phantom(11, findings=[])
        np.testing.assert_array_equal(abnormal["healthy"], normal["image"])

    def test_findings_land_where_asked(self):
        for side, half in (("left", slice(64, None)), ("right", slice(None, 64))):
            subject = chest_phantom(5, findings=[{"name": "nodule", "side": side, "zone": "middle"}])
            mask = subject["masks"]["nodule"][0]
            # MONAI orientation: axis 0 runs from the patient's right (image left) to their left
            self.assertEqual(mask[half].sum(), mask.sum(), side)
        upper = chest_phantom(5, findings=[{"name": "opacity", "side": "left", "zone": "upper"}])["phrases"][0]["box"]
        lower = chest_phantom(5, findings=[{"name": "opacity", "side": "left", "zone": "lower"}])["phrases"][0]["box"]
        self.assertLess(upper[1], lower[1])
        effusion = chest_phantom(5, findings=[{"name": "effusion", "side": "left", "size": "small"}])
        self.assertEqual(effusion["report"], "Chest radiograph with a small left pleural effusion.")
        self.assertGreater(effusion["phrases"][0]["box"][3], 70)  # effusions collect at the lung base

    def test_random_findings_cover_all_classes(self):
        labels = np.stack([chest_phantom(s, size=64)["labels"] for s in range(60)])
        self.assertTrue((labels.sum(0) > 0).all(), labels.sum(0))
        normal_fraction = float((labels.sum(1) == 0).mean())
        self.assertTrue(0.2 < normal_fraction < 0.6, normal_fraction)

    def test_domain_shift_changes_appearance_not_ground_truth(self):
        source, target = chest_phantom(2, findings=["opacity"]), chest_phantom(2, findings=["opacity"], domain="target")
        self.assertEqual(source["report"], target["report"])
        self.assertGreater(float(np.abs(source["healthy"] - target["healthy"]).mean()), 0.02)

    @parameterized.expand(
        [
            ["unknown_finding", {"findings": ["pneumothorax"]}, "findings"],
            ["unknown_side", {"findings": [{"name": "opacity", "side": "up"}]}, "side"],
            ["wrong_attribute", {"findings": [{"name": "cardiomegaly", "side": "left"}]}, "attribute"],
            ["duplicate", {"findings": ["nodule", "nodule"]}, "twice"],
            ["string_findings", {"findings": "nodule"}, "findings"],
            ["unknown_domain", {"domain": "hospital"}, "domain"],
            ["unknown_domain_key", {"domain": {"sharpness": 1.0}}, "domain key"],
            ["nan_domain", {"domain": {"noise": float("nan")}}, "noise"],
            ["bad_resolution", {"domain": {"resolution": 1.5}}, "resolution"],
            ["negative_seed", {"seed": -1}, "seed"],
            ["tiny_size", {"size": 8}, "size"],
        ]
    )
    def test_bad_input(self, _, kwargs, message):
        arguments = {"seed": 0, **kwargs}
        with self.assertRaisesRegex(ValueError, message):
            chest_phantom(**arguments)


class TestBrainPhantom(unittest.TestCase):
    @parameterized.expand(BRAIN_CASES)
    def test_contract(self, _, findings, domain=None):
        subject = brain_phantom(seed=2, size=32, findings=findings, domain=domain)
        self.assertEqual(subject["image"].shape, (1, 32, 32, 32))
        _check_subject(self, subject, 3, BRAIN_FINDINGS)
        self.assertEqual(len(subject["phrases"]), len(findings))

    def test_ventricles_grow_with_age_and_twin_keeps_age(self):
        def csf_volume(age):
            subject = brain_phantom(1, size=32, findings=["lesion"], age=age, domain={"noise": 0.0})
            self.assertEqual(subject["attributes"]["age"], age)
            brain = subject["healthy"][0][8:24, 8:24, 8:24]
            return float((brain < 0.2).mean())

        self.assertGreater(csf_volume(85.0), csf_volume(25.0) + 0.01)

    def test_lesion_side_follows_ras(self):
        subject = brain_phantom(4, size=32, findings=[{"name": "lesion", "side": "right", "region": "frontal"}])
        box = subject["phrases"][0]["box"]
        self.assertGreaterEqual(box[0], 16)  # RAS: the patient's right is the high end of axis 0
        self.assertGreater(subject["affine"][0, 0], 0)

    def test_age_range_is_drawn_per_seed(self):
        ages = [brain_phantom(seed, size=16, findings=[], age=(70, 90))["attributes"]["age"] for seed in range(6)]
        self.assertTrue(all(70 <= age <= 90 for age in ages))
        self.assertGreater(len(set(ages)), 1)  # drawn from each seed, not fixed
        again = brain_phantom(3, size=16, findings=[], age=[70, 90])
        self.assertEqual(again["attributes"]["age"], ages[3])

    @parameterized.expand([("too_old", 150), ("reversed", (80, 70)), ("outside", (10, 30)), ("three", (20, 30, 40))])
    def test_bad_age(self, _, age):
        with self.assertRaisesRegex(ValueError, "`age` must be a number in"):
            brain_phantom(0, age=age)

    def test_bad_findings(self):
        with self.assertRaisesRegex(ValueError, "findings"):
            brain_phantom(0, findings=["nodule"])


class TestGeneratePhantom(unittest.TestCase):
    def test_dispatch(self):
        self.assertEqual(generate_phantom("chest", 0, 64)["image"].shape, (1, 64, 64))
        self.assertEqual(generate_phantom("brain", 0, 16)["image"].shape, (1, 16, 16, 16))
        with self.assertRaisesRegex(ValueError, "kind"):
            generate_phantom("knee", 0)


if __name__ == "__main__":
    unittest.main()
