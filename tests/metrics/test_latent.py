"""Tests for ``monai_cfx.metrics.latent_shift``."""

from __future__ import annotations

import unittest

import torch

from monai_cfx.metrics import latent_shift


class ChannelEncoder(torch.nn.Module):
    """A stand-in autoencoder: the latent's channel c is (c + 1) times the image, 2x downsampled."""

    def encode(self, images):
        pooled = (
            torch.nn.functional.avg_pool2d(images, 2) if images.ndim == 4 else torch.nn.functional.avg_pool3d(images, 2)
        )
        z_mu = torch.cat([pooled * (channel + 1) for channel in range(3)], dim=1)
        return z_mu, torch.ones_like(z_mu)


class TestLatentShift(unittest.TestCase):
    def test_latent_shift_is_the_scaled_mean_difference(self):
        source, target = torch.rand(5, 1, 8, 8), torch.rand(3, 1, 8, 8) + 0.25
        expected = (target.mean() - source.mean()) * 0.5 * torch.tensor([1.0, 2.0, 3.0])
        shift = latent_shift(ChannelEncoder(), source, target, scale_factor=0.5, batch_size=2)
        self.assertTrue(torch.allclose(torch.tensor(shift), expected, atol=1e-6))
        volumes = latent_shift(ChannelEncoder(), torch.zeros(2, 1, 4, 4, 4), torch.ones(2, 1, 4, 4, 4))
        self.assertEqual(volumes, [1.0, 2.0, 3.0])
        with self.assertRaisesRegex(ValueError, "`target_images`"):
            latent_shift(ChannelEncoder(), source, torch.rand(8, 8))


if __name__ == "__main__":
    unittest.main()
