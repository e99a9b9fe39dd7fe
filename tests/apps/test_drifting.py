from __future__ import annotations

import csv
import json
import math
import tempfile
import unittest
from pathlib import Path

import torch
from PIL import Image

from monai_cfx.apps.drifting import drift_along, drift_grid, drift_search, write_drift_search
from tests.helpers import ProjectionOracle, noise_images

TARGET_SHIFT = 0.1


class RecordingGenerator:
    """``generate(drift, n, seed)``: seeded noise images shifted by the drift; remembers every call."""

    def __init__(self, channels=1):
        self.channels = channels
        self.calls = []

    def __call__(self, drift, num_samples, seed):
        self.calls.append((drift, num_samples, seed))
        return noise_images(num_samples, seed, drift, channels=self.channels)


def target_set(num=16, shift=TARGET_SHIFT, channels=1):
    return noise_images(num, seed=1234, shift=shift, channels=channels)


class TestDriftGrid(unittest.TestCase):
    def test_default_grid(self):
        grid = drift_grid()
        self.assertEqual(len(grid), 9)
        self.assertEqual((grid[0], grid[-1]), (-0.2, 0.2))
        self.assertIn(0.0, grid)
        self.assertEqual(grid[4], 0.0)
        self.assertEqual(math.copysign(1.0, grid[4]), 1.0)  # not -0.0
        self.assertEqual(grid[5], 0.05)

    def test_grids_without_zero_and_bad_bounds(self):
        self.assertNotIn(0.0, drift_grid(-0.2, 0.2, 4))  # allowed
        self.assertEqual(drift_grid(0.1, 0.1, 1), [0.1])
        with self.assertRaisesRegex(ValueError, "`num`"):
            drift_grid(num=0)
        with self.assertRaisesRegex(ValueError, "`low`"):
            drift_grid(0.2, -0.2)


class TestDriftSearch(unittest.TestCase):
    def test_picks_the_drift_closest_to_the_target_with_common_seeds(self):
        generate = RecordingGenerator()
        grid = drift_grid()
        result = drift_search(generate, grid, target_set(), num_samples=8, seed=5, verbose=False)
        step = grid[1] - grid[0]
        self.assertLessEqual(abs(result["best_drift"] - TARGET_SHIFT), step + 1e-9)
        self.assertEqual(result["best"]["drift"], result["best_drift"])
        self.assertEqual([row["drift"] for row in result["rows"]], grid)
        self.assertEqual([call[0] for call in generate.calls], grid)
        self.assertEqual({call[1:] for call in generate.calls}, {(8, 5)})  # the same seed for every drift
        self.assertEqual(
            (result["criterion"], result["num_samples"], result["num_target"], result["seed"]), ("l1", 8, 16, 5)
        )
        for row in result["rows"]:
            self.assertEqual(set(row), {"drift", "l1", "fid", "kid", "kid_std", "seconds"})
            self.assertIsNone(row["fid"])
            self.assertGreaterEqual(row["seconds"], 0.0)
        # a distance that grows with |drift - target shift| on both sides
        l1 = {row["drift"]: row["l1"] for row in result["rows"]}
        self.assertLess(l1[0.1], l1[-0.2])
        self.assertLess(l1[0.1], l1[0.2])

    def test_fid_and_kid_criteria_with_an_oracle(self):
        oracle = ProjectionOracle(64)
        grid = [-0.2, 0.0, 0.1, 0.3]
        for criterion in ("fid", "kid"):
            result = drift_search(
                RecordingGenerator(),
                grid,
                target_set(),
                oracle=oracle,
                num_samples=8,
                criterion=criterion,
                verbose=False,
            )
            self.assertEqual(result["best_drift"], 0.1, criterion)
            self.assertTrue(
                all(isinstance(row[key], float) for row in result["rows"] for key in ("fid", "kid", "kid_std"))
            )

    def test_per_channel_drifts_are_accepted_and_written(self):
        generate = RecordingGenerator(channels=2)
        drifts = [(0.0, 0.0), [0.1, -0.1], torch.tensor([-0.1, 0.1], dtype=torch.float64)]
        result = drift_search(generate, drifts, target_set(shift=(0.1, -0.1), channels=2), num_samples=6, verbose=False)
        self.assertEqual(result["best_drift"], [0.1, -0.1])
        self.assertEqual([row["drift"] for row in result["rows"]], [[0.0, 0.0], [0.1, -0.1], [-0.1, 0.1]])
        self.assertEqual(generate.calls[1][0], [0.1, -0.1])  # generate receives a list of floats (Drift.tolist)
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_drift_search(result, tmp)
            with open(paths["csv"], newline="") as f:
                rows = list(csv.DictReader(f))
            self.assertEqual([row["drift"] for row in rows], ["0.0 0.0", "0.1 -0.1", "-0.1 0.1"])
            self.assertEqual(json.loads(paths["json"].read_text())["best_drift"], [0.1, -0.1])
            with Image.open(paths["png"]) as image:
                self.assertGreater(image.width * image.height, 0)

    def test_bad_input_names_the_argument(self):
        generate, target = RecordingGenerator(), target_set(4)
        with self.assertRaisesRegex(ValueError, r"`drifts(\[\d+\])?`"):
            drift_search(generate, [], target, verbose=False)
        with self.assertRaisesRegex(ValueError, r"`drifts(\[\d+\])?`"):
            drift_search(generate, [0.0, float("nan")], target, verbose=False)
        with self.assertRaisesRegex(ValueError, r"`drifts(\[\d+\])?`"):
            drift_search(generate, [(0.1, float("inf"))], target, verbose=False)
        with self.assertRaisesRegex(ValueError, "`criterion`"):
            drift_search(generate, [0.0], target, criterion="l2", verbose=False)
        with self.assertRaisesRegex(ValueError, "`oracle`"):
            drift_search(generate, [0.0], target, criterion="fid", verbose=False)
        with self.assertRaisesRegex(ValueError, "`num_samples`"):
            drift_search(generate, [0.0], target, oracle=ProjectionOracle(64), num_samples=1, verbose=False)
        with self.assertRaisesRegex(ValueError, "`generate`"):
            drift_search(lambda d, n, s: noise_images(n + 1, s), [0.0], target, num_samples=2, verbose=False)
        with self.assertRaisesRegex(ValueError, "`generate`"):
            drift_search(lambda d, n, s: noise_images(n, s, size=6), [0.0], target, num_samples=2, verbose=False)
        with self.assertRaisesRegex(ValueError, "`generate`"):
            drift_search(lambda d, n, s: noise_images(n, s) * float("nan"), [0.0], target, num_samples=2, verbose=False)


class TestWriteDriftSearch(unittest.TestCase):
    def setUp(self):
        self.grid = [-0.1, 0.0, 0.1, 0.2]
        self.result = drift_search(
            RecordingGenerator(), self.grid, target_set(8), oracle=ProjectionOracle(64), num_samples=4, verbose=False
        )

    def test_writes_three_files_and_never_clobbers(self):
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_drift_search(self.result, Path(tmp) / "search")
            self.assertEqual(
                {p.name for p in paths.values()}, {"drift_search.json", "drift_search.csv", "drift_search.png"}
            )
            with open(paths["csv"], newline="") as f:
                rows = list(csv.DictReader(f))
            self.assertEqual(list(rows[0]), ["drift", "l1", "fid", "kid", "kid_std", "seconds"])
            self.assertEqual([float(row["drift"]) for row in rows], self.grid)
            self.assertEqual([float(row["l1"]) for row in rows], [row["l1"] for row in self.result["rows"]])
            self.assertEqual(json.loads(paths["json"].read_text())["best_drift"], self.result["best_drift"])
            with Image.open(paths["png"]) as image:
                image.load()
                self.assertGreater(image.width * image.height, 0)

            before = {key: path.read_bytes() for key, path in paths.items()}
            changed = {**self.result, "rows": self.result["rows"][:2]}
            with self.assertRaises(FileExistsError):
                write_drift_search(changed, Path(tmp) / "search")
            self.assertEqual({key: path.read_bytes() for key, path in paths.items()}, before)

            write_drift_search(changed, Path(tmp) / "search", overwrite=True)
            with open(paths["csv"], newline="") as f:
                self.assertEqual(len(list(csv.DictReader(f))), 2)
            self.assertNotEqual(paths["png"].read_bytes(), before["png"])

    def test_every_target_is_checked_before_writing(self):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "drift_search.png").write_bytes(b"a user's file")
            with self.assertRaises(FileExistsError):
                write_drift_search(self.result, tmp)
            self.assertEqual(sorted(p.name for p in Path(tmp).iterdir()), ["drift_search.png"])
            self.assertEqual((Path(tmp) / "drift_search.png").read_bytes(), b"a user's file")

    def test_l1_only_result(self):
        result = drift_search(RecordingGenerator(), self.grid, target_set(8), num_samples=4, verbose=False)
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_drift_search(result, tmp)
            with open(paths["csv"], newline="") as f:
                rows = list(csv.DictReader(f))
            self.assertEqual({row["fid"] for row in rows}, {""})
            self.assertGreater(paths["png"].stat().st_size, 0)
        with self.assertRaisesRegex(ValueError, "`result`"):
            write_drift_search({"rows": []}, "unused")


class TestPerChannelDrift(unittest.TestCase):
    def test_drift_along(self):
        self.assertEqual(drift_along([0.1, -0.2], [0.5, 1.0]), [[0.05, -0.1], [0.1, -0.2]])
        with self.assertRaisesRegex(ValueError, "`scales"):
            drift_along([0.1], [])
        with self.assertRaisesRegex(ValueError, r"`scales\[1\]`"):
            drift_along([0.1], [1.0, float("nan")])
        with self.assertRaisesRegex(ValueError, "`direction`"):
            drift_along([], [1.0])


if __name__ == "__main__":
    unittest.main()


class TestDriftSamplerHooks(unittest.TestCase):
    def test_the_sampler_s_hooks_run_in_every_call_before_the_call_s_own(self):
        from monai.networks.schedulers import DDIMScheduler

        from monai_cfx.apps.drifting import DriftSampler
        from monai_cfx.inferers import ClipOriginalSampleHook, DriftLatentDiffusionInferer
        from tests.helpers import CONTEXT_DIM, tiny_networks

        autoencoder, unet = tiny_networks(2)
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        clip = ClipOriginalSampleHook(scheduler, [-0.05, -0.1], [0.05, 0.1])  # tight: every step is clipped

        class TextEncoder:
            def __call__(self, prompts):
                return torch.stack([torch.full((3, CONTEXT_DIM), 0.1 * len(p)) for p in prompts])

            def null_context(self, batch_size):
                return torch.zeros(batch_size, 3, CONTEXT_DIM)

        text_encoder = TextEncoder()

        def sampler(hooks=()):
            inferer = DriftLatentDiffusionInferer(scheduler, scale_factor=0.7, drift=0.01)
            return DriftSampler(inferer, autoencoder, unet, text_encoder, [2, 4, 4], num_inference_steps=5,
                                batch_size=2, hooks=hooks)  # fmt: skip

        prompts, seeds = ["a normal image", "an image with a finding"], [3, 4]
        with_hooks = sampler([clip]).generate(prompts, seeds)
        per_call = sampler().generate(prompts, seeds, hooks=[clip])
        plain = sampler().generate(prompts, seeds)
        self.assertTrue(torch.equal(with_hooks, per_call))
        self.assertFalse(torch.allclose(with_hooks, plain))
        with self.assertRaisesRegex(ValueError, "`hooks`"):
            sampler(hooks=[object()])
