from __future__ import annotations

import unittest

import torch

from monai_cfx.networks import set_flash_attention
from tests.inferers.test_sampling import CONTEXT_DIM, tiny_networks


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


if __name__ == "__main__":
    unittest.main()
