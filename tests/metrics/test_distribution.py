"""Tests for ``monai_cfx.metrics.distribution``: the Monte-Carlo L1 and the FID / KID distances between image sets."""

from __future__ import annotations

import unittest

import torch

from monai_cfx.metrics import distribution_distances, monte_carlo_l1
from tests.helpers import ProjectionOracle, noise_images


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


if __name__ == "__main__":
    unittest.main()
