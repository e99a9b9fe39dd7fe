from __future__ import annotations

import unittest

import torch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from parameterized import parameterized

from monai_cfx.inferers import SamplingHook, TextGuidedLatentDiffusionInferer, denoise
from tests.helpers import CONTEXT_DIM, tiny_networks

CASES = [
    ["2d_ddpm", 2, DDPMScheduler, (2, 2, 8, 8)],
    ["2d_ddim", 2, DDIMScheduler, (2, 2, 8, 8)],
    ["3d_ddim", 3, DDIMScheduler, (1, 2, 4, 4, 4)],
]


class TestDenoise(unittest.TestCase):
    @parameterized.expand(CASES)
    def test_equals_monai_bit_for_bit(self, _, spatial_dims, scheduler_type, latent_shape):
        autoencoder, unet = tiny_networks(spatial_dims)
        context = torch.randn(latent_shape[0], 3, CONTEXT_DIM)
        noise = torch.randn(latent_shape)
        results = []
        for inferer_type in (LatentDiffusionInferer, TextGuidedLatentDiffusionInferer):
            scheduler = scheduler_type(num_train_timesteps=100)
            scheduler.set_timesteps(10)
            inferer = inferer_type(scheduler, scale_factor=0.7)
            torch.manual_seed(1)  # DDPM draws its step noise from the global generator
            results.append(inferer.sample(noise, autoencoder, unet, conditioning=context, verbose=False))
        self.assertTrue(torch.equal(results[0], results[1]))

    def test_guidance_uses_the_unconditional_context(self):
        _, unet = tiny_networks(2)
        scheduler = DDIMScheduler(num_train_timesteps=100)
        scheduler.set_timesteps(5)
        noise, cond, uncond = torch.randn(2, 2, 8, 8), torch.randn(2, 3, CONTEXT_DIM), torch.randn(2, 3, CONTEXT_DIM)
        only_cond = denoise(unet, scheduler, noise, context=cond, verbose=False)
        only_uncond = denoise(unet, scheduler, noise, context=uncond, verbose=False)
        scale_one = denoise(unet, scheduler, noise, context=cond, uncond_context=uncond, verbose=False)
        scale_zero = denoise(
            unet, scheduler, noise, context=cond, uncond_context=uncond, guidance_scale=0.0, verbose=False
        )
        guided = denoise(unet, scheduler, noise, context=cond, uncond_context=uncond, guidance_scale=3.0, verbose=False)
        self.assertTrue(torch.equal(scale_one, only_cond))
        torch.testing.assert_close(scale_zero, only_uncond, atol=1e-5, rtol=1e-5)
        self.assertFalse(torch.allclose(guided, only_cond, atol=1e-3))

    def test_hooks_see_every_step_and_can_intervene(self):
        _, unet = tiny_networks(2)
        scheduler = DDIMScheduler(num_train_timesteps=100)
        scheduler.set_timesteps(6)
        noise, first, second = torch.randn(1, 2, 8, 8), torch.randn(1, 3, CONTEXT_DIM), torch.randn(1, 3, CONTEXT_DIM)

        class SwapAndRecord(SamplingHook):
            def __init__(self):
                self.seen = []

            def before_model(self, state):
                if state.step_index >= 3:
                    state.context = second

            def after_step(self, state):
                self.seen.append((state.step_index, int(state.timestep), state.num_steps))

        hook = SwapAndRecord()
        swapped = denoise(unet, scheduler, noise, context=first, hooks=[hook], verbose=False)
        self.assertEqual([s[0] for s in hook.seen], list(range(6)))
        self.assertEqual([s[1] for s in hook.seen], scheduler.timesteps.tolist())
        # a swap at step 3 equals running the first prompt for 3 steps, then the second from there
        head = denoise(unet, scheduler, noise, timesteps=scheduler.timesteps[:3], context=first, verbose=False)
        tail = denoise(unet, scheduler, head, timesteps=scheduler.timesteps[3:], context=second, verbose=False)
        self.assertTrue(torch.equal(swapped, tail))

    def test_bad_input(self):
        _, unet = tiny_networks(2)
        scheduler = DDIMScheduler(num_train_timesteps=100)
        with self.assertRaisesRegex(ValueError, "sample"):
            denoise(unet, scheduler, torch.randn(2, 8, 8), verbose=False)
        with self.assertRaisesRegex(ValueError, "sample"):
            denoise(unet, scheduler, torch.full((1, 2, 8, 8), float("nan")), verbose=False)
        with self.assertRaisesRegex(ValueError, "uncond_context"):
            denoise(unet, scheduler, torch.randn(1, 2, 8, 8), uncond_context=torch.randn(1, 3, 8), verbose=False)


if __name__ == "__main__":
    unittest.main()
