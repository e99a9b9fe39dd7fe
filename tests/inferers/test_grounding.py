from __future__ import annotations

import unittest

import torch
from monai.data import MetaTensor
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from parameterized import parameterized

from monai_cfx.inferers import CrossAttentionGroundingInferer, ddim_invert
from monai_cfx.networks import set_flash_attention
from monai_cfx.visualize import CrossAttentionRecorder
from tests.helpers import CONTEXT_DIM, tiny_networks


def grounding(**kwargs) -> CrossAttentionGroundingInferer:
    kwargs.setdefault("num_inference_steps", 10)
    return CrossAttentionGroundingInferer(DDIMScheduler(num_train_timesteps=100, clip_sample=False), 0.7, **kwargs)


class CountCalls:
    """Counts UNet calls and image evaluations (batch rows)."""

    def __init__(self, module):
        self.calls, self.rows = 0, 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, _module, args):
        self.calls += 1
        self.rows += args[0].shape[0]


class TestCrossAttentionGroundingInferer(unittest.TestCase):
    @parameterized.expand([["2d", 2], ["3d", 3]])
    def test_heatmaps_masks_and_meta(self, _, spatial_dims):
        autoencoder, unet = tiny_networks(spatial_dims)
        affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
        images = MetaTensor(torch.rand((1, 1) + (8,) * spatial_dims), affine=affine)
        context, uncond = torch.randn(1, 6, CONTEXT_DIM), torch.randn(1, 6, CONTEXT_DIM)
        heatmaps, masks = grounding(sigma=1.0)(images, unet, autoencoder, context, uncond, [[1, 2], [4]])
        self.assertEqual(tuple(heatmaps.shape), (1, 2) + (8,) * spatial_dims)
        self.assertIsInstance(heatmaps, MetaTensor)
        torch.testing.assert_close(heatmaps.affine, images.affine)
        self.assertEqual(sorted(masks.unique().tolist()), [0.0, 1.0])
        self.assertTrue(0.0 <= float(heatmaps.min()) and float(heatmaps.max()) <= 1.0)
        self.assertEqual(float((heatmaps * (1 - masks)).abs().max()), 0.0)  # Otsu-masked
        self.assertFalse(any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules()))

    def test_phrases_share_one_inversion(self):
        autoencoder, unet = tiny_networks(2)
        images = torch.rand(1, 1, 8, 8)
        context, uncond = torch.randn(1, 6, CONTEXT_DIM), torch.randn(1, 6, CONTEXT_DIM)
        counter = CountCalls(unet)
        one, _ = grounding(otsu=False)(images, unet, autoencoder, context, uncond, [[1]])
        calls_for_one, rows_for_one = counter.calls, counter.rows
        many, _ = grounding(otsu=False)(images, unet, autoencoder, context, uncond, [[1], [2], [3], [1, 2]] * 2)
        counter.handle.remove()
        # 10 steps, window (0.4, 0.6): steps 0-3 run the driving branch only, steps 4-5 both, then it stops
        self.assertEqual((calls_for_one, rows_for_one), (6, 8))
        self.assertEqual((counter.calls - calls_for_one, counter.rows - rows_for_one), (6, 8))
        torch.testing.assert_close(many[:, :1], one)

    @parameterized.expand([["uncond"], ["cond"]])
    def test_skipping_branches_matches_the_full_reference_protocol(self, drive):
        autoencoder, unet = tiny_networks(2)
        images = torch.rand(2, 1, 8, 8)
        context, uncond = torch.randn(2, 6, CONTEXT_DIM), torch.randn(2, 6, CONTEXT_DIM)
        inferer = grounding(otsu=False, sigma=0.0, drive=drive, layers="all", timestep_spacing="trailing")
        heatmaps, _ = inferer(images, unet, autoencoder, context, uncond, [[1, 2], [4]])
        # the reference: the whole 10-step inversion, recording steps 4 and 5 only; driven by the unconditional
        # branch with both branches at every step (the prompt's rows recorded), or by the prompt alone
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        rows = range(2, 4) if drive == "uncond" else range(2)
        branches = {"context": context, "uncond_context": uncond, "guidance_scale": 0.0}
        if drive == "cond":
            branches = {"context": context}
        recorder = CrossAttentionRecorder(unet, "all", token_indices=[[1, 2], [4]], batch_indices=rows)
        captured = {4, 5}

        def toggle(step_index, *_):
            recorder.recording = step_index + 1 in captured

        with torch.no_grad(), recorder:
            recorder.recording = False
            latent = autoencoder.encode(images)[0] * 0.7
            ddim_invert(unet, scheduler, latent, 10, callback=toggle, verbose=False, timestep_spacing="trailing",
                        **branches)  # fmt: skip
        expected = torch.nn.functional.interpolate(recorder.maps(), size=(8, 8), mode="bilinear", align_corners=False)
        flat = expected.flatten(2)
        low, high = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
        torch.testing.assert_close(heatmaps, ((flat - low) / (high - low)).view_as(expected), atol=1e-5, rtol=1e-4)

    def test_capture_window(self):
        self.assertEqual(grounding(num_inference_steps=50).captured_steps(), list(range(20, 30)))
        self.assertEqual(grounding(num_inference_steps=10, capture_window=(0.0, 0.05)).captured_steps(), [0])

    def test_bad_input(self):
        autoencoder, unet = tiny_networks(2)
        images, context = torch.rand(1, 1, 8, 8), torch.randn(1, 6, CONTEXT_DIM)
        with self.assertRaisesRegex(ValueError, "token_indices"):
            grounding()(images, unet, autoencoder, context, context, [[7]])
        with self.assertRaisesRegex(ValueError, "token_indices"):
            grounding()(images, unet, autoencoder, context, context, [[]])
        with self.assertRaisesRegex(ValueError, "capture_window"):
            grounding(capture_window=(0.6, 0.4))
        with self.assertRaisesRegex(ValueError, "DDIMScheduler"):
            CrossAttentionGroundingInferer(DDPMScheduler(num_train_timesteps=100))
        with self.assertRaisesRegex(ValueError, "drive"):
            grounding(drive="both")
        with self.assertRaisesRegex(ValueError, "timestep_spacing"):
            grounding(timestep_spacing="uniform")
        set_flash_attention(unet)  # on everywhere: the recorder turns it off on the captured blocks only
        blocks = [m for m in unet.modules() if hasattr(m, "use_flash_attention")]
        with self.assertRaises(RuntimeError):  # fails inside the UNet at step 0, which the window records
            grounding(layers="all", capture_window=(0.0, 0.2))(images, unet, autoencoder, context[..., :3],
                                                               context[..., :3], [[1]])  # fmt: skip
        self.assertTrue(all(m.use_flash_attention for m in blocks))
        self.assertFalse(any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules()))


if __name__ == "__main__":
    unittest.main()
