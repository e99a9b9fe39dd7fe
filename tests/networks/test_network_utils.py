from __future__ import annotations

import unittest

import torch

from monai_cfx.networks import downsampling_factor, encode_mean, set_flash_attention, spatial_dims_of
from tests.helpers import CONTEXT_DIM, tiny_networks


class TestSetFlashAttention(unittest.TestCase):
    def test_same_outputs_and_every_block_switched(self):
        autoencoder, unet = tiny_networks(2)
        x, t, context = torch.randn(2, unet.in_channels, 8, 8), torch.tensor([5, 50]), torch.randn(2, 6, CONTEXT_DIM)
        with torch.no_grad():
            explicit = unet(x, t, context=context)
            fused = set_flash_attention(unet)(x, t, context=context)
        blocks = [m for m in unet.modules() if hasattr(m, "use_flash_attention")]
        self.assertTrue(blocks and all(m.use_flash_attention for m in blocks))
        torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)
        set_flash_attention(unet, False)
        self.assertFalse(any(m.use_flash_attention for m in blocks))
        self.assertIs(set_flash_attention(autoencoder), autoencoder)
        blocks[0].dropout_rate = 0.1  # the fused call would drop attention even in eval mode: left alone
        set_flash_attention(unet)
        self.assertEqual((blocks[0].use_flash_attention, blocks[1].use_flash_attention), (False, True))


class TestIntrospection(unittest.TestCase):
    def test_spatial_dims_downsampling_and_encode_mean(self):
        for spatial_dims in (2, 3):
            autoencoder, unet = tiny_networks(spatial_dims)
            self.assertEqual(spatial_dims_of(autoencoder), spatial_dims)
            self.assertEqual(spatial_dims_of(unet), spatial_dims)
            self.assertEqual(downsampling_factor(autoencoder), 2)  # channels (8, 8): one down-sampling
            self.assertEqual(downsampling_factor(unet), 2)
        self.assertIsNone(spatial_dims_of(torch.nn.Linear(2, 2)))
        self.assertEqual(downsampling_factor(torch.nn.Linear(2, 2)), 1)
        autoencoder, images = tiny_networks(2)[0], torch.rand(2, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(encode_mean(autoencoder, images), autoencoder.encode(images)[0])


if __name__ == "__main__":
    unittest.main()
