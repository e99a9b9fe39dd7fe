from __future__ import annotations

import unittest

import torch

from monai_cfx.transforms import EncodeLatentd
from tests.helpers import tiny_autoencoder


class TestEncodeLatentd(unittest.TestCase):
    def test_posterior_keys_2d_3d(self):
        for spatial_dims, shape in ((2, (1, 8, 8)), (3, (1, 8, 8, 8))):
            autoencoder = tiny_autoencoder(spatial_dims)
            image = torch.rand(shape)
            out = EncodeLatentd("image", autoencoder)({"image": image, "report": "x"})
            z_mu, z_sigma = autoencoder.encode(image[None])
            self.assertTrue(torch.allclose(out["image_z_mu"], z_mu[0]))
            self.assertTrue(torch.allclose(out["image_z_sigma"], z_sigma[0]))
            self.assertEqual(out["report"], "x")
            self.assertIs(out["image"], image)


if __name__ == "__main__":
    unittest.main()
