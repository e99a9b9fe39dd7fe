from __future__ import annotations

import csv
import json
import math
import tempfile
import unittest
from pathlib import Path

import torch
from PIL import Image

from monai_cfx.apps.drifting import (
    distribution_distances,
    drift_along,
    drift_grid,
    drift_search,
    latent_shift,
    monte_carlo_l1,
    split_fractions,
    write_drift_search,
)

TARGET_SHIFT = 0.1


class ProjectionOracle(torch.nn.Module):
    """A stand-in evaluation classifier: a fixed random projection of the voxels gives a 3-dim embedding."""

    def __init__(self, num_voxels: int, num_features: int = 3):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.register_buffer("projection", torch.randn(num_voxels, num_features, generator=generator) / num_voxels**0.5)

    def logits_and_embedding(self, images):
        embedding = torch.tanh(images.flatten(1) @ self.projection)
        return embedding[:, :2], embedding


def noise_images(num, seed, shift=0.0, channels=1, size=8):
    """``0.5 + 0.1 * noise + shift`` with ``shift`` a number or one number per channel."""
    noise = torch.randn(num, channels, size, size, generator=torch.Generator().manual_seed(seed))
    shift = torch.as_tensor(shift, dtype=torch.float32).reshape(1, -1, 1, 1)
    return 0.5 + 0.1 * noise + shift


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


class TestMonteCarloL1(unittest.TestCase):
    def test_all_pairs_equal_a_hand_computation(self):
        generated = torch.tensor([[[[0.0, 1.0]]], [[[2.0, 2.0]]]])  # (2, 1, 1, 2)
        target = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 4.0]]], [[[3.0, 0.0]]]])  # (3, 1, 1, 2)
        # |x - y| averaged over the 2 voxels, then over the 6 pairs
        pair_means = [(1 + 0) / 2, (0 + 3) / 2, (3 + 1) / 2, (1 + 1) / 2, (2 + 2) / 2, (1 + 2) / 2]
        self.assertAlmostEqual(monte_carlo_l1(generated, target), sum(pair_means) / 6, places=6)

    def test_identical_single_images_and_symmetry(self):
        image = torch.rand(1, 2, 4, 4, 3)  # 3D
        self.assertEqual(monte_carlo_l1(image, image.clone()), 0.0)
        a, b = torch.rand(3, 1, 5, 5), torch.rand(4, 1, 5, 5)
        self.assertAlmostEqual(monte_carlo_l1(a, b), monte_carlo_l1(b, a), places=6)

    def test_sampled_estimate_is_close_to_the_exact_one_and_seeded(self):
        a, b = torch.rand(20, 1, 6, 6), torch.rand(30, 1, 6, 6) + 0.3
        exact = monte_carlo_l1(a, b, num_pairs=600)
        sampled = monte_carlo_l1(a, b, num_pairs=200, seed=3)
        self.assertNotEqual(sampled, exact)  # 600 pairs exist, 200 are drawn
        self.assertAlmostEqual(sampled, exact, delta=0.03 * exact)
        self.assertEqual(sampled, monte_carlo_l1(a, b, num_pairs=200, seed=3))

    def test_shapes_must_match_beyond_the_batch(self):
        with self.assertRaisesRegex(ValueError, "`generated` and `target`"):
            monte_carlo_l1(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 5))
        with self.assertRaisesRegex(ValueError, "`target`"):
            monte_carlo_l1(torch.rand(2, 1, 4, 4), torch.rand(0, 1, 4, 4))
        with self.assertRaisesRegex(ValueError, "`generated`"):
            monte_carlo_l1(torch.rand(1, 4, 4), torch.rand(2, 1, 4, 4))


class TestDistributionDistances(unittest.TestCase):
    def test_with_and_without_oracle(self):
        generated, target = noise_images(8, 0), noise_images(8, 1)
        plain = distribution_distances(generated, target, oracle=None)
        self.assertEqual((plain["fid"], plain["kid"], plain["kid_std"]), (None, None, None))
        self.assertEqual((plain["num_generated"], plain["num_target"]), (8, 8))
        self.assertAlmostEqual(plain["l1"], monte_carlo_l1(generated, target))
        oracle = ProjectionOracle(64)
        near = distribution_distances(generated, target, oracle, kid_subset_size=8, kid_num_subsets=5)
        far = distribution_distances(generated + 0.5, target, oracle, kid_subset_size=8, kid_num_subsets=5)
        self.assertGreater(far["fid"], near["fid"])
        self.assertGreater(far["kid"], near["kid"])
        with self.assertRaisesRegex(ValueError, "at least 2"):
            distribution_distances(generated[:1], target, oracle)


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
        self.assertEqual(generate.calls[1][0], (0.1, -0.1))  # generate receives a tuple of floats
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


class ChannelEncoder(torch.nn.Module):
    """A stand-in autoencoder: the latent's channel c is (c + 1) times the image, 2x downsampled."""

    def encode(self, images):
        pooled = (
            torch.nn.functional.avg_pool2d(images, 2) if images.ndim == 4 else torch.nn.functional.avg_pool3d(images, 2)
        )
        z_mu = torch.cat([pooled * (channel + 1) for channel in range(3)], dim=1)
        return z_mu, torch.ones_like(z_mu)


class TestPerChannelDrift(unittest.TestCase):
    def test_latent_shift_is_the_scaled_mean_difference(self):
        source, target = torch.rand(5, 1, 8, 8), torch.rand(3, 1, 8, 8) + 0.25
        expected = (target.mean() - source.mean()) * 0.5 * torch.tensor([1.0, 2.0, 3.0])
        shift = latent_shift(ChannelEncoder(), source, target, scale_factor=0.5, batch_size=2)
        self.assertTrue(torch.allclose(torch.tensor(shift), expected, atol=1e-6))
        volumes = latent_shift(ChannelEncoder(), torch.zeros(2, 1, 4, 4, 4), torch.ones(2, 1, 4, 4, 4))
        self.assertEqual(volumes, [1.0, 2.0, 3.0])
        with self.assertRaisesRegex(ValueError, "`target_images`"):
            latent_shift(ChannelEncoder(), source, torch.rand(8, 8))

    def test_drift_along(self):
        self.assertEqual(drift_along([0.1, -0.2], [0.5, 1.0]), [[0.05, -0.1], [0.1, -0.2]])
        with self.assertRaisesRegex(ValueError, "`scales"):
            drift_along([0.1], [])
        with self.assertRaisesRegex(ValueError, r"`scales\[1\]`"):
            drift_along([0.1], [1.0, float("nan")])
        with self.assertRaisesRegex(ValueError, "`direction`"):
            drift_along([], [1.0])

    def test_split_fractions(self):
        fractions = split_fractions(32, 200, 200)
        self.assertEqual([int(round(f * 432)) for f in fractions], [32, 200, 200])
        with self.assertRaisesRegex(ValueError, "`counts`"):
            split_fractions(1, 2)


if __name__ == "__main__":
    unittest.main()
