from __future__ import annotations

import copy
import unittest

import torch

from monai_cfx.networks import accelerate, downsampling_factor, encode_mean, set_flash_attention, spatial_dims_of
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


class TestAccelerate(unittest.TestCase):
    def test_channels_last_and_flash_attention_equal_plain(self):
        for spatial_dims, memory_format in ((2, torch.channels_last), (3, torch.channels_last_3d)):
            _, unet = tiny_networks(spatial_dims)
            x = torch.randn(2, unet.in_channels, *(8,) * spatial_dims)
            t, context = torch.tensor([5, 50]), torch.randn(2, 6, CONTEXT_DIM)
            with torch.no_grad():
                plain = unet(x, t, context=context)
                fast = accelerate(copy.deepcopy(unet), channels_last=True, flash_attention=True)
                torch.testing.assert_close(fast(x, t, context=context), plain, atol=1e-5, rtol=1e-4)
            self.assertTrue(fast.conv_in.conv.weight.is_contiguous(memory_format=memory_format))
            self.assertTrue(all(m.use_flash_attention for m in fast.modules() if hasattr(m, "use_flash_attention")))

    def test_autocast_runs_in_bfloat16_and_returns_float32(self):
        _, unet = tiny_networks(2)
        x, t, context = torch.randn(2, unet.in_channels, 8, 8), torch.tensor([5, 50]), torch.randn(2, 6, CONTEXT_DIM)
        with torch.no_grad():
            plain = unet(x, t, context=context)
            fast = accelerate(copy.deepcopy(unet), autocast_dtype="bfloat16")
            seen = []
            handle = fast.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
            out = fast(x, t, context=context)
            handle.remove()
            self.assertEqual((seen, out.dtype), ([torch.bfloat16], torch.float32))
            torch.testing.assert_close(out, plain, atol=0.1, rtol=0.1)  # bf16 rounding, not another network
            self.assertGreater(float((out - plain).abs().max()), 0.0)
            # the switch survives a copy (it is rebound to the copy) and keeps the class and state dict
            copied = copy.deepcopy(fast)
            self.assertIs(type(copied), type(unet))
            torch.testing.assert_close(copied(x, t, context=context), out)
            self.assertEqual(set(copied.state_dict()), set(unet.state_dict()))

    def test_compile_in_place_and_bad_choices_refused(self):
        _, unet = tiny_networks(2)
        self.assertIs(accelerate(unet), unet)  # every switch off: nothing changes
        self.assertIsNone(unet._compiled_call_impl)
        accelerate(unet, compile=True)  # compiles lazily, at the first call (not run here: minutes on CPU)
        self.assertIsNotNone(unet._compiled_call_impl)
        with self.assertRaisesRegex(ValueError, "autocast_dtype.*'float64'"):
            accelerate(tiny_networks(2)[1], autocast_dtype="float64")
        with self.assertRaisesRegex(ValueError, "channels_last"):
            accelerate(torch.nn.Linear(2, 2), channels_last=True)


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
