# Copyright (c) monai_cfx contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Tests of trajectory traversal: the prompt swap, the shared-prefix sweep, Bézier curves and real-scan starts."""

from __future__ import annotations

import unittest

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from parameterized import parameterized

from monai_cfx.inferers import (
    ClipOriginalSampleHook,
    PromptSwapHook,
    TrajectoryTraversalInferer,
    bezier_curve,
    denoise,
    linear_path,
)
from tests.helpers import CONTEXT_DIM, tiny_networks

STEPS = 10


def traversal(**kwargs) -> TrajectoryTraversalInferer:
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("swap_steps", [2, 5, 8])
    kwargs.setdefault("num_frames", 6)
    kwargs.setdefault("guidance_scale", 3.0)
    return TrajectoryTraversalInferer(DDIMScheduler(num_train_timesteps=100, clip_sample=False), 0.7, **kwargs)


def prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 3, CONTEXT_DIM, generator=generator) for _ in range(3))  # type: ignore[return-value]


class CountCalls:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.calls += 1


class TestSweep(unittest.TestCase):
    @parameterized.expand([["2d", 2, (2, 2, 8, 8)], ["3d", 3, (1, 2, 4, 4, 4)]])
    def test_shared_sweep_equals_separate_runs(self, _, spatial_dims, shape):
        autoencoder, unet = tiny_networks(spatial_dims)
        neutral, target, empty = prompts()
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        counter = CountCalls(unet)
        result = traversal()(noise, unet, autoencoder, neutral, target, empty)
        shared_calls = counter.calls
        self.assertEqual(result.swap_steps, [8, 5, 2])  # from the latest swap (closest to neutral) on
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        scheduler.set_timesteps(STEPS)
        batch = shape[0]
        branches = {"uncond_context": empty.expand(batch, -1, -1), "guidance_scale": 3.0, "verbose": False}
        separate_neutral = denoise(unet, scheduler, noise, context=neutral.expand(batch, -1, -1), **branches)
        self.assertTrue(torch.equal(result.neutral_latent, separate_neutral))
        for index, step in enumerate(result.swap_steps):
            separate = denoise(unet, scheduler, noise, context=neutral.expand(batch, -1, -1),
                               hooks=[PromptSwapHook(step, target.expand(batch, -1, -1))], **branches)  # fmt: skip
            self.assertTrue(torch.equal(result.swap_latents[index], separate), f"swap at {step}")
        separate_calls = counter.calls - shared_calls
        counter.handle.remove()
        # shared: 10 neutral steps + (10 - 8) + (10 - 5) + (10 - 2); separate: 10 for each of the 4 runs
        self.assertEqual((shared_calls, result.num_model_calls, separate_calls), (25, 25, 40))
        # the Bézier frames run from the neutral latent to the earliest swap's
        self.assertEqual(tuple(result.frame_latents.shape), (6, *shape))
        self.assertTrue(torch.equal(result.frame_latents[0], result.neutral_latent))
        self.assertTrue(torch.equal(result.frame_latents[-1], result.swap_latents[-1]))
        frames = traversal().decode(result.frame_latents, autoencoder)
        self.assertEqual(tuple(frames.shape), (6, batch, 1, *(2 * s for s in shape[2:])))

    def test_clipped_sweep_equals_separate_clipped_runs(self):
        # a step hook of the sweep runs in the shared neutral prefix and in every swap, as in separate runs
        autoencoder, unet = tiny_networks(2)
        neutral, target, empty = prompts()
        noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        clip = ClipOriginalSampleHook(scheduler, [-0.05, -0.1], [0.05, 0.1])  # tight: every step is clipped
        result = traversal(hooks=[clip])(noise, unet, autoencoder, neutral, target, empty)
        unclipped = traversal()(noise, unet, autoencoder, neutral, target, empty)
        self.assertFalse(torch.allclose(result.neutral_latent, unclipped.neutral_latent))
        separate_scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        separate_scheduler.set_timesteps(STEPS)
        branches = {"uncond_context": empty.expand(2, -1, -1), "guidance_scale": 3.0, "verbose": False}
        context = neutral.expand(2, -1, -1)
        separate_neutral = denoise(unet, separate_scheduler, noise, context=context, hooks=[clip], **branches)
        self.assertTrue(torch.equal(result.neutral_latent, separate_neutral))
        for index, step in enumerate(result.swap_steps):
            swap = PromptSwapHook(step, target.expand(2, -1, -1))
            separate = denoise(unet, separate_scheduler, noise, context=context, hooks=[swap, clip], **branches)
            self.assertTrue(torch.equal(result.swap_latents[index], separate), f"swap at {step}")
        # DDIM's last step returns the clipped x̂₀ itself: the final latents lie within the bounds
        self.assertLessEqual(float(result.swap_latents[:, :, 0].abs().max()), 0.05 + 1e-6)
        self.assertLessEqual(float(result.swap_latents[:, :, 1].abs().max()), 0.1 + 1e-6)

    def test_swap_changes_the_result_and_a_swap_at_zero_is_the_target(self):
        autoencoder, unet = tiny_networks(2)
        neutral, target, empty = prompts()
        noise = torch.randn(1, 2, 8, 8)
        result = traversal(swap_steps=[0, 9])(noise, unet, autoencoder, neutral, target, empty)
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        scheduler.set_timesteps(STEPS)
        target_only = denoise(unet, scheduler, noise, context=target, uncond_context=empty, guidance_scale=3.0,
                              verbose=False)  # fmt: skip
        self.assertTrue(torch.equal(result.swap_latents[1], target_only))
        self.assertFalse(torch.allclose(result.swap_latents[0], result.neutral_latent))

    def test_swap_hook_broadcasts_one_prompt(self):
        _, unet = tiny_networks(2)
        neutral, target, empty = prompts()
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        scheduler.set_timesteps(STEPS)
        noise = torch.randn(3, 2, 8, 8)
        branches = {"uncond_context": empty, "guidance_scale": 3.0, "verbose": False}
        one = denoise(unet, scheduler, noise, context=neutral, hooks=[PromptSwapHook(4, target)], **branches)
        each = denoise(unet, scheduler, noise, context=neutral, hooks=[PromptSwapHook(4, target.expand(3, -1, -1))],
                       **branches)  # fmt: skip
        self.assertTrue(torch.equal(one, each))

    def test_real_scan_start_reconstructs_at_the_neutral_end(self):
        autoencoder, unet = tiny_networks(2)
        for parameter in unet.parameters():  # a smooth denoiser, so that fixed-point inversion converges
            parameter.data.mul_(0.3)
        neutral, target, empty = prompts()
        images = torch.rand(2, 1, 16, 16)
        inferer = traversal(start="image", inversion_fixed_point_iterations=6, num_inference_steps=20, swap_steps=[5])
        result = inferer(images, unet, autoencoder, neutral, target, empty)
        with torch.no_grad():
            latent = autoencoder.encode(images)[0] * 0.7
        error = float((result.neutral_latent - latent).norm() / latent.norm())
        self.assertLess(error, 1e-3)
        self.assertGreater(float((result.initial_latent - latent).norm() / latent.norm()), 0.2)


class TestCurves(unittest.TestCase):
    def test_bezier_matches_the_closed_form(self):
        points = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]], dtype=torch.float32)
        frames = bezier_curve(points, 5)
        s = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
        expected = (1 - s) ** 2 * points[0].double() + 2 * (1 - s) * s * points[1].double() + s**2 * points[2].double()
        torch.testing.assert_close(frames.double(), expected, atol=1e-6, rtol=0)
        self.assertEqual(frames.dtype, torch.float32)
        self.assertTrue(torch.equal(frames[0], points[0]) and torch.equal(frames[-1], points[-1]))
        # many control points stay finite and in their convex hull (the float64 weights sum to 1)
        many = bezier_curve(torch.randn(40, 3, 4, 4), 50)
        self.assertTrue(torch.isfinite(many).all())
        line = linear_path(torch.zeros(2), torch.ones(2), 3)
        torch.testing.assert_close(line, torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]))

    def test_bad_curves(self):
        with self.assertRaisesRegex(ValueError, "control_points"):
            bezier_curve(torch.zeros(1, 3), 5)
        with self.assertRaisesRegex(ValueError, "num_frames"):
            bezier_curve(torch.zeros(2, 3), 1)


class TestBadInput(unittest.TestCase):
    def test_bad_arguments(self):
        cases = [
            ("swap_steps", {"swap_steps": []}),
            ("swap_steps", {"swap_steps": [2, 2]}),
            ("swap_steps", {"swap_steps": [10]}),
            ("swap_steps", {"swap_steps": [-1]}),
            ("swap_steps", {"swap_steps": [2.5]}),
            ("num_frames", {"num_frames": 1}),
            ("guidance_scale", {"guidance_scale": float("inf")}),
            ("start", {"start": "scan"}),
            ("timestep_spacing", {"timestep_spacing": "uniform"}),
            ("num_inference_steps", {"timestep_spacing": "trailing", "num_inference_steps": 30}),  # 30 ∤ 100
            ("hooks", {"hooks": [object()]}),
        ]
        for name, kwargs in cases:
            with self.subTest(name=name, kwargs=kwargs), self.assertRaisesRegex(ValueError, f"`{name}`"):
                traversal(**kwargs)
        with self.assertRaisesRegex(ValueError, "DDIMScheduler"):
            TrajectoryTraversalInferer(DDPMScheduler(num_train_timesteps=100))

    def test_bad_inputs(self):
        autoencoder, unet = tiny_networks(2)
        neutral, target, empty = prompts()
        with self.assertRaisesRegex(ValueError, "spatial dimensions"):
            traversal()(torch.randn(1, 2, 4, 4, 4), unet, autoencoder, neutral, target, empty)
        with self.assertRaisesRegex(ValueError, "multiple of 4"):
            traversal(start="image")(torch.rand(1, 1, 18, 16), unet, autoencoder, neutral, target, empty)
        with self.assertRaisesRegex(ValueError, "`target_context`"):
            traversal()(torch.randn(1, 2, 8, 8), unet, autoencoder, neutral, target[..., :4], empty)
        with self.assertRaisesRegex(ValueError, "`inputs`"):
            traversal()(torch.full((1, 2, 8, 8), float("nan")), unet, autoencoder, neutral, target, empty)
        with self.assertRaisesRegex(ValueError, "channels"):
            traversal()(torch.randn(1, 3, 8, 8), unet, autoencoder, neutral, target, empty)
        with self.assertRaisesRegex(ValueError, "swap_step"):
            PromptSwapHook(-1, target)


if __name__ == "__main__":
    unittest.main()
