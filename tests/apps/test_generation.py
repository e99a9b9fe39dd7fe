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
                figure_path=Path(tmp) / "off_manifold.png",
            )
            self.assertEqual(json.loads((Path(tmp) / "m.json").read_text()), metrics)
            self.assertEqual((Path(tmp) / "off_manifold.png").read_bytes()[1:4], b"PNG")
        self.assertEqual(
            metrics["prompt_fidelity"],
            {"opacity": 1.0, "effusion": 0.0, "cardiomegaly": 0.0, "nodule": 0.0, "normal": 0.0},
        )
        self.assertGreaterEqual(metrics["fid_oracle_features"], 0.0)
        self.assertLess(metrics["fid_oracle_features"], 0.05)  # same distribution as the references
        self.assertLessEqual(metrics["off_manifold_fraction"], 0.25)
        self.assertEqual(len(metrics["off_manifold_samples"]), round(8 * metrics["off_manifold_fraction"]))
        self.assertIn("off_manifold_fraction_real", metrics)
        with self.assertRaisesRegex(ValueError, "reference_prompts"):
            evaluate_generator(always_opacity, ChannelOracle(), references, ["x"], "chest", LABELS)


class NoduleDrawingAutoencoder(torch.nn.Module):
    """Keeps the image but draws a nodule into every reconstruction (a decoder artifact the oracle reads)."""

    def encode(self, images):
        return images, torch.zeros_like(images)

    def sampling(self, z_mu, z_sigma):
        return z_mu

    def decode_stage_2_outputs(self, latents):
        drawn = latents.clone()
        drawn[..., 12:16] = drawn[..., 12:16] + 0.8
        return drawn


class TestFidelityRulesAndCeilings(unittest.TestCase):
    def test_exact_rule_and_the_ceilings_of_real_images_and_of_their_reconstructions(self):
        # a generator that adds a nodule to what it is asked for: loosely faithful, never exactly
        def with_nodule(prompts, seeds):
            wanted = [[n for n in LABELS if n in p.lower()] for p in prompts]
            return torch.stack([image_with(sorted({*w, "nodule"}), s) for w, s in zip(wanted, seeds)])

        combos = [[], [], ["opacity"], ["opacity"], ["effusion", "nodule"], ["nodule"]]
        references = torch.stack([image_with(c, 300 + i) for i, c in enumerate(combos)])
        labels = torch.tensor([[float(n in c) for n in LABELS] for c in combos])
        prompts = [f"Chest radiograph with {' and '.join(c) or 'nothing'}." for c in combos]
        metrics = evaluate_generator(
            with_nodule, ChannelOracle(), references, prompts, "chest", LABELS, samples_per_prompt_class=2,
            reference_labels=labels, autoencoder=NoduleDrawingAutoencoder(), batch_size=4,
        )  # fmt: skip
        self.assertEqual(metrics["prompt_fidelity"]["opacity"], 1.0)
        self.assertEqual(metrics["prompt_fidelity_exact"]["opacity"], 0.0)
        self.assertEqual(metrics["prompt_fidelity_exact"]["nodule"], 1.0)
        self.assertEqual(metrics["prompt_fidelity"]["normal"], 0.0)
        ceilings = metrics["fidelity_ceilings"]
        # classes with held-out images of that finding alone; the two-finding image belongs to none
        self.assertEqual(ceilings["num_images"], {"normal": 2, "opacity": 2, "nodule": 1})
        self.assertEqual(
            ceilings["held_out_images"]["prompt_fidelity_exact"], {"normal": 1.0, "opacity": 1.0, "nodule": 1.0}
        )
        reconstructed = ceilings["autoencoder_reconstructions"]
        self.assertEqual(reconstructed["prompt_fidelity"], {"normal": 0.0, "opacity": 1.0, "nodule": 1.0})
        self.assertEqual(reconstructed["prompt_fidelity_exact"], {"normal": 0.0, "opacity": 0.0, "nodule": 1.0})

    def test_refusals(self):
        references = torch.stack([image_with([], i) for i in range(3)])
        with self.assertRaisesRegex(ValueError, "reference_labels"):
            evaluate_generator(lambda p, s: references[: len(p)], ChannelOracle(), references, ["a"] * 3, "chest",
                               LABELS, reference_labels=torch.zeros(3, 2))  # fmt: skip
        with self.assertRaisesRegex(ValueError, "autoencoder"):
            evaluate_generator(lambda p, s: references[: len(p)], ChannelOracle(), references, ["a"] * 3, "chest",
                               LABELS, autoencoder=NoduleDrawingAutoencoder())  # fmt: skip

        def never(prompts, seeds):
            raise AssertionError("sampled although an output is refused")

        with tempfile.TemporaryDirectory() as tmp:  # an existing figure: refused before sampling, nothing written
            (Path(tmp) / "off_manifold.png").write_bytes(b"mine")
            with self.assertRaisesRegex((FileExistsError, ValueError), "off_manifold.png"):
                figure, output = Path(tmp) / "off_manifold.png", Path(tmp) / "m.json"
                evaluate_generator(never, ChannelOracle(), references, ["a"] * 3, "chest", LABELS,
                                   output_path=output, figure_path=figure)  # fmt: skip
            self.assertEqual(sorted(p.name for p in Path(tmp).iterdir()), ["off_manifold.png"])
            self.assertEqual((Path(tmp) / "off_manifold.png").read_bytes(), b"mine")


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
