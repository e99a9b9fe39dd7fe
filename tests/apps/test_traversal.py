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
"""The trajectory traversal bundle's jobs on tiny networks: batching, the prompt checks, all-or-nothing writing."""

from __future__ import annotations

import json
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler

from monai_cfx.apps.bundle_io import to_scan_grid
from monai_cfx.apps.traversal import (
    evaluate_traversal,
    merge_rank_traversals,
    save_traversal,
    traversal_inputs,
    traverse,
)
from monai_cfx.inferers import TrajectoryTraversalInferer
from monai_cfx.transforms import scan_preprocessing
from monai_cfx.utils import write_nifti
from tests.helpers import CONTEXT_DIM, ProjectionOracle, tiny_networks


class PromptEncoder:
    """A prompt's context ``(1, 3, CONTEXT_DIM)`` drawn from a generator seeded by its length; the empty prompt's
    is zeros (what the traversal jobs need of a ``TextEncoder``)."""

    def __call__(self, prompts):
        return torch.stack(
            [torch.randn(3, CONTEXT_DIM, generator=torch.Generator().manual_seed(len(p))) for p in prompts]
        )

    def null_context(self, batch_size):
        return torch.zeros(batch_size, 3, CONTEXT_DIM)


def inferer(start: str = "noise") -> TrajectoryTraversalInferer:
    return TrajectoryTraversalInferer(DDIMScheduler(num_train_timesteps=100, clip_sample=False), 0.7,
                                      num_inference_steps=6, swap_steps=[2, 4], num_frames=4, start=start)  # fmt: skip


class TestTraverse(unittest.TestCase):
    def setUp(self):
        self.autoencoder, self.unet = tiny_networks(2)
        self.text_encoder = PromptEncoder()

    def test_batches_do_not_change_the_result(self):
        run = {"seeds": [3, 4, 5], "latent_shape": (2, 8, 8)}
        args = (self.unet, self.autoencoder, self.text_encoder, "normal", "effusion")
        whole = traverse(inferer(), *args, batch_size=3, **run)
        split = traverse(inferer(), *args, batch_size=2, **run)
        for key in ("neutral_latent", "swap_latents", "frame_latents", "frames", "swap_images"):
            torch.testing.assert_close(whole[key], split[key], atol=1e-5, rtol=1e-5, msg=key)
        self.assertEqual(tuple(whole["frames"].shape), (4, 3, 1, 16, 16))
        self.assertEqual(whole["swap_steps"], [4, 2])

    def test_prompts_and_inputs_are_checked(self):
        args = (self.unet, self.autoencoder, self.text_encoder)
        with self.assertWarnsRegex(UserWarning, "equals `neutral_prompt`"):
            traverse(inferer(), *args, "normal", "normal", seeds=[0], latent_shape=(2, 8, 8))
        with self.assertRaisesRegex(ValueError, "`target_prompt`"):
            traverse(inferer(), *args, "normal", "  ", seeds=[0], latent_shape=(2, 8, 8))
        with self.assertRaisesRegex(ValueError, "either `seeds`"):
            traverse(inferer(), *args, "normal", "effusion", seeds=[0], images=torch.rand(1, 1, 16, 16))
        with self.assertRaisesRegex(ValueError, "start='image'"):
            traverse(inferer(), *args, "normal", "effusion", images=torch.rand(1, 1, 16, 16))
        with self.assertRaisesRegex(ValueError, "latent_shape"):
            traverse(inferer(), *args, "normal", "effusion", seeds=[0])

    def test_inputs_are_refused_before_any_model(self):
        chain = scan_preprocessing(64, 2, {"mode": "percentile", "percentiles": [0.5, 99.5], "target": [0.0, 0.8]})
        with self.assertRaisesRegex(ValueError, r"`seeds` must not repeat a seed.*\[0\]"):
            traversal_inputs([0, 1, 0], None, ".", "testing", chain)
        with tempfile.TemporaryDirectory() as root:
            scan = np.random.default_rng(0).uniform(0, 4095, (1, 96, 128)).astype(np.float32)
            affine = np.diag([-0.5, -0.7, 1.0, 1.0])
            write_nifti(np.full((1, 64, 64), 4095.0, np.float32), np.eye(4), Path(root, "flat.nii.gz"))
            write_nifti(scan, affine, Path(root, "ct.nii.gz"))
            for name, items in (("bad", ["flat.nii.gz"]), ("good", ["ct.nii.gz"])):
                Path(root, f"{name}.json").write_text(json.dumps({"testing": [{"image": item} for item in items]}))
            with self.assertRaisesRegex(ValueError, r"flat\.nii\.gz"):
                traversal_inputs(None, Path(root, "bad.json"), root, "testing", chain)
            scans = traversal_inputs(None, Path(root, "good.json"), root, "testing", chain)["scans"]
            self.assertEqual(tuple(scans["images"].shape), (1, 1, 64, 64))  # any size is brought to the model's
            self.assertEqual(scans["names"], ["ct"])
            np.testing.assert_allclose(scans["affines"][0], affine)
            # two model-grid frames map back onto the scan's own grid together
            back = to_scan_grid(scans["images"][0].repeat(2, 1, 1), scans["prepared"][0], chain)
            self.assertEqual(tuple(back.shape), (2, 96, 128))
            np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-6)

    def test_save_is_all_or_nothing(self):
        run = traverse(inferer(), self.unet, self.autoencoder, self.text_encoder, "normal", "effusion", seeds=[1, 2],
                       latent_shape=(2, 8, 8))  # fmt: skip
        with tempfile.TemporaryDirectory() as root:
            out = Path(root, "run")
            with self.assertRaisesRegex(ValueError, "one name and one affine"):
                save_traversal(run, out, ["a"], [np.eye(4)], {})
            self.assertEqual(list(Path(root).iterdir()), [])  # nothing written, no temporary folder left
            manifest = save_traversal(run, out, ["a", "b"], [np.eye(4)] * 2, {"neutral_prompt": "normal"})
            self.assertEqual([t["name"] for t in manifest["trajectories"]], ["a", "b"])
            self.assertNotIn("frame_probabilities", manifest["trajectories"][0])  # no oracle given
            with self.assertRaises(FileExistsError):
                save_traversal(run, out, ["a", "b"], [np.eye(4)] * 2, {})
            self.assertEqual(sorted(p.name for p in Path(root).iterdir()), ["run"])

    def test_rank_folders_merge_in_the_runs_order(self):
        run = traverse(inferer(), self.unet, self.autoencoder, self.text_encoder, "normal", "effusion",
                       seeds=[1, 2, 3], latent_shape=(2, 8, 8))  # fmt: skip
        settings = {"neutral_prompt": "normal"}
        with tempfile.TemporaryDirectory() as root:
            staging, out = Path(root, ".run.ranks"), Path(root, "run")
            one = save_traversal(run, Path(root, "one"), ["s1", "s2", "s3"], [np.eye(4)] * 3, settings)
            # process 0 holds items 0 and 2, process 1 item 1 (as traversal_inputs shares them)
            parts = {0: [0, 2], 1: [1]}
            for rank, indices in parts.items():
                share = {key: run[key][indices] if run[key].ndim == run["frames"].ndim - 1 else run[key][:, indices]
                         for key in ("initial_latent", "neutral_latent", "swap_latents", "frame_latents", "frames",
                                     "swap_images")}  # fmt: skip
                share.update(swap_steps=run["swap_steps"], num_model_calls=run["num_model_calls"])
                names = [f"s{i + 1}" for i in indices]
                save_traversal(share, staging / f"rank_{rank}", names, [np.eye(4)] * len(indices), settings)
            broken = Path(root, ".broken.ranks")
            save_traversal(share, broken / "rank_1", ["s2"], [np.eye(4)], settings)
            with self.assertRaisesRegex(FileNotFoundError, r"rank_0/traversal\.json.*process 0 did not finish"):
                merge_rank_traversals(broken, out, 3, 2)
            self.assertFalse(out.exists())
            merged = merge_rank_traversals(staging, out, 3, 2)
            self.assertEqual([t["name"] for t in merged["trajectories"]], ["s1", "s2", "s3"])
            self.assertEqual([t["files"] for t in merged["trajectories"]], [t["files"] for t in one["trajectories"]])
            self.assertEqual(sorted(p.name for p in out.iterdir()), sorted(p.name for p in Path(root, "one").iterdir()))
            self.assertEqual(merged["num_model_calls"], 2 * run["num_model_calls"])  # both processes' calls
            self.assertFalse(staging.exists())
            before = sorted(p.name for p in out.iterdir())
            save_traversal(share, staging / "rank_0", ["s2"], [np.eye(4)], settings)
            with self.assertRaises(FileExistsError):  # an existing output folder is kept unless overwrite
                merge_rank_traversals(staging, out, 1, 1)
            self.assertEqual(sorted(p.name for p in out.iterdir()), before)


class TestEvaluate(unittest.TestCase):
    def test_any_classifier_judges_the_attributes(self):
        autoencoder, unet = tiny_networks(2)

        def brightness(images):  # attribute 0: mean intensity; attribute 1: its opposite
            p = images.flatten(1).mean(1, keepdim=True).clamp(0, 1)
            return torch.cat([p, 1 - p], dim=1)

        common = {"kind": "chest", "latent_shape": (2, 16, 16), "image_size": 32, "num_seeds": 2,
                  "num_reference_images": 4, "bezier_window": (2, 4), "swap_window": (2, 4)}  # fmt: skip
        pairs = [{"finding": "bright", "neutral_prompt": "normal", "target_prompt": "bright"}]
        args = (inferer(), unet, autoencoder, PromptEncoder(), ProjectionOracle(32 * 32))
        metrics = evaluate_traversal(*args, ["bright", "dark"], pairs, classifier=brightness, **common)
        pair = metrics["pairs"]["bright"]
        self.assertEqual(len(pair["bezier_target_probability"]), 4)
        self.assertTrue(0.0 <= pair["cfrt_bezier"] <= 1.0)
        self.assertIsNotNone(pair["bezier_fid"])  # FID from the oracle's embeddings
        with self.assertRaisesRegex(ValueError, "probabilities"):
            evaluate_traversal(*args, ["bright", "dark"], pairs, classifier=lambda x: x.flatten(), **common)
        with self.assertRaisesRegex(ValueError, "finding"):
            evaluate_traversal(*args, ["a", "b"], pairs, classifier=brightness, **common)
        # windows that do not fit are refused before the first traversal
        with self.assertRaisesRegex(ValueError, "bezier_window"):
            evaluate_traversal(*args, ["bright", "dark"], pairs, **{**common, "bezier_window": (2, 9)})
        with self.assertRaisesRegex(ValueError, "swap_window"):
            evaluate_traversal(*args, ["bright", "dark"], pairs, **{**common, "swap_window": (5, 9)})


if __name__ == "__main__":
    unittest.main()
