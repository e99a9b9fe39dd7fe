"""Scans to the model's input and outputs back onto the scan's grid: the transforms and the bundles' own chain."""

import unittest

import numpy as np
import torch
from monai.data import MetaTensor, decollate_batch
from monai.transforms import Invertd

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.data import UnwrapOwnGridd, collate_scans
from monai_cfx.transforms import CheckScand, ScaleIntensityToModeld, ScanToModelDimsd, fit_to_size


def scan(array, name="/data/scan.nii.gz", affine=None):
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32), affine=affine, meta={"filename_or_obj": name})


class TestScanToModelDims(unittest.TestCase):
    def test_2d_dicom_slice_and_rgb(self):
        slice_ = scan(np.random.rand(1, 40, 30, 1))
        self.assertEqual(tuple(ScanToModelDimsd("image", 2)({"image": slice_})["image"].shape), (1, 40, 30))
        rgb = scan(np.stack([np.full((8, 8), 1.0), np.zeros((8, 8)), np.zeros((8, 8))]))
        grey = ScanToModelDimsd("image", 2)({"image": rgb})["image"]
        self.assertEqual(tuple(grey.shape), (1, 8, 8))
        self.assertTrue(torch.allclose(grey, torch.full((1, 8, 8), 0.299)))
        self.assertEqual(grey.meta["filename_or_obj"], "/data/scan.nii.gz")

    def test_refusals_name_the_file(self):
        for array, dims, expected in (
            (np.zeros((1, 8, 8, 8)), 2, "spatial dimensions"),
            (np.zeros((1, 8, 8)), 3, "spatial dimensions"),
            (np.zeros((1, 8, 8, 8, 2)), 3, "4D series"),
            (np.zeros((2, 8, 8)), 2, "2 channels"),
        ):
            with self.subTest(shape=array.shape, dims=dims):
                with self.assertRaisesRegex(ValueError, rf"'/data/scan.nii.gz'.*{expected}"):
                    ScanToModelDimsd("image", dims)({"image": scan(array)})


class TestCheckScan(unittest.TestCase):
    def test_refusals(self):
        nan = np.random.rand(1, 64, 64)
        nan[0, 3, 4] = np.nan
        anisotropic = scan(np.random.rand(1, 64, 64), affine=torch.diag(torch.tensor([1.0, 5.0, 1.0, 1.0])))
        for image, expected in (
            (scan(nan), "1 non-finite"),
            (scan(np.full((1, 64, 64), 0.3)), "constant"),
            (scan(np.random.rand(1, 40, 32)), "at least 64"),
            (anisotropic, "isotropic"),
        ):
            with self.subTest(expected=expected):
                with self.assertRaisesRegex(ValueError, rf"'/data/scan.nii.gz'.*{expected}"):
                    CheckScand("image", min_size=64)({"image": image})
        CheckScand("image", min_size=64)({"image": scan(np.random.rand(1, 64, 50))})  # a usable scan passes


class TestScaleIntensityToModel(unittest.TestCase):
    def test_percentile_rule_ignores_the_scale_of_the_scan(self):
        image = np.random.default_rng(0).random((1, 32, 32))
        rule = ScaleIntensityToModeld("image", target=(0.0, 0.8), companion_keys="healthy")
        reference = rule({"image": scan(image), "healthy": scan(image * 0.5)})
        for factor, offset in ((65535, 0), (4095, -1024), (255, 0)):
            with self.subTest(factor=factor):
                scaled = rule({"image": scan(image * factor + offset), "healthy": scan(image * 0.5 * factor + offset)})
                self.assertTrue(torch.allclose(scaled["image"], reference["image"], atol=1e-5))
                self.assertTrue(torch.allclose(scaled["healthy"], reference["healthy"], atol=1e-5))
        lo, hi, target_lo, target_hi = reference["image_intensity"].tolist()
        self.assertEqual((target_lo, target_hi), (0.0, 0.8))
        self.assertAlmostEqual(float(np.percentile(image, 99.5)), hi, places=5)

    def test_window_and_refusals(self):
        ct = scan(np.array([[[-1000.0, 0.0, 400.0, 3000.0]]]))
        windowed = ScaleIntensityToModeld("image", mode="window", window=(-1000, 400))({"image": ct})["image"]
        self.assertTrue(torch.allclose(windowed, torch.tensor([[[0.0, 1000 / 1400, 1.0, 1.0]]])))
        mostly_flat = np.zeros((1, 100, 100))
        mostly_flat[0, 0, 0] = 1.0
        with self.assertRaisesRegex(ValueError, "'/data/scan.nii.gz'.*percentiles are equal"):
            ScaleIntensityToModeld("image")({"image": scan(mostly_flat)})
        with self.assertRaisesRegex(ValueError, "window"):
            ScaleIntensityToModeld("image", mode="window")


class TestFitAndCollate(unittest.TestCase):
    def test_fit_to_size_pads_the_short_side(self):
        images = torch.ones(2, 1, 128, 64)
        fitted = fit_to_size(images, 64)
        self.assertEqual(tuple(fitted.shape), (2, 1, 64, 64))
        self.assertEqual(float(fitted[0, 0, :, :16].abs().sum()), 0.0)  # 16 columns of padding either side
        self.assertEqual(float(fitted[0, 0, :, 16:48].min()), 1.0)
        self.assertIs(fit_to_size(fitted, 64), fitted)

    def test_collate_keeps_scans_of_different_sizes_as_lists(self):
        batch = [{"image": torch.zeros(1, 8, 8), "scan": torch.zeros(1, s, s), "prompt": "p"} for s in (10, 12)]
        collated = collate_scans(batch)
        self.assertEqual(tuple(collated["image"].shape), (2, 1, 8, 8))
        # decollated, each item gets its own scan back whole
        items = [UnwrapOwnGridd()(item) for item in decollate_batch(collated)]
        self.assertEqual([tuple(item["scan"].shape) for item in items], [(1, 10, 10), (1, 12, 12)])
        self.assertEqual(collated["prompt"], ["p", "p"])
        # scans from different readers carry different meta data keys: the model inputs still batch
        png = MetaTensor(torch.zeros(1, 8, 8), meta={"filename_or_obj": "a.png", "spatial_shape": [8, 8]})
        dicom = MetaTensor(torch.zeros(1, 8, 8), meta={"filename_or_obj": "b.dcm", "spatial_shape": [8, 8, 1], "x": 1})
        mixed = collate_scans([{"image": png}, {"image": dicom}])["image"]
        self.assertEqual(tuple(mixed.shape), (2, 1, 8, 8))
        self.assertEqual(list(mixed.meta["filename_or_obj"]), ["a.png", "b.dcm"])


class TestBundleChainRoundTrip(unittest.TestCase):
    """The counterfactual bundle's own preprocessing and Invertd: a non-square scan of any size reaches the model's
    64x64 input and an output comes back with the scan's shape and affine."""

    @classmethod
    def setUpClass(cls):
        parser = load_bundle_config(default_bundle_dir("counterfactual"), device="cpu")
        cls.preprocessing = parser.get_parsed_content("preprocessing")

    def test_outputs_return_to_the_scan_grid(self):
        import tempfile
        from pathlib import Path

        import nibabel as nib

        affine = np.diag([0.2, 0.3, 1.0, 1.0])
        affine[:3, 3] = [10.0, -5.0, 2.0]
        with tempfile.TemporaryDirectory() as folder:
            for shape in ((300, 200), (64, 64), (90, 120)):
                with self.subTest(shape=shape):
                    path = Path(folder) / f"scan_{shape[0]}.nii.gz"
                    values = np.random.default_rng(1).random(shape).astype(np.float32) * 4000
                    nib.save(nib.Nifti1Image(values, affine), path)
                    item = self.preprocessing({"image": str(path), "label": [0.0] * 5})
                    self.assertEqual(tuple(item["image"].shape), (1, 64, 64))
                    self.assertEqual(tuple(item["scan"].shape), (1, *shape))
                    item["pred"] = item["image"] * 0.5
                    back = Invertd("pred", self.preprocessing, orig_keys="image", nearest_interp=False)(item)["pred"]
                    self.assertEqual(tuple(back.shape), (1, *shape))
                    self.assertTrue(np.allclose(np.asarray(back.affine), affine, atol=1e-5))
                    if shape == (64, 64):  # a scan at the model's size is only rescaled
                        self.assertTrue(torch.allclose(back, item["scan"] * 0.5, atol=1e-5))


if __name__ == "__main__":
    unittest.main()
