from __future__ import annotations

import itertools
import unittest

import torch
from monai.inferers import DiffusionInferer, LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from parameterized import parameterized

from monai_cfx.inferers import (
    CounterfactualInferer,
    Drift,
    DriftDiffusionInferer,
    DriftHook,
    DriftLatentDiffusionInferer,
    SamplingHook,
    denoise,
)
from tests.helpers import CONTEXT_DIM, tiny_networks

SCALE = 0.7
TRAIN_STEPS = 100
SAMPLE_STEPS = 8

# name, spatial dims, scheduler, shape of the diffusion model's input (the latent shape), image shape
CASES = [
    ["2d_ddpm", 2, DDPMScheduler, (2, 2, 8, 8), (2, 1, 16, 16)],
    ["2d_ddim", 2, DDIMScheduler, (2, 2, 8, 8), (2, 1, 16, 16)],
    ["3d_ddpm", 3, DDPMScheduler, (1, 2, 4, 4, 4), (1, 1, 8, 8, 8)],
    ["3d_ddim", 3, DDIMScheduler, (1, 2, 4, 4, 4), (1, 1, 8, 8, 8)],
]


def scheduler_of(scheduler_type, prediction_type: str = "epsilon"):
    scheduler = scheduler_type(num_train_timesteps=TRAIN_STEPS, prediction_type=prediction_type)
    scheduler.set_timesteps(SAMPLE_STEPS)
    return scheduler


def shift(delta, ndim: int) -> torch.Tensor:
    """δ broadcast over channel dim 1, written out independently of ``drift_tensor``."""
    values = torch.tensor(delta, dtype=torch.float32)
    return values.reshape(1, -1, *([1] * (ndim - 2))) if values.ndim else values


def reference_sampling(model, scheduler, noise, context, delta, initial=True, steps=True) -> torch.Tensor:
    """Latent Drifting sampling written out: ``z_T = noise + δ``, then ``x_{t-1} = step(x_t) + δ``."""
    sample = noise + shift(delta, noise.ndim) if initial else noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = model(sample, timesteps=torch.Tensor((t,)), context=context)
            sample, _ = scheduler.step(output, t, sample)
            if steps:
                sample = sample + shift(delta, noise.ndim)
    return sample


class RecordInputs(torch.nn.Module):
    """The wrapped denoiser, recording every input it is called with."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, timesteps, context=None, class_labels=None):
        self.inputs.append(x.clone())
        return self.model(x, timesteps=timesteps, context=context, class_labels=class_labels)


class RecordSamples(SamplingHook):
    def __init__(self) -> None:
        self.samples: list[torch.Tensor] = []

    def after_step(self, state):
        self.samples.append(state.sample.clone())


def training_data(latent_shape, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(latent_shape, generator=generator)
    noise = torch.randn(latent_shape, generator=generator)
    timesteps = torch.randint(0, TRAIN_STEPS, (latent_shape[0],), generator=generator).long()
    context = torch.randn(latent_shape[0], 3, CONTEXT_DIM, generator=generator)
    return inputs, noise, timesteps, context


class TestDrift(unittest.TestCase):
    def test_shapes_dtype_and_values(self):
        like = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
        scalar = Drift(0.5).tensor(like)
        self.assertEqual(tuple(scalar.shape), (1, 1, 1, 1))
        self.assertEqual(scalar.dtype, torch.float64)
        per_channel = Drift([0.1, -0.2, 0.3]).tensor(like)
        self.assertEqual(tuple(per_channel.shape), (1, 3, 1, 1))
        self.assertTrue(torch.equal((like + per_channel)[1, :, 3, 4], torch.tensor([0.1, -0.2, 0.3], dtype=like.dtype)))
        volume = torch.zeros(1, 2, 3, 3, 3)
        self.assertEqual(tuple(Drift(torch.tensor([1.0, 2.0])).tensor(volume).shape), (1, 2, 1, 1, 1))
        self.assertEqual(tuple(Drift(torch.tensor(1.0)).tensor(volume).shape), (1, 1, 1, 1, 1))

    def test_one_value_carried_unchanged(self):
        drift = Drift((0.1, 0.2))
        self.assertEqual(drift.tolist(), [0.1, 0.2])  # the checkpoint / JSON form
        self.assertEqual(Drift(drift.tolist()), drift)  # and back
        self.assertEqual(Drift(0.25).tolist(), 0.25)
        self.assertIsInstance(Drift(1).tolist(), float)
        self.assertNotEqual(Drift(0.1), Drift([0.1]))  # one number for all channels is not a per-channel list
        self.assertTrue(Drift(0.0).is_zero and Drift([0.0, 0.0]).is_zero and not Drift([0.0, 0.1]).is_zero)
        self.assertEqual(Drift(drift), drift)
        inferer = DriftDiffusionInferer(DDIMScheduler(), drift=drift)
        self.assertEqual(inferer.drift, drift)
        self.assertEqual(DriftHook(inferer.drift).drift, drift)

    def test_bad_drift(self):
        like = torch.zeros(2, 2, 4, 4)
        with self.assertRaisesRegex(
            ValueError, r"`drift` must be one number or one value per channel \(2\).*got 3 values"
        ):
            Drift([0.1, 0.2, 0.3]).tensor(like)
        for bad in ("abc", None, [], [0.1, "x"], True, [[0.1, 0.2]], torch.zeros(1, 2)):
            with self.assertRaisesRegex(ValueError, "`drift` must be a number or a non-empty sequence", msg=repr(bad)):
                Drift(bad)
        for bad in (float("nan"), [0.1, float("inf")]):
            with self.assertRaisesRegex(ValueError, "`drift` must be finite"):
                Drift(bad)
        with self.assertRaisesRegex(ValueError, "`direction` must be finite"):
            Drift([0.1, float("nan")], name="direction")


class TestDriftHook(unittest.TestCase):
    @parameterized.expand([["scalar", 0.25], ["per_channel", [0.3, -0.2]]])
    def test_shifts_every_reverse_step(self, _, delta):
        _, unet = tiny_networks(2)
        scheduler = scheduler_of(DDIMScheduler)
        noise, context = torch.randn(2, 2, 8, 8), torch.randn(2, 3, CONTEXT_DIM)
        drifted = denoise(unet, scheduler, noise, context=context, hooks=[DriftHook(delta)], verbose=False)
        expected = reference_sampling(unet, scheduler, noise, context, delta, initial=False)
        self.assertTrue(torch.equal(drifted, expected))

    def test_on_the_counterfactual_inferer(self):
        autoencoder, unet = tiny_networks(2)
        images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        context = torch.randn(2, 3, CONTEXT_DIM)
        edit = CounterfactualInferer(
            DDIMScheduler(num_train_timesteps=TRAIN_STEPS, clip_sample=False),
            SCALE,
            noise_strength=0.5,
            num_inference_steps=SAMPLE_STEPS,
            guidance_scale=1.0,
            verbose=False,
        )
        delta = [0.2, -0.1]
        plain, drifted = RecordSamples(), RecordSamples()
        plain_edit = edit(images, unet, autoencoder, context, seed=1, hooks=[plain])
        drifted_edit = edit(images, unet, autoencoder, context, seed=1, hooks=[DriftHook(delta), drifted])
        self.assertEqual(len(drifted.samples), SAMPLE_STEPS // 2)
        # same start, same first step: the drift is exactly δ after it, and changes the edit
        self.assertTrue(torch.equal(drifted.samples[0], plain.samples[0] + shift(delta, 4)))
        self.assertFalse(torch.allclose(drifted_edit, plain_edit, atol=1e-4))


class TestZeroDriftEqualsMonai(unittest.TestCase):
    @parameterized.expand(CASES)
    def test_diffusion_inferer(self, _, spatial_dims, scheduler_type, latent_shape, __):
        _, unet = tiny_networks(spatial_dims)
        inputs, noise, timesteps, context = training_data(latent_shape)
        ours, theirs = (
            DriftDiffusionInferer(scheduler_of(scheduler_type)),
            DiffusionInferer(scheduler_of(scheduler_type)),
        )
        with torch.no_grad():
            self.assertTrue(
                torch.equal(
                    ours(inputs, unet, noise, timesteps, condition=context),
                    theirs(inputs, unet, noise, timesteps, condition=context),
                )
            )
        samples = []
        for inferer in (ours, theirs):
            torch.manual_seed(1)  # DDPM draws its step noise from the global generator
            samples.append(inferer.sample(noise, unet, conditioning=context, verbose=False))
        self.assertTrue(torch.equal(samples[0], samples[1]))

    @parameterized.expand(CASES)
    def test_latent_diffusion_inferer(self, _, spatial_dims, scheduler_type, latent_shape, image_shape):
        autoencoder, unet = tiny_networks(spatial_dims)
        images = torch.rand(image_shape, generator=torch.Generator().manual_seed(2))
        _, noise, timesteps, context = training_data(latent_shape)
        ours = DriftLatentDiffusionInferer(scheduler_of(scheduler_type), scale_factor=SCALE)
        theirs = LatentDiffusionInferer(scheduler_of(scheduler_type), scale_factor=SCALE)
        predictions, samples = [], []
        for inferer in (ours, theirs):
            torch.manual_seed(1)  # the AutoencoderKL samples its posterior; DDPM draws step noise
            with torch.no_grad():
                predictions.append(inferer(images, autoencoder, unet, noise, timesteps, condition=context))
            samples.append(inferer.sample(noise, autoencoder, unet, conditioning=context, verbose=False))
        self.assertTrue(torch.equal(predictions[0], predictions[1]))
        self.assertTrue(torch.equal(samples[0], samples[1]))

    def test_latent_shape_padding(self):
        autoencoder, unet = tiny_networks(2)
        images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
        _, noise, timesteps, context = training_data((2, 2, 10, 10))
        shapes = {"ldm_latent_shape": [10, 10], "autoencoder_latent_shape": [8, 8]}
        ours = DriftLatentDiffusionInferer(scheduler_of(DDIMScheduler), scale_factor=SCALE, **shapes)
        theirs = LatentDiffusionInferer(scheduler_of(DDIMScheduler), scale_factor=SCALE, **shapes)
        outputs = []
        for inferer in (ours, theirs):
            torch.manual_seed(1)
            with torch.no_grad():
                prediction = inferer(images, autoencoder, unet, noise, timesteps, condition=context)
            outputs.append((prediction, inferer.sample(noise, autoencoder, unet, conditioning=context, verbose=False)))
        self.assertEqual(tuple(outputs[0][1].shape), (2, 1, 16, 16))
        self.assertTrue(torch.equal(outputs[0][0], outputs[1][0]))
        self.assertTrue(torch.equal(outputs[0][1], outputs[1][1]))

    def test_likelihood_is_monai_without_drift_only(self):
        _, unet = tiny_networks(2)
        inputs = torch.randn(1, 2, 8, 8)
        scheduler = DDPMScheduler(num_train_timesteps=20)
        scheduler.set_timesteps(20)
        likelihoods = []
        for inferer in (DriftDiffusionInferer(scheduler), DiffusionInferer(scheduler)):
            torch.manual_seed(1)  # it noises the inputs with the global generator
            likelihoods.append(inferer.get_likelihood(inputs, unet, verbose=False))
        self.assertTrue(torch.equal(likelihoods[0], likelihoods[1]))
        with self.assertRaisesRegex(NotImplementedError, "drift"):
            DriftDiffusionInferer(scheduler, drift=0.1).get_likelihood(inputs, unet, verbose=False)


class TestDriftPlaces(unittest.TestCase):
    @parameterized.expand([["2d", 2, (2, 2, 8, 8)], ["3d", 3, (1, 2, 4, 4, 4)]])
    def test_initial_sample_is_shifted_by_delta(self, _, spatial_dims, latent_shape):
        _, unet = tiny_networks(spatial_dims)
        recorder = RecordInputs(unet)
        noise, context = torch.randn(latent_shape), torch.randn(latent_shape[0], 3, CONTEXT_DIM)
        delta = [0.5, -0.25]
        DriftDiffusionInferer(scheduler_of(DDIMScheduler), drift=delta).sample(
            noise, recorder, conditioning=context, verbose=False
        )
        self.assertEqual(len(recorder.inputs), SAMPLE_STEPS)
        self.assertTrue(torch.equal(recorder.inputs[0], noise + shift(delta, noise.ndim)))
        torch.testing.assert_close(recorder.inputs[0][:, 1] - noise[:, 1], torch.full_like(noise[:, 1], -0.25))

    @parameterized.expand(
        [[f"noise{n}_initial{i}_steps{s}", n, i, s] for n, i, s in itertools.product((True, False), repeat=3)]
    )
    def test_each_switch_turns_off_its_own_place(self, _, drift_noise, drift_initial, drift_steps):
        _, unet = tiny_networks(2)
        inputs, noise, timesteps, context = training_data((2, 2, 8, 8))
        delta = [0.3, -0.2]
        inferer = DriftDiffusionInferer(
            scheduler_of(DDIMScheduler),
            drift=delta,
            drift_noise=drift_noise,
            drift_initial=drift_initial,
            drift_steps=drift_steps,
        )
        monai = DiffusionInferer(scheduler_of(DDIMScheduler))
        training_noise = noise + shift(delta, 4) if drift_noise else noise
        with torch.no_grad():
            prediction = inferer(inputs, unet, noise, timesteps, condition=context)
            self.assertTrue(torch.equal(prediction, monai(inputs, unet, training_noise, timesteps, condition=context)))
        sample = inferer.sample(noise, unet, conditioning=context, verbose=False)
        expected = reference_sampling(
            unet, inferer.scheduler, noise, context, delta, initial=drift_initial, steps=drift_steps
        )
        self.assertTrue(torch.equal(sample, expected))

    @parameterized.expand([["2d_ddpm", 2, DDPMScheduler, (2, 2, 8, 8), (2, 1, 16, 16)], CASES[3]])
    def test_latent_inferer(self, _, spatial_dims, scheduler_type, latent_shape, image_shape):
        autoencoder, unet = tiny_networks(spatial_dims)
        images = torch.rand(image_shape, generator=torch.Generator().manual_seed(2))
        _, noise, timesteps, context = training_data(latent_shape)
        delta = 0.2
        inferer = DriftLatentDiffusionInferer(scheduler_of(scheduler_type), scale_factor=SCALE, drift=delta)
        recorder = RecordInputs(unet)
        torch.manual_seed(3)
        with torch.no_grad():
            latents = autoencoder.encode_stage_2_inputs(images) * SCALE
        torch.manual_seed(3)  # the same posterior sample inside the inferer
        with torch.no_grad():
            inferer(images, autoencoder, recorder, noise, timesteps, condition=context)
        noised = inferer.scheduler.add_noise(latents, noise + delta, timesteps)
        self.assertTrue(torch.equal(recorder.inputs[0], noised))

        hook = RecordSamples()
        torch.manual_seed(4)
        decoded = inferer.sample(noise, autoencoder, unet, conditioning=context, hooks=[hook], verbose=False)
        torch.manual_seed(4)
        latent = reference_sampling(unet, inferer.scheduler, noise, context, delta)
        with torch.no_grad():
            self.assertTrue(torch.equal(decoded, autoencoder.decode_stage_2_outputs(latent / SCALE)))
        # the user's hooks run after the drift, on every step
        self.assertEqual(len(hook.samples), SAMPLE_STEPS)
        self.assertTrue(torch.equal(hook.samples[-1], latent))

    def test_sampling_hooks_order(self):
        extra = RecordSamples()
        hooks = DriftDiffusionInferer(DDIMScheduler(), drift=0.1).sampling_hooks([extra])
        self.assertIsInstance(hooks[0], DriftHook)
        self.assertIs(hooks[1], extra)
        self.assertEqual(
            DriftDiffusionInferer(DDIMScheduler(), drift=0.1, drift_steps=False).sampling_hooks([extra]), [extra]
        )


class TestTrainingTarget(unittest.TestCase):
    @parameterized.expand([["scalar", 0.4], ["per_channel", [0.4, -0.3]]])
    def test_epsilon(self, _, delta):
        _, unet = tiny_networks(2)
        recorder = RecordInputs(unet)
        inputs, noise, timesteps, context = training_data((2, 2, 8, 8))
        inferer = DriftDiffusionInferer(scheduler_of(DDPMScheduler), drift=delta)
        with torch.no_grad():
            inferer(inputs, recorder, noise, timesteps, condition=context)
        target = inferer.training_target(inputs, noise, timesteps)
        self.assertTrue(torch.equal(target, noise + shift(delta, 4)))
        # the target is the noise that the model's input holds: x_t = sqrt(ā) x_0 + sqrt(1 - ā) target
        alpha_bar = inferer.scheduler.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        expected_input = alpha_bar.sqrt() * inputs + (1 - alpha_bar).sqrt() * target
        torch.testing.assert_close(recorder.inputs[0], expected_input, atol=1e-5, rtol=1e-5)
        inferer.drift_noise = False
        self.assertTrue(torch.equal(inferer.training_target(inputs, noise, timesteps), noise))

    @parameterized.expand([["2d", (2, 2, 8, 8)], ["3d", (1, 2, 4, 4, 4)]])
    def test_v_prediction(self, _, latent_shape):
        spatial_dims = len(latent_shape) - 2
        _, unet = tiny_networks(spatial_dims)
        recorder = RecordInputs(unet)
        inputs, noise, timesteps, context = training_data(latent_shape)
        delta = [0.4, -0.3]
        inferer = DriftDiffusionInferer(scheduler_of(DDIMScheduler, "v_prediction"), drift=delta)
        with torch.no_grad():
            inferer(inputs, recorder, noise, timesteps, condition=context)
        target = inferer.training_target(inputs, noise, timesteps)
        alpha_bar = inferer.scheduler.alphas_cumprod[timesteps].reshape(-1, *([1] * (len(latent_shape) - 1)))
        drifted_noise = noise + shift(delta, len(latent_shape))
        torch.testing.assert_close(target, alpha_bar.sqrt() * drifted_noise - (1 - alpha_bar).sqrt() * inputs)
        # consistent with the model's input: x_0 = sqrt(ā) x_t - sqrt(1 - ā) v
        recovered = alpha_bar.sqrt() * recorder.inputs[0] - (1 - alpha_bar).sqrt() * target
        torch.testing.assert_close(recovered, inputs, atol=1e-5, rtol=1e-5)
        inferer.drift_noise = False
        undrifted = inferer.scheduler.get_velocity(inputs, noise, timesteps)
        self.assertTrue(torch.equal(inferer.training_target(inputs, noise, timesteps), undrifted))

    def test_sample_prediction_and_latent_inferer(self):
        inputs, noise, timesteps, _ = training_data((2, 2, 8, 8))
        inferer = DriftDiffusionInferer(scheduler_of(DDPMScheduler, "sample"), drift=0.3)
        self.assertTrue(torch.equal(inferer.training_target(inputs, noise, timesteps), inputs))
        latent_inferer = DriftLatentDiffusionInferer(scheduler_of(DDPMScheduler), scale_factor=SCALE, drift=[0.1, 0.2])
        self.assertTrue(
            torch.equal(latent_inferer.training_target(inputs, noise, timesteps), noise + shift([0.1, 0.2], 4))
        )
        inferer.scheduler.prediction_type = "unknown"
        with self.assertRaisesRegex(ValueError, "prediction_type"):
            inferer.training_target(inputs, noise, timesteps)


class TestBadInput(unittest.TestCase):
    def test_drift_of_the_wrong_length(self):
        autoencoder, unet = tiny_networks(2)
        inputs, noise, timesteps, context = training_data((2, 2, 8, 8))
        message = r"`drift` must be one number or one value per channel \(2\).*got 3 values"
        inferer = DriftDiffusionInferer(scheduler_of(DDIMScheduler), drift=[0.1, 0.2, 0.3])
        with self.assertRaisesRegex(ValueError, message):
            inferer(inputs, unet, noise, timesteps, condition=context)
        with self.assertRaisesRegex(ValueError, message):
            inferer.sample(noise, unet, conditioning=context, verbose=False)
        latent_inferer = DriftLatentDiffusionInferer(scheduler_of(DDIMScheduler), drift=[0.1, 0.2, 0.3])
        images = torch.rand(2, 1, 16, 16)
        with self.assertRaisesRegex(ValueError, message):
            latent_inferer(images, autoencoder, unet, noise, timesteps, condition=context)
        with self.assertRaisesRegex(ValueError, message):
            latent_inferer.sample(noise, autoencoder, unet, conditioning=context, verbose=False)
        # with the initial drift off the reverse-step drift still checks
        latent_inferer.drift_initial = False
        with self.assertRaisesRegex(ValueError, message):
            latent_inferer.sample(noise, autoencoder, unet, conditioning=context, verbose=False)

    def test_bad_arguments(self):
        for inferer_type in (DriftDiffusionInferer, DriftLatentDiffusionInferer):
            for bad in ("0.1", None, [0.1, "a"], True, float("nan"), []):
                with self.assertRaisesRegex(ValueError, "`drift`", msg=repr(bad)):
                    inferer_type(DDIMScheduler(), drift=bad)
            with self.assertRaisesRegex(ValueError, "`drift_steps` must be True or False"):
                inferer_type(DDIMScheduler(), drift_steps=1)
        with self.assertRaisesRegex(ValueError, "`drift`"):
            DriftHook("up")
        inferer = DriftDiffusionInferer(DDIMScheduler(), drift=0.1)
        with self.assertRaisesRegex(ValueError, "`drift`"):
            inferer.drift = "down"
        inferer.drift = torch.tensor([0.5, 0.25])
        self.assertEqual(inferer.drift, Drift([0.5, 0.25]))  # stored as floats, checked when set
        self.assertIsInstance(inferer.drift.values[0], float)
        with self.assertRaisesRegex(ValueError, "ldm_latent_shape"):  # MONAI's own checks still run
            DriftLatentDiffusionInferer(DDIMScheduler(), ldm_latent_shape=[10, 10])


if __name__ == "__main__":
    unittest.main()
