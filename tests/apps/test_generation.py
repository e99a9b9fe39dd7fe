from __future__ import annotations

import json
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from monai_cfx.apps.generation import (
    evaluate_generator,
    evaluate_oracle,
    finding_prompts,
    save_generated,
    stack_items,
)
from monai_cfx.data import CHEST_FINDINGS, phantom_affine
from monai_cfx.metrics import oracle_predict

LABELS = list(CHEST_FINDINGS)


class ChannelOracle(torch.nn.Module):
    """Logit k is the (centred) mean of the image's k-th quarter of rows: images encode their findings."""

    def forward(self, images):
        rows = images.shape[-1] // len(LABELS)
        return (
            torch.stack([images[..., k * rows : (k + 1) * rows].mean((1, 2, 3)) for k in range(len(LABELS))], 1) - 0.5
        )

    def embed(self, images):
        return torch.stack([images.mean((1, 2, 3)), images.std((1, 2, 3))], 1)

    def logits_and_embedding(self, images):
        return self(images), self.embed(images)


def image_with(findings, seed=0):
    image = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.2
    for name in findings:
        k = LABELS.index(name)
        image[:, :, 4 * k : 4 * (k + 1)] += 0.8
    return image


class TestFindingPrompts(unittest.TestCase):
    def test_single_finding_reports(self):
        prompts = finding_prompts("chest", LABELS, 3)
        self.assertEqual(list(prompts), [*LABELS, "normal"])
        self.assertTrue(all(len(p) == 3 for p in prompts.values()))
        self.assertIn("effusion", prompts["effusion"][0])
        self.assertTrue(all(p.startswith("Normal") for p in prompts["normal"]))


class TestOracleEvaluation(unittest.TestCase):
    def test_auroc_of_a_perfect_and_a_blind_oracle(self):
        combos = [[], ["opacity"], ["effusion", "nodule"], ["cardiomegaly"], ["opacity", "nodule"], ["effusion"]]
        images = torch.stack([image_with(c, i) for i, c in enumerate(combos)])
        labels = torch.tensor([[float(n in c) for n in LABELS] for c in combos])
        metrics = evaluate_oracle(ChannelOracle(), images, labels, LABELS)
        self.assertEqual(metrics["auroc"], dict.fromkeys(LABELS, 1.0))
        blind = evaluate_oracle(ChannelOracle(), torch.full_like(images, 0.3), labels, LABELS)
        self.assertEqual(blind["auroc_macro"], 0.5)
        probabilities, embeddings = oracle_predict(ChannelOracle(), images, batch_size=4)
        self.assertEqual(tuple(probabilities.shape), (6, 4))
        self.assertEqual(tuple(embeddings.shape), (6, 2))


class TestGeneratorEvaluation(unittest.TestCase):
    def test_fidelity_counts_what_the_oracle_sees(self):
        # a generator that always draws an opacity: fidelity 1 for opacity, 0 for the rest and for normal
        def always_opacity(prompts, seeds):
            return torch.stack([image_with(["opacity"], s) for s in seeds])

        references = torch.stack([image_with(["opacity"], 100 + i) for i in range(8)])
        with tempfile.TemporaryDirectory() as tmp:
            metrics = evaluate_generator(
                always_opacity,
                ChannelOracle(),
                references,
                ["Chest radiograph with an opacity."] * 8,
                "chest",
                LABELS,
                samples_per_prompt_class=4,
                second_reference_images=torch.stack([image_with(["opacity"], 200 + i) for i in range(8)]),
                output_path=Path(tmp) / "m.json",
            )
            self.assertEqual(json.loads((Path(tmp) / "m.json").read_text()), metrics)
        self.assertEqual(
            metrics["prompt_fidelity"],
            {"opacity": 1.0, "effusion": 0.0, "cardiomegaly": 0.0, "nodule": 0.0, "normal": 0.0},
        )
        self.assertGreaterEqual(metrics["fid_oracle_features"], 0.0)
        self.assertLess(metrics["fid_oracle_features"], 0.05)  # same distribution as the references
        with self.assertRaisesRegex(ValueError, "reference_prompts"):
            evaluate_generator(always_opacity, ChannelOracle(), references, ["x"], "chest", LABELS)


class TestSaveGenerated(unittest.TestCase):
    def test_writes_nifti_png_and_prompts_with_affine(self):
        affine = phantom_affine("chest", 32)
        images = torch.rand(2, 1, 32, 32)
        with tempfile.TemporaryDirectory() as tmp:
            records = save_generated(images, ["a", "b"], [3, 4], tmp, affine=affine)
            self.assertEqual([r["seed"] for r in records], [3, 4])
            nifti = nib.load(Path(tmp) / "sample_001.nii.gz")
            np.testing.assert_allclose(nifti.affine, affine)
            np.testing.assert_allclose(np.asarray(nifti.dataobj).squeeze(), images[1, 0].numpy(), atol=1e-6)
            self.assertTrue((Path(tmp) / "sample_000.png").is_file())
            self.assertEqual(json.loads((Path(tmp) / "prompts.json").read_text()), records)

    def test_existing_file_stops_before_any_write(self):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "sample_001.png").write_bytes(b"user file")
            with self.assertRaisesRegex(FileExistsError, "sample_001.png"):
                save_generated(torch.rand(2, 1, 8, 8), ["a", "b"], [0, 1], tmp)
            self.assertEqual(sorted(p.name for p in Path(tmp).iterdir()), ["sample_001.png"])
            self.assertEqual((Path(tmp) / "sample_001.png").read_bytes(), b"user file")
            save_generated(torch.rand(2, 1, 8, 8), ["a", "b"], [0, 1], tmp, overwrite=True)
            self.assertEqual(len(list(Path(tmp).iterdir())), 5)

    def test_count_mismatch(self):
        with self.assertRaisesRegex(ValueError, "2 images, 1 prompts"):
            save_generated(torch.rand(2, 1, 8, 8), ["a"], [0, 1], "unused")

    def test_stack_items(self):
        stacked = stack_items([{"image": np.zeros((1, 2, 2))}, {"image": np.ones((1, 2, 2))}], "image")
        self.assertEqual(tuple(stacked.shape), (2, 1, 2, 2))


if __name__ == "__main__":
    unittest.main()
