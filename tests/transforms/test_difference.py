from __future__ import annotations

import unittest

import numpy as np
import torch
from monai.data import MetaTensor

from monai_cfx.transforms import DifferenceMap, DifferenceMapd, OtsuThreshold, OtsuThresholdd


class TestDifferenceMap(unittest.TestCase):
    def setUp(self):
        generator = torch.Generator().manual_seed(0)
        self.reference = torch.rand(1, 32, 32, generator=generator)
        self.finding = torch.zeros(1, 32, 32)
        self.finding[:, 10:18, 12:20] = 0.5
        noise = 0.1 * torch.randn(1, 32, 32, generator=generator)
        self.image = self.reference + self.finding + noise

    def test_signed_absolute_and_mask(self):
        signed = DifferenceMap(mode="signed")(self.image, self.reference)
        torch.testing.assert_close(signed, self.image - self.reference)
        absolute = DifferenceMap()(self.reference, self.image)
        torch.testing.assert_close(absolute, signed.abs())
        body = torch.zeros(1, 32, 32)
        body[:, :16] = 1
        masked = DifferenceMap()(self.image, self.reference, mask=body)
        self.assertEqual(float(masked[:, 16:].abs().max()), 0.0)
        torch.testing.assert_close(masked[:, :16], absolute[:, :16])

    def test_smoothing_cancels_noise_before_the_magnitude(self):
        inside = self.finding > 0

        def contrast(m):
            return float(m[inside].mean() / m[~inside].mean())

        raw = DifferenceMap()(self.image, self.reference)
        smoothed = DifferenceMap(sigma=1.5)(self.image, self.reference)
        self.assertGreater(contrast(smoothed), 2 * contrast(raw))

    def test_normalize_and_meta(self):
        image = MetaTensor(self.image, affine=torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0])))
        result = DifferenceMap(mode="signed", normalize=True)(image, self.reference)
        self.assertIsInstance(result, MetaTensor)
        torch.testing.assert_close(result.affine, image.affine)
        self.assertAlmostEqual(float(result.abs().max()), 1.0, places=5)
        as_numpy = DifferenceMap()(self.image.numpy(), self.reference.numpy())
        self.assertIsInstance(as_numpy, np.ndarray)

    def test_integer_images_give_float_maps(self):
        image = torch.full((1, 4, 4), 10, dtype=torch.uint8)
        reference = torch.full((1, 4, 4), 20, dtype=torch.uint8)
        signed = DifferenceMap(mode="signed")(image, reference)
        self.assertEqual(signed.dtype, torch.float32)
        self.assertEqual(float(signed.max()), -10.0)
        ct = np.full((1, 4, 4), 300, dtype=np.int16)
        normalized = DifferenceMap(normalize=True)(ct, ct - np.int16(150) * (np.arange(16).reshape(1, 4, 4) % 2))
        self.assertEqual(normalized.dtype, np.float32)
        self.assertEqual(sorted(np.unique(normalized).tolist()), [0.0, 1.0])

    def test_dictionary_version(self):
        data = {"image": self.image, "pred": self.reference}
        out = DifferenceMapd("image", reference_key="pred", sigma=1.0)(data)
        torch.testing.assert_close(out["difference"], DifferenceMap(sigma=1.0)(self.image, self.reference))
        self.assertIs(out["image"], self.image)
        with self.assertRaisesRegex(ValueError, "output_keys"):
            DifferenceMapd(["image", "pred"], reference_key="pred", output_keys="one")

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "mode"):
            DifferenceMap(mode="relative")
        with self.assertRaisesRegex(ValueError, "sigma"):
            DifferenceMap(sigma=-1)
        with self.assertRaisesRegex(ValueError, "reference"):
            DifferenceMap()(self.image, self.reference[:, :16])
        with self.assertRaisesRegex(ValueError, "mask"):
            DifferenceMap()(self.image, self.reference, mask=torch.ones(1, 16, 16))


class TestOtsuThreshold(unittest.TestCase):
    def test_bimodal_and_multi_level(self):
        generator = np.random.default_rng(0)
        values = np.concatenate([generator.normal(0.2, 0.03, 600), generator.normal(0.8, 0.03, 424)])
        heatmap = torch.as_tensor(values.reshape(1, 32, 32), dtype=torch.float32)
        mask, thresholds = OtsuThreshold(return_thresholds=True)(heatmap)
        # any threshold in the gap separates the modes equally well
        self.assertTrue(0.2 < thresholds[0, 0] < 0.8)
        self.assertLessEqual(abs(int(mask.sum()) - 424), 2)  # a 3-sigma tail of the lower mode may cross
        three = np.concatenate([generator.normal(m, 0.02, 300) for m in (0.1, 0.5, 0.9)])
        labels = OtsuThreshold(classes=3, return_labels=True)(three.reshape(1, 30, 30))
        self.assertEqual(sorted(np.unique(labels).tolist()), [0.0, 1.0, 2.0])
        for count in [int((labels == c).sum()) for c in range(3)]:
            self.assertLessEqual(abs(count - 300), 3)  # binning may move a few tail values

    def test_constant_map_gives_an_empty_mask(self):
        self.assertEqual(float(OtsuThreshold()(torch.ones(1, 8, 8)).sum()), 0.0)

    def test_dictionary_version_and_bad_input(self):
        heatmap = torch.zeros(1, 8, 8)
        heatmap[:, :4] = 1
        out = OtsuThresholdd("heatmap")({"heatmap": heatmap})
        torch.testing.assert_close(out["heatmap_otsu"], heatmap)
        with self.assertRaisesRegex(ValueError, "classes"):
            OtsuThreshold(classes=1)


if __name__ == "__main__":
    unittest.main()
