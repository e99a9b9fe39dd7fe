"""compute_finding_contrast_kept: 1 for an autoencoder that keeps a finding, 0 for one that erases it."""

from __future__ import annotations

import unittest

import torch

from monai_cfx.metrics import compute_finding_contrast_kept


class Smoothing(torch.nn.Module):
    """A stand-in autoencoder: encodes to the image itself (``weight`` 1) or to a blend with its mean (< 1)."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def encode_stage_2_inputs(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=tuple(range(1, images.ndim)), keepdim=True)
        return self.weight * images + (1 - self.weight) * mean

    def decode_stage_2_outputs(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


def pairs(spatial_dims: int = 3, num: int = 3):
    generator = torch.Generator().manual_seed(0)
    healthy = torch.rand((num, 1) + (8,) * spatial_dims, generator=generator)
    masks = torch.zeros_like(healthy)
    masks[(slice(None), 0) + (slice(2, 4),) * spatial_dims] = 1
    return healthy + 0.3 * masks, healthy, masks


class TestFindingContrastKept(unittest.TestCase):
    def test_kept_halved_and_erased(self):
        images, healthy, masks = pairs()
        for weight in (1.0, 0.5, 0.0):
            ratios = compute_finding_contrast_kept(Smoothing(weight), images, healthy, masks)
            self.assertEqual(tuple(ratios.shape), (3,))
            # the blend keeps `weight` of the difference, plus the shift of the mean it also scales
            self.assertTrue(torch.allclose(ratios, torch.full((3,), weight), atol=0.03), (weight, ratios))

    def test_2d_and_bad_input(self):
        images, healthy, masks = pairs(spatial_dims=2)
        kept = compute_finding_contrast_kept(Smoothing(1.0), images, healthy, masks)
        self.assertTrue(torch.allclose(kept, torch.ones(3)))
        with self.assertRaisesRegex(ValueError, "same images"):
            compute_finding_contrast_kept(Smoothing(1.0), images, healthy[:2], masks)
        with self.assertRaisesRegex(ValueError, "non-empty mask"):
            compute_finding_contrast_kept(Smoothing(1.0), images, healthy, torch.zeros_like(masks))
        with self.assertRaisesRegex(ValueError, "non-empty mask"):
            compute_finding_contrast_kept(Smoothing(1.0), healthy, healthy, masks)  # no contrast


if __name__ == "__main__":
    unittest.main()
