from __future__ import annotations

import json
import shutil
import tempfile
import unittest
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from monai_cfx.handlers import CounterfactualMetricsHandler, CounterfactualSaver, FeatureDistanceHandler


def fake_engine(items_batch, items_output):
    """The state a MONAI evaluator leaves after decollated post-processing."""
    return SimpleNamespace(state=SimpleNamespace(batch=items_batch, output=items_output, metrics={}, device="cpu"))


def item(index: int, spatial_dims: int = 2, size: int = 16):
    shape = (1,) + (size,) * spatial_dims
    generator = torch.Generator().manual_seed(index)
    healthy = torch.rand(shape, generator=generator) * 0.5
    mask = torch.zeros(shape)
    mask[(slice(None),) + (slice(4, 8),) * spatial_dims] = 1
    image = healthy + 0.4 * mask
    affine = torch.diag(torch.tensor([0.5, 0.7, 1.5, 1.0]))
    meta = {"filename_or_obj": f"/data/case_{index}.nii.gz"}
    batch = {"healthy": healthy, "mask": mask, "label": torch.tensor([1.0, 0.0]), "prompt": ""}
    output = {
        "image": MetaTensor(image, affine=affine, meta=meta),
        "pred": MetaTensor(healthy.clone(), affine=affine, meta=meta),  # a perfect counterfactual
        "difference": MetaTensor(0.4 * mask + 0.01 * torch.rand(shape, generator=generator), affine=affine),
    }
    return batch, output


class TestCounterfactualSaver(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run_saver(self, spatial_dims, overwrite=False):
        saver = CounterfactualSaver(self.tmp, default_prompt="Normal chest radiograph.", overwrite=overwrite)
        pairs = [item(i, spatial_dims) for i in range(2)]
        engine = fake_engine([b for b, _ in pairs], [o for _, o in pairs])
        saver._started(engine)
        saver(engine)
        saver._finalize(engine)
        return pairs

    def test_writes_nifti_with_the_affine_and_a_panel(self):
        pairs = self.run_saver(2)
        records = json.loads((self.tmp / "counterfactuals.json").read_text())
        self.assertEqual(
            [r["counterfactual"] for r in records], ["case_0_counterfactual.nii.gz", "case_1_counterfactual.nii.gz"]
        )
        self.assertEqual(records[0]["prompt"], "Normal chest radiograph.")
        saved = nib.load(self.tmp / "case_1_counterfactual.nii.gz")
        np.testing.assert_allclose(saved.affine, pairs[1][1]["image"].affine.numpy())
        np.testing.assert_allclose(np.asarray(saved.dataobj), pairs[1][1]["pred"][0].numpy(), atol=1e-6)
        difference = nib.load(self.tmp / "case_0_difference.nii.gz")
        np.testing.assert_allclose(np.asarray(difference.dataobj), pairs[0][1]["difference"][0].numpy(), atol=1e-6)
        self.assertGreater((self.tmp / "case_0_panel.png").stat().st_size, 1000)

    def test_same_file_names_in_different_folders(self):
        saver = CounterfactualSaver(self.tmp)
        pairs = [item(i) for i in range(3)]
        for (_, output), folder in zip(pairs, ("s01", "s02", "s01")):
            output["image"].meta["filename_or_obj"] = f"/data/{folder}/ct.nii.gz"
        engine = fake_engine([b for b, _ in pairs], [o for _, o in pairs])
        saver._started(engine)
        saver(engine)
        saver._finalize(engine)
        records = json.loads((self.tmp / "counterfactuals.json").read_text())
        names = [r["counterfactual"] for r in records]
        self.assertEqual(
            names, ["ct_counterfactual.nii.gz", "s02_ct_counterfactual.nii.gz", "s01_ct_counterfactual.nii.gz"]
        )
        self.assertEqual(len(set(p.name for p in self.tmp.glob("*_counterfactual.nii.gz"))), 3)

    def test_3d_has_no_panel(self):
        self.run_saver(3)
        self.assertTrue((self.tmp / "case_0_counterfactual.nii.gz").is_file())
        self.assertFalse(list(self.tmp.glob("*.png")))
        self.assertEqual(nib.load(self.tmp / "case_0_difference.nii.gz").shape, (16, 16, 16))

    def test_existing_outputs_are_kept(self):
        self.run_saver(2)
        before = {p.name: p.read_bytes() for p in self.tmp.iterdir()}
        with self.assertRaisesRegex(FileExistsError, "counterfactuals.json"):
            self.run_saver(2)
        self.assertEqual(before, {p.name: p.read_bytes() for p in self.tmp.iterdir()})
        self.run_saver(2, overwrite=True)


class FixedOracle(torch.nn.Module):
    """Sees finding 0 in images whose mean is above 0.3 and never sees finding 1."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def logits_and_embedding(self, images):
        seen = images.flatten(1).mean(1) > 0.3
        logits = torch.stack([torch.where(seen, 5.0, -5.0), torch.full_like(seen, -5.0, dtype=torch.float32)], 1)
        return logits, images.flatten(1)[:, :4]


class TestCounterfactualMetricsHandler(unittest.TestCase):
    def test_perfect_counterfactual(self):
        oracle = FixedOracle()
        handler = CounterfactualMetricsHandler(oracle, spatial_dims=2, ms_ssim_kernel_size=3)
        pairs = [item(i) for i in range(3)]
        engine = fake_engine([b for b, _ in pairs], [o for _, o in pairs])
        handler._started(engine)
        handler(engine)
        handler._completed(engine)
        metrics = engine.state.metrics
        self.assertEqual(metrics["twin_l1"], 0.0)
        self.assertAlmostEqual(metrics["twin_ssim"], 1.0, places=4)
        self.assertEqual(metrics["l1_outside"], 0.0)
        self.assertAlmostEqual(metrics["l1_inside"], 0.4, places=5)
        self.assertEqual(metrics["localization_auroc"], 1.0)
        # the counterfactuals (the twins, mean ~0.25) do not show finding 0; a bright one does, and is invalid
        self.assertEqual(metrics["validity"], 1.0)
        self.assertEqual(metrics["validity_count"], 3)
        pairs[0][1]["pred"] = pairs[0][1]["pred"] + 0.5
        handler._started(engine)
        handler(engine)
        handler._completed(engine)
        self.assertAlmostEqual(engine.state.metrics["validity"], 2 / 3)
        self.assertEqual(len(metrics["per_image"]["ssim"]), 3)

    def test_missing_keys_are_named(self):
        handler = CounterfactualMetricsHandler(FixedOracle(), spatial_dims=2, ms_ssim_kernel_size=3)
        batch, output = item(0)
        batch.pop("mask")
        with self.assertRaisesRegex(ValueError, "mask"):
            handler(fake_engine([batch], [output]))


class TestFeatureDistanceHandler(unittest.TestCase):
    def test_fid_and_kid(self):
        def features(images):
            return images[:, 0, 2:10, 5].flatten(1)  # pixels inside and outside the finding

        pairs = [item(i) for i in range(12)]
        for reference_key, expect_zero in (("pred", True), ("image", False)):
            handler = FeatureDistanceHandler(
                features, generated_key="pred", reference_key=reference_key, kid_subset_size=6
            )
            engine = fake_engine([b for b, _ in pairs], [o for _, o in pairs])
            handler._started(engine)
            handler(engine)
            handler._completed(engine)
            if expect_zero:
                self.assertAlmostEqual(engine.state.metrics["fid"], 0.0, places=4)
            else:
                self.assertGreater(engine.state.metrics["fid"], 0.01)
                self.assertGreater(engine.state.metrics["kid"], 0.0)
        with self.assertRaisesRegex(ValueError, "metrics"):
            FeatureDistanceHandler(features, metrics=("fid", "is"))


if __name__ == "__main__":
    unittest.main()
