"""The weights shipped in bundles/latent_diffusion/models load, make images the oracle agrees with where
the generator is reported to work (docs/README.md), and the oracles separate unseen phantoms; the Mediffusion
bundle's joint network classifies unseen phantoms as its docs report and its explanations remove what it sees."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics.rocauc import compute_roc_auc
from parameterized import parameterized

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.data import PhantomDataset, generate_phantom
from monai_cfx.metrics import compute_finding_contrast_kept, oracle_predict

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

    def test_3d_lesion_autoencoder_keeps_the_lesions(self):
        # docs/README.md: the lesion recipe's autoencoder keeps 0.71 of the lesion contrast on 64 unseen phantoms
        # (scripts/lesion_contrast.py, seeds from 700,000), the shipped 3-channel one 0.07; here 16 others
        kept = contrast_kept("brain", "lesion", 32, ["configs/3d.json"], "configs/3d_lesion.json")
        self.assertGreaterEqual(kept["lesion"], 0.55, msg=kept)
        self.assertLess(kept["plain"], 0.2, msg=kept)

    def test_2d_lesion_autoencoder_keeps_the_nodules(self):
        # docs/README.md: the 2D lesion recipe's autoencoder keeps 1.02 of a nodule's contrast on 64 unseen phantoms
        # (scripts/lesion_contrast.py --dims 2d_lesion), the shipped 3-channel one 0.59; here 16 others
        kept = contrast_kept("chest", "nodule", 64, [], "configs/2d_lesion.json")
        self.assertGreaterEqual(kept["lesion"], 0.85, msg=kept)
        self.assertLess(kept["plain"], 0.75, msg=kept)


def contrast_kept(kind: str, finding: str, size: int, configs: list[str], lesion_config: str) -> dict[str, float]:
    """The mean finding contrast kept by the plain and the lesion recipe's autoencoder on 16 unseen one-finding
    phantoms (seeds from 720,000)."""
    subjects = [generate_phantom(kind, 720_000 + index, size, findings=[finding]) for index in range(16)]
    subjects = [subject for subject in subjects if subject["mask"].any()]
    images, healthy, masks = (
        torch.from_numpy(np.stack([subject[key] for subject in subjects])).float()
        for key in ("image", "healthy", "mask")
    )
    kept = {}
    for recipe, extra in (("plain", []), ("lesion", [lesion_config])):
        autoencoder = load_bundle_config(
            default_bundle_dir(), ["configs/inference.json", *configs, *extra], device="cpu"
        ).get_parsed_content("load_autoencoder")
        kept[recipe] = float(compute_finding_contrast_kept(autoencoder.eval(), images, healthy, masks).mean())
    return kept


# bundles/mediffusion/docs/README.md reports the shipped joint head's testing AUROC per finding; these floors sit
# below those figures on other unseen phantoms, and the findings it misses (nodule) are reported there, not here
# (on these seeds: opacity 0.87, effusion 0.99, cardiomegaly 1.00; the head misses nodules, 0.47)
JOINT_FLOORS = {"opacity": 0.75, "effusion": 0.9, "cardiomegaly": 0.95}


class TestShippedJointNetwork(unittest.TestCase):
    def test_head_on_unseen_phantoms_and_its_explanations(self):
        from monai_cfx.apps.mediffusion import explain_predictions, head_probabilities

        parser = load_bundle_config(default_bundle_dir("mediffusion"), ["configs/inference.json"], device="cpu")
        get = parser.get_parsed_content
        network, autoencoder, text_encoder = get("network"), get("autoencoder"), get("text_encoder")
        names = list(get("label_names"))
        data = PhantomDataset("chest", 200, seed=500_000, size=64)  # seeds far beyond the training range
        images = torch.stack([torch.as_tensor(item["image"]) for item in data]).float()
        labels = torch.stack([item["label"] for item in data]).float()
        empty = text_encoder.null_context(1)
        probabilities = head_probabilities(network, autoencoder, images, get("scale_factor"), empty)
        aurocs = dict(zip(names, np.atleast_1d(compute_roc_auc(probabilities, labels, average="none"))))
        for name, floor in JOINT_FLOORS.items():
            self.assertGreaterEqual(aurocs[name], floor, msg=aurocs)
        # explain the enlarged hearts the head sees: its own guidance removes them, and the oracle agrees
        finding = names.index("cardiomegaly")
        seen = torch.nonzero((labels[:, finding] > 0) & (probabilities[:, finding] > 0.5))[:4, 0]
        self.assertEqual(len(seen), 4)
        inputs = {"images": images[seen], "affines": [np.eye(4)] * 4, "names": [f"case_{i}" for i in range(4)]}
        with tempfile.TemporaryDirectory() as out:
            manifest = explain_predictions(
                get("counterfactual_inferer"), network, autoencoder, text_encoder, inputs, Path(out, "explain"),
                scale_factor=get("scale_factor"), label_names=names, guidance_scale=get("guidance_scale"),
            )  # fmt: skip
            files = [Path(out, "explain", record["files"]["counterfactual"]) for record in manifest["items"]]
            edited = torch.stack([torch.as_tensor(np.asarray(nib.load(f).dataobj, np.float32)) for f in files])
        edited = edited.reshape(4, 1, 64, 64)
        after = [record["probabilities_after"]["cardiomegaly"] for record in manifest["items"]]
        oracle = load_bundle_config(default_bundle_dir(), ["configs/inference.json"], device="cpu")
        oracle_after, _ = oracle_predict(oracle.get_parsed_content("load_oracle"), edited)
        self.assertGreaterEqual(sum(p < 0.5 for p in after), 3, msg=after)  # the head no longer sees it
        self.assertGreaterEqual(int((oracle_after[:, finding] < 0.5).sum()), 3, msg=oracle_after)

    def test_targeted_removal_keeps_the_other_findings(self):
        # remove one finding of unseen phantoms with two or more: a healthy prompt removes the others as well, a
        # negative prompt that names the chosen finding keeps them (docs/README.md, "With the denoiser's own text
        # guidance")
        from monai_cfx.apps.mediffusion import evaluate_targeted_removal

        data = PhantomDataset("chest", 120, seed=500_000, size=64)
        several = [item for item in data if item["label"].sum() >= 2][:12]
        inputs = {
            "image": torch.stack([torch.as_tensor(item["image"]) for item in several]).float(),
            "label": torch.stack([item["label"] for item in several]).float(),
        }
        oracle = load_bundle_config(default_bundle_dir(), ["configs/inference.json"], device="cpu")
        oracle = oracle.get_parsed_content("load_oracle")
        phrases = {"opacity": "an opacity", "effusion": "a pleural effusion", "cardiomegaly": "cardiomegaly",
                   "nodule": "a nodule"}  # fmt: skip
        measured = {}
        for name, prompt, negative in (("healthy", "Normal chest radiograph.", None), ("negative", "", phrases)):
            parser = load_bundle_config(
                default_bundle_dir("mediffusion"), ["configs/inference.json"], device="cpu", prompt_guidance_scale=3.0
            )
            get = parser.get_parsed_content
            measured[name] = evaluate_targeted_removal(
                get("counterfactual_inferer"), get("network"), get("autoencoder"), get("text_encoder"), oracle,
                inputs, scale_factor=get("scale_factor"), label_names=list(get("label_names")),
                guidance_scale=get("guidance_scale"), prompt=prompt, finding_phrases=negative,
                negative_prompt_template=get("negative_prompt_template"),
            )  # fmt: skip
        self.assertEqual(measured["healthy"]["num_images"], 12)
        self.assertEqual(measured["healthy"]["chosen"], measured["negative"]["chosen"])  # the same draw
        self.assertGreaterEqual(measured["healthy"]["removed"], 0.9, msg=measured)
        self.assertLessEqual(measured["healthy"]["others_kept"], 0.25, msg=measured)
        # on these 12 the negative prompt removes 0.58 and keeps 0.50 (docs: 0.83 / 0.83 on validation, 0.78 / 0.67
        # on testing); the claim pinned here is the difference from the healthy prompt
        self.assertGreaterEqual(measured["negative"]["removed"], 0.4, msg=measured)
        self.assertGreaterEqual(measured["negative"]["others_kept"] - measured["healthy"]["others_kept"], 0.35)


if __name__ == "__main__":
    unittest.main()
