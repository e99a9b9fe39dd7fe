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
"""Tests of the one loop's capabilities: inversion as a step, gradients in a hook's phase, extra network outputs,
continuing from a saved state; and the equality of ``ddim_invert`` on the loop with its previous implementation."""

from __future__ import annotations

import itertools
import unittest

import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler
from parameterized import parameterized

from monai_cfx.inferers import KeepSamples, SamplingHook, ddim_invert, denoise
from monai_cfx.networks.schedulers import DDIMInverseScheduler, ddim_inversion_step, inversion_timesteps
from tests.helpers import CONTEXT_DIM, tiny_networks

LATENT_SHAPE = (2, 2, 8, 8)


def previous_ddim_invert(
    model, scheduler, latent, num_inference_steps, context=None, uncond_context=None, guidance_scale=1.0,
    end_fraction=1.0, fixed_point_iterations=0, timestep_spacing="linspace", per_row_timesteps=True,
):  # fmt: skip
    """The loop that ``ddim_invert`` ran before it moved onto the one loop, kept as this test's oracle: both
    branches whenever ``uncond_context`` is given, and the timesteps passed per row as a long tensor ``(B,)``
    (``per_row_timesteps=False`` passes them as the loop does, one float row that broadcasts, as MONAI's
    ``DiffusionInferer.sample``)."""
    timesteps = inversion_timesteps(scheduler, num_inference_steps, end_fraction, spacing=timestep_spacing).tolist()
    guided = uncond_context is not None
    model_context = torch.cat([uncond_context, context]) if guided else context

    def guided_output(current, timestep):
        model_input = torch.cat([current, current]) if guided else current
        if per_row_timesteps:
            model_timesteps = torch.full((model_input.shape[0],), timestep, dtype=torch.long)
        else:
            model_timesteps = torch.Tensor((timestep,))
        output = model(model_input, model_timesteps, context=model_context)
        if guided:
            output_uncond, output_cond = output.chunk(2)
            output = output_uncond + guidance_scale * (output_cond - output_uncond)
        return output

    sample = latent
    with torch.no_grad():
        for timestep in timesteps:
            previous = sample
            sample, _ = ddim_inversion_step(scheduler, guided_output(previous, timestep), timestep, previous)
            for _ in range(fixed_point_iterations):
                sample, _ = ddim_inversion_step(scheduler, guided_output(sample, timestep), timestep, previous)
    return sample


def conditioning(batch_size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch_size, 3, CONTEXT_DIM, generator=generator) for _ in range(2))  # type: ignore


# prediction type, spacing, guidance (None: the conditional branch alone), fixed-point iterations
EQUALITY_CASES = [
    [f"{prediction}_{spacing}_{guidance}_{iterations}", prediction, spacing, guidance, iterations]
    for prediction, spacing, (guidance, iterations) in itertools.product(
        ("epsilon", "v_prediction"), ("linspace", "leading", "trailing"), ((None, 0), (0.0, 0), (3.0, 0), (None, 2))
    )
]


class TestInversionOnTheLoop(unittest.TestCase):
    @parameterized.expand(EQUALITY_CASES)
    def test_equals_the_previous_implementation(self, _, prediction_type, spacing, guidance, iterations):
        _, unet = tiny_networks(2)
        latent = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
        cond, uncond = conditioning()
        branches = {"context": cond} if guidance is None else {"context": cond, "uncond_context": uncond}
        if guidance is not None:
            branches["guidance_scale"] = guidance

        def invert(function, **kwargs):
            scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type=prediction_type, clip_sample=False)
            return function(unet, scheduler, latent, 10, end_fraction=0.7, fixed_point_iterations=iterations,
                            timestep_spacing=spacing, **branches, **kwargs)  # fmt: skip

        ours = invert(ddim_invert, verbose=False)
        # bit for bit when the time embedding is computed as the loop computes it (one row, broadcast) ...
        self.assertTrue(torch.equal(ours, invert(previous_ddim_invert, per_row_timesteps=False)))
        # ... and within float rounding of the previous per-row embedding (the linear layers round differently)
        torch.testing.assert_close(ours, invert(previous_ddim_invert), atol=2e-5, rtol=1e-5)

    def test_hooks_run_during_inversion(self):
        _, unet = tiny_networks(2)
        latent = torch.randn(LATENT_SHAPE)
        first, second = conditioning()
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)

        class SwapAndRecord(SamplingHook):
            def __init__(self):
                self.seen = []

            def before_model(self, state):
                self.seen.append((state.step_index, int(state.timestep)))
                if state.step_index >= 4:
                    state.context = second

        hook = SwapAndRecord()
        swapped = ddim_invert(unet, scheduler, latent, 10, context=first, hooks=[hook], verbose=False)
        self.assertEqual(hook.seen, list(enumerate(inversion_timesteps(scheduler, 10).tolist())))
        # the same inversion in two runs of the loop with the inverse scheduler: 4 steps under the first prompt,
        # then the rest under the second one
        inverse = DDIMInverseScheduler(scheduler)
        inverse.set_timesteps(10)
        kept = KeepSamples([3])
        denoise(unet, inverse, latent, context=first, hooks=[kept], verbose=False)
        tail = denoise(unet, inverse, kept.samples[3], context=second, start_step=4, verbose=False)
        self.assertTrue(torch.equal(swapped, tail))

    @parameterized.expand([["2d", 2, (1, 2, 8, 8)], ["3d", 3, (1, 2, 4, 4, 4)]])
    def test_round_trip_on_the_loop(self, _, spatial_dims, shape):
        # a near-exact round trip: fixed-point inversion, then sampling back with the same scheduler
        _, unet = tiny_networks(spatial_dims)
        for parameter in unet.parameters():  # a smooth denoiser (the perturbed one is far from a trained one)
            parameter.data.mul_(0.3)
        latent = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        context, _ = conditioning(1)
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        noise = ddim_invert(unet, scheduler, latent, 20, context=context, fixed_point_iterations=6, verbose=False)
        back = denoise(unet, scheduler, noise, context=context, verbose=False)
        self.assertLess(float((back - latent).norm() / latent.norm()), 1e-3)
        self.assertGreater(float((noise - latent).norm() / latent.norm()), 0.2)  # it did move towards noise


class TestLoopCapabilities(unittest.TestCase):
    def test_no_hooks_equals_monai_diffusion_inferer(self):
        _, unet = tiny_networks(3)
        noise, context = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 3, CONTEXT_DIM)
        results = []
        for run in ("monai", "ours"):
            scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
            scheduler.set_timesteps(10)
            if run == "monai":
                results.append(
                    DiffusionInferer(scheduler).sample(noise, unet, scheduler, conditioning=context, verbose=False)
                )
            else:
                results.append(denoise(unet, scheduler, noise, context=context, verbose=False))
        self.assertTrue(torch.equal(*results))

    def test_gradients_only_in_the_phases_a_hook_asks_for(self):
        _, unet = tiny_networks(2)
        scheduler = DDIMScheduler(num_train_timesteps=100)
        scheduler.set_timesteps(4)
        noise, context = torch.randn(LATENT_SHAPE), torch.randn(2, 3, CONTEXT_DIM)

        class Guide(SamplingHook):
            """Gradient of the network output's mean with respect to the sample, through the network."""

            grad_phases = ("before_model", "model", "after_model")

            def __init__(self):
                self.gradients, self.grad_enabled = [], {}

            def before_model(self, state):
                self.grad_enabled["before_model"] = torch.is_grad_enabled()
                state.sample = state.sample.detach().requires_grad_(True)

            def after_model(self, state):
                self.grad_enabled["after_model"] = torch.is_grad_enabled()
                (gradient,) = torch.autograd.grad(state.model_output.mean(), state.sample)
                self.gradients.append(gradient)
                state.model_output = state.model_output.detach() - 0.1 * gradient

        class Watch(SamplingHook):
            def __init__(self):
                self.grad_enabled = []

            def before_model(self, state):
                self.grad_enabled.append(torch.is_grad_enabled())

            def after_step(self, state):
                self.grad_enabled.append(torch.is_grad_enabled())
                self.step_result_has_graph = state.sample.grad_fn is not None

        guide, watch = Guide(), Watch()
        result = denoise(unet, scheduler, noise, context=context, hooks=[guide, watch], verbose=False)
        self.assertEqual(guide.grad_enabled, {"before_model": True, "after_model": True})
        self.assertEqual(watch.grad_enabled, [False] * 8)  # every other phase keeps no_grad
        self.assertFalse(watch.step_result_has_graph)
        self.assertEqual(len(guide.gradients), 4)
        self.assertTrue(all(g.abs().sum() > 0 for g in guide.gradients))
        self.assertFalse(result.requires_grad)
        self.assertTrue(torch.is_grad_enabled())
        plain = denoise(unet, scheduler, noise, context=context, verbose=False)
        self.assertFalse(torch.allclose(result, plain))

    def test_extra_outputs_reach_the_state(self):
        _, unet = tiny_networks(2)

        class WithLogits(torch.nn.Module):
            """A denoiser that also returns one logit per row (e.g. a joint classifier)."""

            def __init__(self):
                super().__init__()
                self.unet = unet

            def forward(self, x, timesteps, context=None, class_labels=None):
                output = self.unet(x, timesteps, context=context, class_labels=class_labels)
                return output, x.flatten(1).mean(1, keepdim=True)

        class Read(SamplingHook):
            def __init__(self):
                self.extra = []

            def after_model(self, state):
                self.extra.append(state.extra_outputs)

        scheduler = DDIMScheduler(num_train_timesteps=100)
        scheduler.set_timesteps(3)
        noise, cond, uncond = torch.randn(LATENT_SHAPE), *conditioning()
        plain = denoise(unet, scheduler, noise, context=cond, uncond_context=uncond, guidance_scale=2.0, verbose=False)
        read = Read()
        joint = denoise(WithLogits(), scheduler, noise, context=cond, uncond_context=uncond, guidance_scale=2.0,
                        hooks=[read], verbose=False)  # fmt: skip
        self.assertTrue(torch.equal(plain, joint))  # the noise prediction is the first output, guided as before
        self.assertEqual([len(extra) for extra in read.extra], [1, 1, 1])
        self.assertEqual(tuple(read.extra[0][0].shape), (4, 1))  # the guided batch's rows [uncond, cond]
        read_plain = Read()
        denoise(unet, scheduler, noise, context=cond, hooks=[read_plain], verbose=False)
        self.assertEqual(read_plain.extra, [(), (), ()])  # plain MONAI UNets are unchanged

    def test_continuations_share_a_prefix(self):
        _, unet = tiny_networks(2)
        scheduler = DDIMScheduler(num_train_timesteps=100)
        scheduler.set_timesteps(10)
        noise, (neutral, target) = torch.randn(LATENT_SHAPE), conditioning()

        class SwapAt(SamplingHook):
            def __init__(self, step):
                self.step, self.indices = step, []

            def before_model(self, state):
                self.indices.append(state.step_index)
                state.context = target if state.step_index >= self.step else neutral

        kept = KeepSamples([2, 5])
        denoise(unet, scheduler, noise, context=neutral, hooks=[kept], verbose=False)
        self.assertEqual(sorted(kept.samples), [2, 5])
        for swap_step in (3, 6):
            separate_hook, continued_hook = SwapAt(swap_step), SwapAt(swap_step)
            separate = denoise(unet, scheduler, noise, context=neutral, hooks=[separate_hook], verbose=False)
            continued = denoise(unet, scheduler, kept.samples[swap_step - 1], context=neutral, start_step=swap_step,
                                hooks=[continued_hook], verbose=False)  # fmt: skip
            self.assertTrue(torch.equal(separate, continued))
            self.assertEqual(continued_hook.indices, list(range(swap_step, 10)))  # global step indices
        finished = denoise(unet, scheduler, noise, context=neutral, start_step=10, verbose=False)
        self.assertIs(finished, noise)

    def test_bad_input(self):
        _, unet = tiny_networks(2)
        scheduler = DDIMScheduler(num_train_timesteps=100)
        scheduler.set_timesteps(4)
        noise, context = torch.randn(LATENT_SHAPE), torch.randn(2, 3, CONTEXT_DIM)
        cases = [
            ("start_step", {"start_step": 5}),
            ("start_step", {"start_step": -1}),
            ("guidance_scale", {"guidance_scale": float("nan"), "uncond_context": context}),
            ("fixed_point_iterations", {"fixed_point_iterations": -1}),
            ("context", {"context": torch.randn(3, 3, CONTEXT_DIM)}),
            ("uncond_context", {"uncond_context": torch.randn(2, 4, CONTEXT_DIM)}),
            ("sample", {"sample": noise.long()}),
            ("timesteps", {"timesteps": scheduler.timesteps[4:]}),  # an empty tail
            ("fixed_point_iterations", {"fixed_point_iterations": 2}),  # only inversion re-solves its steps
        ]
        for name, overrides in cases:
            arguments = {"sample": noise, "context": context, **overrides}
            with self.subTest(name=name), self.assertRaisesRegex(ValueError, f"`{name}`"):
                denoise(unet, scheduler, verbose=False, **arguments)
        with self.assertRaisesRegex(ValueError, "DDIMScheduler"):
            DDIMInverseScheduler(object())

    def test_ddim_invert_keeps_its_import_path(self):
        from monai_cfx.networks import schedulers

        self.assertIs(schedulers.ddim_invert, ddim_invert)


if __name__ == "__main__":
    unittest.main()
