from __future__ import annotations

import itertools
import math
import unittest

import torch

from monai_cfx.metrics import (
    KIDMetric,
    compute_counterfactual_validity,
    compute_kid,
    compute_localization_auroc,
    compute_masked_l1,
)


def mmd_unbiased_by_loops(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased polynomial-kernel MMD^2 written out term by term."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


class TestKID(unittest.TestCase):
    def test_matches_the_definition(self):
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(12, 5, generator=generator), torch.randn(12, 5, generator=generator) + 0.5
        mean, std = compute_kid(x, y, subset_size=12, num_subsets=3)  # full sets: every subset is the same
        self.assertAlmostEqual(float(mean), mmd_unbiased_by_loops(x.double(), y.double()), places=8)
        self.assertAlmostEqual(float(std), 0.0, places=10)

    def test_same_distribution_near_zero_and_shift_large(self):
        generator = torch.Generator().manual_seed(1)
        a, b = torch.randn(400, 16, generator=generator), torch.randn(400, 16, generator=generator)
        metric = KIDMetric(subset_size=100, num_subsets=20)
        same = float(metric(a, b))
        shifted = float(metric(a, b + 1.0))
        self.assertLess(abs(same), 0.01)
        self.assertGreater(shifted, 10 * max(abs(same), 1e-4))
        self.assertGreater(float(metric.last_std), 0.0)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "y_pred"):
            compute_kid(torch.randn(1, 3), torch.randn(4, 3))
        with self.assertRaisesRegex(ValueError, "feature size"):
            compute_kid(torch.randn(4, 3), torch.randn(4, 2))


class TestCounterfactualMetrics(unittest.TestCase):
    def test_validity(self):
        labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
        probabilities = torch.tensor([[0.2, 0.9], [0.1, 0.7], [0.9, 0.9], [0.3, 0.4]])
        removed = compute_counterfactual_validity(probabilities, labels)
        self.assertEqual(removed[[0, 1, 3]].tolist(), [1.0, 0.0, 1.0])
        self.assertTrue(math.isnan(float(removed[2])))
        induced = compute_counterfactual_validity(probabilities, labels, direction="induce")
        self.assertEqual(induced[[0, 1, 3]].tolist(), [0.0, 0.0, 0.0])
        with self.assertRaisesRegex(ValueError, "direction"):
            compute_counterfactual_validity(probabilities, labels, direction="flip")

    def test_masked_l1(self):
        image = torch.zeros(2, 1, 4, 4)
        counterfactual = image.clone()
        counterfactual[:, :, :2] = 1.0  # changes inside the mask only
        mask = torch.zeros(2, 1, 4, 4)
        mask[:, :, :2] = 1
        self.assertEqual(compute_masked_l1(counterfactual, image, mask, "outside").tolist(), [0.0, 0.0])
        self.assertEqual(compute_masked_l1(counterfactual, image, mask, "inside").tolist(), [1.0, 1.0])
        self.assertEqual(compute_masked_l1(counterfactual, image).tolist(), [0.5, 0.5])
        self.assertTrue(torch.isnan(compute_masked_l1(counterfactual, image, torch.ones_like(mask))).all())

    def test_localization_auroc(self):
        mask = torch.zeros(3, 1, 8, 8)
        mask[:2, :, 2:4, 2:4] = 1
        perfect = mask + 0.01 * torch.rand(3, 1, 8, 8)
        auroc = compute_localization_auroc(perfect, mask)
        self.assertEqual(auroc[:2].tolist(), [1.0, 1.0])
        self.assertTrue(math.isnan(float(auroc[2])))  # no finding: undefined
        self.assertEqual(compute_localization_auroc(-perfect[:2], mask[:2]).tolist(), [0.0, 0.0])


if __name__ == "__main__":
    unittest.main()
