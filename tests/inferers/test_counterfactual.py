from __future__ import annotations

import unittest

import torch
from monai.data import MetaTensor
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from parameterized import parameterized

from monai_cfx.inferers import CounterfactualInferer, SamplingHook
from monai_cfx.networks import encode_mean
from monai_cfx.networks.schedulers import ddim_invert
from tests.helpers import CONTEXT_DIM, tiny_networks

SCALE = 0.7


def images_like(spatial_dims: int, batch: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 1) + (size,) * spatial_dims, generator=generator)


def inferer(**kwargs) -> CounterfactualInferer:
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("guidance_scale", 1.0)
    return CounterfactualInferer(DDIMScheduler(num_train_timesteps=100, clip_sample=False), SCALE, **kwargs)


class DecodeSpy:
    """Wraps an autoencoder and keeps the (scaled) latents that were decoded."""

    def __init__(self, autoencoder):
        self.latents = []
        self._decode = autoencoder.decode_stage_2_outputs
        autoencoder.decode_stage_2_outputs = self

    def __call__(self, latent):
        self.latents.append(latent * SCALE)
        return self._decode(latent)


class TestCounterfactualInferer(unittest.TestCase):
    @parameterized.expand([["2d", 2], ["3d", 3]])
    def test_full_strength_equals_monai_sampling_from_the_noised_latent(self, _, spatial_dims):
        autoencoder, unet = tiny_networks(spatial_dims)
        images = images_like(spatial_dims)
        context = torch.randn(2, 3, CONTEXT_DIM)
        ours = inferer(noise_strength=1.0, num_inference_steps=10)(images, unet, autoencoder, context, seed=5)

        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        scheduler.set_timesteps(10)
        with torch.no_grad():
            latent = autoencoder.encode(images)[0] * SCALE
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
        start = scheduler.add_noise(latent, noise, scheduler.timesteps[:1])
        theirs = LatentDiffusionInferer(scheduler, scale_factor=SCALE).sample(
            start, autoencoder, unet, conditioning=context, verbose=False
        )
        self.assertTrue(torch.equal(ours, theirs))

    def test_inversion_round_trip_reconstructs_the_autoencoder_output(self):
        autoencoder, unet = tiny_networks(2)
        images = images_like(2)
        context = torch.randn(2, 3, CONTEXT_DIM)
        spy = DecodeSpy(autoencoder)
        edit = inferer(
            noise_strength=1.0, num_inference_steps=50, start="inversion", inversion_fixed_point_iterations=3
        )
        # the same context for inversion and sampling: the edit must give the input's latent back
        edit(images, unet, autoencoder, context, context)
        with torch.no_grad():
            latent = encode_mean(autoencoder, images) * SCALE
        error = (spy.latents[-1] - latent).norm() / latent.norm()
        self.assertLess(float(error), 0.01)

    @parameterized.expand([["leading", "leading"], ["trailing", "trailing"]])
    def test_spacing_of_stable_diffusion_schedules(self, _, spacing):
        # the edit runs the tail of the spaced schedule, and the inversion the same steps back
        autoencoder, unet = tiny_networks(2)
        images, context = images_like(2), torch.randn(2, 3, CONTEXT_DIM)
        visited = []

        class Steps(SamplingHook):
            def before_model(self, state):
                visited.append(int(state.timestep))

        edit = inferer(noise_strength=0.6, num_inference_steps=10, start="inversion", timestep_spacing=spacing)
        expected = {"leading": [50, 40, 30, 20, 10, 0], "trailing": [59, 49, 39, 29, 19, 9]}[spacing]
        spy = DecodeSpy(autoencoder)
        edit(images, unet, autoencoder, context, context, hooks=[Steps()])
        self.assertEqual(visited, expected)
        with torch.no_grad():
            latent = encode_mean(autoencoder, images) * SCALE
        round_trip = inferer(noise_strength=1.0, num_inference_steps=50, start="inversion", timestep_spacing=spacing,
                             inversion_fixed_point_iterations=3)  # fmt: skip
        round_trip(images, unet, autoencoder, context, context)
        self.assertLess(float((spy.latents[-1] - latent).norm() / latent.norm()), 0.01)

    def test_strength_and_seed(self):
        autoencoder, unet = tiny_networks(2)
        images = images_like(2)
        context = torch.randn(1, 3, CONTEXT_DIM)
        edit = inferer(noise_strength=0.3, num_inference_steps=10)
        first, again = (
            edit(images, unet, autoencoder, context, seed=1),
            edit(images, unet, autoencoder, context, seed=1),
        )
        self.assertTrue(torch.equal(first, again))
        self.assertFalse(torch.equal(first, edit(images, unet, autoencoder, context, seed=2)))
        # one seed per image: an image's counterfactual does not depend on its batch
        batch = edit(images, unet, autoencoder, context, seed=[3, 4])
        alone = edit(images[1:], unet, autoencoder, context, seed=[4])
        torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=1e-5)
        # a stronger edit moves further from the input
        with torch.no_grad():
            reconstruction = autoencoder.decode_stage_2_outputs(encode_mean(autoencoder, images))
        weak = (edit(images, unet, autoencoder, context, seed=0, noise_strength=0.1) - reconstruction).abs().mean()
        strong = (edit(images, unet, autoencoder, context, seed=0, noise_strength=1.0) - reconstruction).abs().mean()
        self.assertLess(float(weak), float(strong))
        self.assertEqual(edit.num_edit_steps(0.3), 3)

    @parameterized.expand([["noise", "noise"], ["inversion", "inversion"]])
    def test_region_mask_keeps_the_latent_outside(self, _, start):
        autoencoder, unet = tiny_networks(2)
        images = images_like(2, size=16)
        region = torch.zeros(2, 1, 16, 16)
        region[:, :, 4:8, 4:8] = 1  # latent cells (2..3, 2..3) at factor 2
        spy = DecodeSpy(autoencoder)
        edit = inferer(noise_strength=0.6, num_inference_steps=10, start=start, guidance_scale=3.0)
        context, uncond = torch.randn(2, 3, CONTEXT_DIM), torch.randn(2, 3, CONTEXT_DIM)
        edit(images, unet, autoencoder, context, uncond, region_mask=region, seed=0)
        with torch.no_grad():
            latent = encode_mean(autoencoder, images) * SCALE
        edited = spy.latents[-1]
        outside = torch.ones_like(latent, dtype=torch.bool)
        outside[:, :, 2:4, 2:4] = False
        torch.testing.assert_close(edited[outside], latent[outside], atol=1e-5, rtol=1e-5)
        self.assertGreater(float((edited[~outside] - latent[~outside]).abs().max()), 1e-3)

    @parameterized.expand([["noise", "noise"], ["inversion", "inversion"]])
    def test_region_blending_follows_the_input_at_every_step(self, _, start):
        autoencoder, unet = tiny_networks(2)
        images = images_like(2, size=16)
        region = torch.zeros(2, 1, 16, 16)
        region[:, :, 4:8, 4:8] = 1
        num_steps, edit = 6, inferer(noise_strength=0.6, num_inference_steps=10, start=start, guidance_scale=3.0)
        context, uncond = torch.randn(2, 3, CONTEXT_DIM), torch.randn(2, 3, CONTEXT_DIM)

        class Record(SamplingHook):  # before_model of step i sees the blended sample of step i - 1
            samples: list = []

            def before_model(self, state):
                Record.samples.append(state.sample.clone())

        edit(images, unet, autoencoder, context, uncond, region_mask=region, seed=3, hooks=[Record()])
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        with torch.no_grad():
            latent = encode_mean(autoencoder, images) * SCALE
            if start == "inversion":
                _, path = ddim_invert(unet, scheduler, latent, 10, context=uncond, end_fraction=0.6,
                                      return_trajectory=True, verbose=False)  # fmt: skip
                expected = [path[num_steps - 1 - i] for i in range(num_steps - 1)]
            else:
                scheduler.set_timesteps(10)
                noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
                levels = [int(t) - 10 for t in scheduler.timesteps[10 - num_steps :][:-1]]
                expected = [scheduler.add_noise(latent, noise, torch.tensor([level])) for level in levels]
        outside = torch.ones_like(latent, dtype=torch.bool)
        outside[:, :, 2:4, 2:4] = False
        self.assertEqual(len(Record.samples), num_steps)
        for step, (seen, known) in enumerate(zip(Record.samples[1:], expected)):
            torch.testing.assert_close(seen[outside], known[outside], atol=1e-5, rtol=1e-5, msg=f"step {step}")

    def test_odd_padding_keeps_the_image_aligned(self):
        autoencoder, unet = tiny_networks(2)
        images = images_like(2, batch=1, size=13)  # padded to 16 for the factor-4 networks: 3 pixels
        encoded, decoded = [], []
        encode, decode = autoencoder.encode, autoencoder.decode_stage_2_outputs
        autoencoder.encode = lambda x: (encoded.append(x), encode(x))[1]
        autoencoder.decode_stage_2_outputs = lambda z: (decoded.append(decode(z)), decoded[-1])[1]
        result = inferer(noise_strength=0.5, num_inference_steps=4)(images, unet, autoencoder, torch.randn(1, 3, 8))
        self.assertEqual(tuple(encoded[0].shape[2:]), (16, 16))
        torch.testing.assert_close(encoded[0][:, :, :13, :13], images)
        torch.testing.assert_close(result, decoded[0][:, :, :13, :13])

    def test_meta_padding_and_3d(self):
        autoencoder, unet = tiny_networks(3)
        affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
        images = MetaTensor(images_like(3, batch=1, size=6), affine=affine, meta={"filename_or_obj": "scan.nii.gz"})
        result = inferer(noise_strength=0.5, num_inference_steps=4)(images, unet, autoencoder, torch.randn(1, 3, 8))
        self.assertIsInstance(result, MetaTensor)
        self.assertEqual(result.shape, images.shape)  # 6 is padded to 8 for the factor-4 networks, then cropped
        torch.testing.assert_close(result.affine, images.affine)
        self.assertEqual(result.meta["filename_or_obj"], "scan.nii.gz")

    def test_hooks_run_on_the_one_loop(self):
        autoencoder, unet = tiny_networks(2)

        class Count(SamplingHook):
            steps = 0

            def after_step(self, state):
                Count.steps += 1

        inferer(noise_strength=0.5, num_inference_steps=10)(
            images_like(2), unet, autoencoder, torch.randn(1, 3, 8), hooks=[Count()]
        )
        self.assertEqual(Count.steps, 5)

    @parameterized.expand(
        [
            ("inversion_guided", "inversion", 3.0, 0, None),
            ("noise_unguided", "noise", 1.0, 0, None),
            ("fixed_point", "inversion", 3.0, 2, None),
            ("guided_steps", "inversion", 3.0, 0, 2),
        ]
    )
    def test_unet_evaluations_are_counted(self, _, start, guidance_scale, fixed_point_iterations, guided_steps):
        autoencoder, unet = tiny_networks(2)
        rows = []
        handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
        edit = inferer(noise_strength=0.6, num_inference_steps=10, start=start, guidance_scale=guidance_scale,
                       inversion_fixed_point_iterations=fixed_point_iterations, guided_steps=guided_steps)  # fmt: skip
        batch = 2
        edit(images_like(2, batch), unet, autoencoder, torch.randn(1, 3, CONTEXT_DIM), torch.randn(1, 3, CONTEXT_DIM))
        handle.remove()
        self.assertEqual(sum(rows), batch * edit.num_unet_evaluations())
        inversion = {"inversion": 6 * (1 + fixed_point_iterations), "noise": 0}[start]
        both = 0 if guidance_scale == 1 else (6 if guided_steps is None else guided_steps)
        self.assertEqual(edit.num_unet_evaluations(), inversion + 6 + both)

    def test_guided_steps_keep_the_guided_start_and_end_unguided(self):
        autoencoder, unet = tiny_networks(2)
        contexts = torch.randn(1, 3, CONTEXT_DIM), torch.randn(1, 3, CONTEXT_DIM)
        images = images_like(2)
        edits = {steps: inferer(noise_strength=0.6, num_inference_steps=10, start="inversion", guidance_scale=3.0,
                                guided_steps=steps)(images, unet, autoencoder, *contexts)
                 for steps in (None, 6, 0)}  # fmt: skip
        torch.testing.assert_close(edits[6], edits[None])  # every one of the 6 edit steps guided: unchanged
        unguided = inferer(noise_strength=0.6, num_inference_steps=10, start="inversion", guidance_scale=1.0)
        torch.testing.assert_close(edits[0], unguided(images, unet, autoencoder, *contexts))
        with self.assertRaisesRegex(ValueError, "guided_steps"):
            inferer(guided_steps=-1)

    def test_bad_input(self):
        autoencoder, unet = tiny_networks(2)
        images, context = images_like(2), torch.randn(2, 3, CONTEXT_DIM)
        for strength in (0, 1.5, -0.1, True, "0.5"):
            with self.assertRaisesRegex(ValueError, "noise_strength"):
                inferer(noise_strength=strength)
        with self.assertRaisesRegex(ValueError, "noise_strength"):
            inferer()(images, unet, autoencoder, context, noise_strength=0.0)
        with self.assertRaisesRegex(ValueError, "`conditioning` must have one entry per image"):
            inferer()(images, unet, autoencoder, torch.randn(3, 3, CONTEXT_DIM))
        with self.assertRaisesRegex(ValueError, "3 spatial dimensions.*2D network"):
            inferer()(images_like(3), unet, autoencoder, context)
        with self.assertRaisesRegex(ValueError, "2 channels, but `autoencoder_model` takes 1"):
            inferer()(torch.rand(2, 2, 8, 8), unet, autoencoder, context)
        with self.assertRaisesRegex(ValueError, "region_mask"):
            inferer()(images, unet, autoencoder, context, region_mask=torch.ones(2, 1, 4, 4))
        with self.assertRaisesRegex(ValueError, "`seed` must be one int or one per image"):
            inferer()(images, unet, autoencoder, context, seed=[1, 2, 3])
        with self.assertRaisesRegex(ValueError, "start"):
            inferer(start="sdedit")
        with self.assertRaisesRegex(ValueError, "DDIMScheduler"):
            CounterfactualInferer(DDPMScheduler(num_train_timesteps=100), start="inversion")
        with self.assertRaisesRegex(ValueError, "DDIMScheduler or DDPMScheduler"):
            CounterfactualInferer(PNDMScheduler(num_train_timesteps=100))
        with self.assertRaisesRegex(ValueError, "num_inference_steps"):
            inferer(num_inference_steps=True)
        with self.assertRaisesRegex(ValueError, "inversion_fixed_point_iterations"):
            inferer(inversion_fixed_point_iterations=-1)
        with self.assertRaisesRegex(ValueError, "timestep_spacing"):
            inferer(timestep_spacing="karras")
        with self.assertRaisesRegex(ValueError, "`timestep_spacing='leading'` needs a DDIMScheduler"):
            CounterfactualInferer(DDPMScheduler(num_train_timesteps=100), timestep_spacing="leading")
        with self.assertRaisesRegex(ValueError, "must divide num_train_timesteps"):
            inferer(num_inference_steps=30, timestep_spacing="trailing")
        with self.assertRaisesRegex(ValueError, "inputs"):
            inferer()(images[0], unet, autoencoder, context)


if __name__ == "__main__":
    unittest.main()
