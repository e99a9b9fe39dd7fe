"""ClipOriginalSampleHook keeps the predicted clean latent within bounds and the scheduler's step consistent with it;
compute_latent_range measures the bounds without touching the global random stream; clip_hooks reads them."""

from __future__ import annotations

import json
import tempfile
import unittest
from pathlib import Path

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from parameterized import parameterized

from monai_cfx.apps.generation import clip_hooks
from monai_cfx.engines import compute_latent_range
from monai_cfx.inferers import ClipOriginalSampleHook, SamplingHook, denoise
from monai_cfx.inferers.guidance import epsilon_and_original_sample
from tests.helpers import CONTEXT_DIM, tiny_networks
from tests.inferers.test_guidance import latent_of, one_step_state, scheduler_of

CASES = [[f"{d}d_{p}", d, p] for d in (2, 3) for p in ("epsilon", "v_prediction")]
LOW, HIGH = [-0.5, -0.2], [0.3, 0.6]  # one bound per latent channel of latent_of


class RecordOriginal(SamplingHook):
    """The scheduler's own x̂₀ after each step."""

    def __init__(self) -> None:
        self.originals: list[torch.Tensor] = []

    def after_step(self, state) -> None:
        self.originals.append(state.pred_original_sample)


class TestClipOriginalSampleHook(unittest.TestCase):
    @parameterized.expand(CASES)
    def test_implied_original_is_the_clipped_one(self, _, spatial_dims, prediction_type):
        scheduler = scheduler_of(prediction_type)
        sample, output = latent_of(spatial_dims, seed=0), 3 * latent_of(spatial_dims, seed=1)
        timestep = int(scheduler.timesteps[0])
        alpha = scheduler.alphas_cumprod[timestep]
        state = one_step_state(sample, output.clone(), timestep)
        ClipOriginalSampleHook(scheduler, LOW, HIGH).after_model(state)
        _, before = epsilon_and_original_sample(sample, output, alpha, prediction_type)
        _, after = epsilon_and_original_sample(sample, state.model_output, alpha, prediction_type)
        shape = (1, 2) + (1,) * spatial_dims
        expected = before.clamp(torch.tensor(LOW).view(shape), torch.tensor(HIGH).view(shape))
        self.assertTrue((before != expected).any())  # the case clips something
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)

    @parameterized.expand(CASES)
    def test_wide_bounds_change_nothing(self, _, spatial_dims, prediction_type):
        scheduler = scheduler_of(prediction_type)
        sample, output = latent_of(spatial_dims, seed=0), latent_of(spatial_dims, seed=1)
        state = one_step_state(sample, output.clone(), int(scheduler.timesteps[3]))
        ClipOriginalSampleHook(scheduler, -1e4, 1e4).after_model(state)
        torch.testing.assert_close(state.model_output, output, rtol=1e-4, atol=1e-4)

    @parameterized.expand([["ddim", DDIMScheduler], ["ddpm", DDPMScheduler]])
    def test_every_step_of_the_loop_stays_within_the_bounds(self, _, scheduler_class):
        torch.manual_seed(0)
        _, unet = tiny_networks(2)
        scheduler = scheduler_class(num_train_timesteps=100, clip_sample=False)
        scheduler.set_timesteps(10)
        noise, context = latent_of(2, seed=2), torch.randn(2, 1, CONTEXT_DIM)
        free, clipped = RecordOriginal(), RecordOriginal()
        denoise(unet, scheduler, noise, context=context, hooks=[free], verbose=False)
        denoise(unet, scheduler, noise, context=context, hooks=[ClipOriginalSampleHook(scheduler, -0.1, 0.1), clipped])
        self.assertGreater(max(float(o.abs().max()) for o in free.originals), 0.1)  # unclipped, it leaves them
        for original in clipped.originals:
            self.assertLessEqual(float(original.abs().max()), 0.1 + 1e-4)

    def test_bad_bounds_and_schedulers_are_refused(self):
        scheduler = scheduler_of()
        for low, high, message in (
            ([0.0, float("nan")], [1.0, 1.0], "finite"),
            ([0.0, 1.0], [1.0, 1.0], "below"),
            ([], [], "one value"),
            ([0.0, 0.0], [1.0, 1.0, 1.0], "one value"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                ClipOriginalSampleHook(scheduler, low, high)
        hook = ClipOriginalSampleHook(scheduler, [-1.0] * 3, [1.0] * 3)
        with self.assertRaisesRegex(ValueError, "3 values, the sample has 2 channels"):
            hook.after_model(one_step_state(latent_of(2), latent_of(2), 50))
        with self.assertRaisesRegex(ValueError, "prediction_type"):
            ClipOriginalSampleHook(DDIMScheduler(num_train_timesteps=100, prediction_type="sample"), -1, 1)
        with self.assertRaisesRegex(ValueError, "alphas_cumprod"):
            ClipOriginalSampleHook(object(), -1, 1)


class TestLatentRange(unittest.TestCase):
    def test_range_of_the_scaled_latents_and_the_random_stream_kept(self):
        autoencoder, _ = tiny_networks(2)
        batches = [{"image": torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(i))} for i in range(3)]
        torch.manual_seed(7)
        state = torch.get_rng_state()
        measured = compute_latent_range(autoencoder, batches, scale_factor=2.0, max_batches=2)
        torch.testing.assert_close(torch.get_rng_state(), state)  # a training run's stream is not moved
        torch.manual_seed(7)
        with torch.no_grad():
            latents = torch.cat([autoencoder.encode_stage_2_inputs(b["image"]) for b in batches[:2]]) * 2.0
        self.assertEqual(measured["low"], [float(v) for v in latents.amin((0, 2, 3))])
        self.assertEqual(measured["high"], [float(v) for v in latents.amax((0, 2, 3))])
        with self.assertRaisesRegex(ValueError, "no batch"):
            compute_latent_range(autoencoder, [], scale_factor=1.0)

    def test_clip_hooks_read_the_scale_factor_file(self):
        scheduler = scheduler_of()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "scale_factor_2d.json"
            path.write_text(json.dumps({"scale_factor": 1.0}))
            self.assertEqual(clip_hooks(scheduler, path, enabled=False), [])
            with self.assertRaisesRegex(ValueError, "records no `latent_range`.*--clip_original_sample false"):
                clip_hooks(scheduler, path)
            path.write_text(json.dumps({"scale_factor": 1.0, "latent_range": {"low": LOW, "high": HIGH}}))
            (hook,) = clip_hooks(scheduler, path)
            torch.testing.assert_close((hook.low, hook.high), (torch.tensor(LOW), torch.tensor(HIGH)))


if __name__ == "__main__":
    unittest.main()
