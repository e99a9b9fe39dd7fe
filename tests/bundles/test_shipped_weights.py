"""The weights shipped in bundles/latent_diffusion/models load, make images the oracle agrees with where
the generator is reported to work (docs/README.md), and the oracles separate unseen phantoms."""

from __future__ import annotations

import unittest

import numpy as np
import torch
from monai.metrics.rocauc import compute_roc_auc
from parameterized import parameterized

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.data import PhantomDataset
from monai_cfx.metrics import oracle_predict

SEEDS = (100, 101, 102, 103)
# the 2D findings whose prompt fidelity docs/README.md reports at or near the 0.8 goal; the misses
# (nodule, normal; every 3D prompt) are reported there, not hidden here
RECOGNISED_PROMPTS = {
    "opacity": "Chest radiograph with a right lower zone opacity.",
    "effusion": "Chest radiograph with a large left pleural effusion.",
}
MIN_RECOGNISED = 0.75
# docs/README.md reports 0.97 macro in 2D (nodule 0.90) and 0.91-0.95 in 3D over held-out sets
MIN_AUROC = {"2d": 0.85, "3d": 0.8}


def bundle_parser(dims: str):
    configs = ["configs/inference.json", "configs/evaluate.json"] + (["configs/3d.json"] if dims == "3d" else [])
    return load_bundle_config(default_bundle_dir(), configs, device=torch.device("cpu"))


class TestShippedWeights(unittest.TestCase):
    def test_2d_findings_are_drawn_where_prompted(self):
        parser = bundle_parser("2d")
        label_names = list(parser.get_parsed_content("label_names"))
        generate, oracle = parser.get_parsed_content("generate"), parser.get_parsed_content("load_oracle")
        for finding, prompt in RECOGNISED_PROMPTS.items():
            images = generate([prompt] * len(SEEDS), list(SEEDS))
            self.assertEqual(tuple(images.shape), (len(SEEDS), 1, 64, 64))
            probabilities, _ = oracle_predict(oracle, images)
            recognised = float((probabilities[:, label_names.index(finding)] > 0.5).float().mean())
            self.assertGreaterEqual(recognised, MIN_RECOGNISED, msg=(prompt, probabilities.tolist()))

    def test_3d_volumes_look_like_brains(self):
        parser = bundle_parser("3d")
        volumes = parser.get_parsed_content("generate")(["Normal brain MRI."] * 2, [100, 101])
        self.assertEqual(tuple(volumes.shape), (2, 1, 32, 32, 32))
        self.assertTrue(torch.isfinite(volumes).all())
        # the generated anatomy matches the phantoms' mean anatomy (noise or a blank volume would not)
        real = torch.stack([torch.as_tensor(s["image"]) for s in PhantomDataset("brain", 16, seed=600_000, size=32)])
        correlation = np.corrcoef(volumes.mean(0).flatten().numpy(), real.mean(0).flatten().numpy())[0, 1]
        self.assertGreater(correlation, 0.8)

    @parameterized.expand([["2d"], ["3d"]])
    def test_oracle_auroc_on_unseen_phantoms(self, dims):
        parser = bundle_parser(dims)
        kind, size = parser.get_parsed_content("kind"), parser.get_parsed_content("image_size")
        # seeds far beyond the training range (0..1999)
        data = PhantomDataset(kind, 200, seed=500_000, size=size)
        images = torch.stack([torch.as_tensor(item["image"]) for item in data])
        labels = torch.stack([item["label"] for item in data]).float()
        probabilities, _ = oracle_predict(parser.get_parsed_content("load_oracle"), images)
        aurocs = np.atleast_1d(compute_roc_auc(probabilities, labels, average="none"))
        names = parser.get_parsed_content("label_names")
        self.assertTrue((aurocs >= MIN_AUROC[dims]).all(), msg=dict(zip(names, aurocs)))


if __name__ == "__main__":
    unittest.main()
