from __future__ import annotations

import math
import unittest

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from parameterized import parameterized

from monai_cfx.inferers import ClassifierGuidanceHook, CounterfactualInferer, SamplingState, denoise
from monai_cfx.inferers.guidance import epsilon_and_original_sample
from monai_cfx.networks.nets import JointDiffusionUNet
from tests.helpers import CONTEXT_DIM, tiny_networks

PREDICTIONS = [["epsilon", "epsilon"], ["v", "v_prediction"]]
DIMS_AND_PREDICTIONS = [[f"{d}d_{name}", d, p] for d in (2, 3) for name, p in PREDICTIONS]


def scheduler_of(prediction_type: str = "epsilon", steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


class LinearProbe(torch.nn.Module):
    """A toy linear classifier on latents: ``logits = flatten(z) @ weight``, fixed random weights."""

    def __init__(self, latent_shape: tuple[int, ...], num_outputs: int = 2, seed: int = 3):
        super().__init__()
        numel = math.prod(latent_shape)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(numel, num_outputs, generator=generator) / numel**0.5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.flatten(1) @ self.weight


class EpsilonAsV(torch.nn.Module):
    """A v-prediction network that predicts exactly the noise of an epsilon network: ``v = (ε - √(1-ᾱ) x) / √ᾱ``."""

    def __init__(self, network: torch.nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.network, self.alphas_cumprod = network, alphas_cumprod

    def forward(self, x, timesteps, context=None, class_labels=None):
        alpha = self.alphas_cumprod[int(timesteps[0])]
        epsilon = self.network(x, timesteps, context=context, class_labels=class_labels)
        return (epsilon - (1 - alpha).sqrt() * x) / alpha.sqrt()


def latent_of(spatial_dims: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 2) + (8,) * spatial_dims, generator=torch.Generator().manual_seed(seed))


def one_step_state(sample: torch.Tensor, model_output: torch.Tensor, timestep: int) -> SamplingState:
    return SamplingState(0, 1, torch.tensor(timestep), sample, None, None, 1.0, model_output=model_output)


class TestGuidanceFormulas(unittest.TestCase):
    @parameterized.expand(PREDICTIONS)
    def test_original_sample_is_the_schedulers(self, _, prediction_type):
        scheduler = scheduler_of(prediction_type)
        sample, output = latent_of(2, seed=1), latent_of(2, seed=2)
        for timestep in scheduler.timesteps:
            alpha = scheduler.alphas_cumprod[int(timestep)]
            epsilon, original = epsilon_and_original_sample(sample, output, alpha, prediction_type)
            _, expected = scheduler.step(output, timestep, sample)
            torch.testing.assert_close(original, expected, rtol=1e-5, atol=1e-5)
            # and (ε̂, x̂₀) reproduce the sample: x_t = √ᾱ x̂₀ + √(1-ᾱ) ε̂
            torch.testing.assert_close(alpha.sqrt() * original + (1 - alpha).sqrt() * epsilon, sample)
        with self.assertRaisesRegex(ValueError, "prediction_type"):
            epsilon_and_original_sample(sample, output, 0.5, "sample")

    @parameterized.expand(PREDICTIONS)
    def test_one_step_shift_matches_finite_differences(self, _, prediction_type):
        """ε̂ - ε = s √(1-ᾱ) ∇_{x̂₀}L / √ᾱ, with the gradient checked by central differences on x̂₀."""
        torch.manual_seed(0)
        scheduler, timestep, scale = scheduler_of(prediction_type), 50, 3.0
        alpha = scheduler.alphas_cumprod[timestep].double()
        sample, output = latent_of(2, batch=1, seed=1).double(), latent_of(2, batch=1, seed=2).double()
        probe = LinearProbe(sample.shape[1:]).double()
        classifier = lambda z: torch.tanh(probe(z)) * 3  # noqa: E731  (non-linear, so the gradient depends on x̂₀)
        target = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
        hook = ClassifierGuidanceHook(classifier, scheduler, target, guidance_scale=scale)
        state = one_step_state(sample, output, timestep)
        with torch.enable_grad():
            hook.after_model(state)

        epsilon, original = epsilon_and_original_sample(sample, output, alpha, prediction_type)
        guided_epsilon, guided_original = epsilon_and_original_sample(
            sample, state.model_output, alpha, prediction_type
        )

        def loss(z):
            return torch.nn.functional.binary_cross_entropy_with_logits(classifier(z), target, reduction="sum")

        step, numeric = 1e-6, torch.zeros_like(original)
        for index in range(original.numel()):
            delta = torch.zeros_like(original).flatten()
            delta[index] = step
            delta = delta.view_as(original)
            numeric.view(-1)[index] = (loss(original + delta) - loss(original - delta)) / (2 * step)
        expected_shift = scale * (1 - alpha).sqrt() * numeric / alpha.sqrt()
        torch.testing.assert_close(guided_epsilon - epsilon, expected_shift, rtol=1e-6, atol=1e-8)
        # equivalently, one gradient step on the clean sample: x̂₀' = x̂₀ - s (1-ᾱ)/ᾱ ∇L
        torch.testing.assert_close(guided_original, original - scale * (1 - alpha) / alpha * numeric)

    def test_v_and_epsilon_give_the_same_guided_noise(self):
        timestep, scale = 30, 2.0
        eps_scheduler, v_scheduler = scheduler_of("epsilon"), scheduler_of("v_prediction")
        alpha = eps_scheduler.alphas_cumprod[timestep]
        sample, epsilon = latent_of(2, seed=1), latent_of(2, seed=2)
        v = (epsilon - (1 - alpha).sqrt() * sample) / alpha.sqrt()
        classifier, target = LinearProbe(sample.shape[1:]), torch.tensor([[1.0, 0.0]])
        states = {
            "epsilon": one_step_state(sample, epsilon, timestep),
            "v_prediction": one_step_state(sample, v, timestep),
        }
        for prediction_type, scheduler in (("epsilon", eps_scheduler), ("v_prediction", v_scheduler)):
            hook = ClassifierGuidanceHook(classifier, scheduler, target, guidance_scale=scale)
            with torch.enable_grad():
                hook.after_model(states[prediction_type])
        guided = {
            name: epsilon_and_original_sample(sample, state.model_output, alpha, name)[0]
            for name, state in states.items()
        }
        self.assertFalse(torch.allclose(guided["epsilon"], epsilon))
        torch.testing.assert_close(guided["v_prediction"], guided["epsilon"], rtol=1e-5, atol=1e-5)

    @parameterized.expand(PREDICTIONS)
    def test_through_denoiser_gradient_matches_finite_differences(self, _, prediction_type):
        """The exact gradient: d L(x̂₀(x_t, net(x_t))) / d x_t, checked along a random direction."""
        torch.manual_seed(0)
        scheduler, timestep, scale = scheduler_of(prediction_type), 70, 1.5
        alpha = scheduler.alphas_cumprod[timestep].double()
        network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 8), torch.nn.Tanh()).double()
        denoiser = lambda x: network(x).view_as(x)  # noqa: E731
        classifier, target = LinearProbe((2, 2, 2)).double(), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        hook = ClassifierGuidanceHook(classifier, scheduler, target, guidance_scale=scale, through_denoiser=True)
        self.assertEqual(set(hook.grad_phases), {"before_model", "model", "after_model"})
        sample = torch.randn(1, 2, 2, 2, dtype=torch.float64)
        state = one_step_state(sample, None, timestep)
        with torch.enable_grad():
            hook.before_model(state)
            state.model_output = denoiser(state.sample)
            output = state.model_output.detach()
            hook.after_model(state)
        self.assertFalse(state.model_output.requires_grad or state.sample.requires_grad)
        shift = state.model_output - output  # ε-shift (epsilon) or ε-shift / √ᾱ (v)
        epsilon_shift = shift * alpha.sqrt() if prediction_type == "v_prediction" else shift

        def loss_of(x):
            _, original = epsilon_and_original_sample(x, denoiser(x), alpha, prediction_type)
            return torch.nn.functional.binary_cross_entropy_with_logits(classifier(original), target, reduction="sum")

        direction, step = torch.randn_like(sample), 1e-6
        numeric = (loss_of(sample + step * direction) - loss_of(sample - step * direction)) / (2 * step)
        analytic = (epsilon_shift / (scale * (1 - alpha).sqrt()) * direction).sum()
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)


class TestGuidanceOnTheLoop(unittest.TestCase):
    def _run(self, spatial_dims, prediction_type, target=None, scale=0.0, hooks=None, **kwargs):
        _, unet = tiny_networks(spatial_dims)
        scheduler = scheduler_of(prediction_type)
        noise = latent_of(spatial_dims, seed=4)
        context = torch.randn(1, 3, CONTEXT_DIM, generator=torch.Generator().manual_seed(5))
        probe = LinearProbe(noise.shape[1:])
        if hooks is None:
            hooks = [] if target is None else [ClassifierGuidanceHook(probe, scheduler, target, scale, **kwargs)]
        result = denoise(unet, scheduler, noise, context=context, hooks=hooks, verbose=False)
        return result, probe

    @parameterized.expand(DIMS_AND_PREDICTIONS)
    def test_guidance_moves_the_logit_towards_the_target(self, _, spatial_dims, prediction_type):
        plain, probe = self._run(spatial_dims, prediction_type)
        lowered, _ = self._run(spatial_dims, prediction_type, torch.tensor([[0.0, float("nan")]]), 20.0)
        raised, _ = self._run(spatial_dims, prediction_type, torch.tensor([[1.0, float("nan")]]), 20.0)
        self.assertFalse(plain.requires_grad or lowered.requires_grad or raised.requires_grad)
        with torch.no_grad():
            plain_logit, low_logit, high_logit = (probe(x)[:, 0] for x in (plain, lowered, raised))
        # (a saturated logit moves little: the BCE gradient (sigmoid(logit) - target) is small there)
        self.assertTrue(bool((low_logit < plain_logit - 0.01).all()), (low_logit, plain_logit))
        self.assertTrue(bool((high_logit > plain_logit + 0.01).all()), (high_logit, plain_logit))

    @parameterized.expand(DIMS_AND_PREDICTIONS)
    def test_scale_zero_is_no_hook_bit_for_bit(self, _, spatial_dims, prediction_type):
        plain, _ = self._run(spatial_dims, prediction_type)
        zero, _ = self._run(spatial_dims, prediction_type, torch.tensor([[0.0, 1.0]]), 0.0)
        self.assertTrue(torch.equal(plain, zero))
        zero_exact, _ = self._run(spatial_dims, prediction_type, torch.tensor([[0.0, 1.0]]), 0.0, through_denoiser=True)
        self.assertTrue(torch.equal(plain, zero_exact))

    def test_left_findings_get_no_gradient(self):
        nan, _ = self._run(2, "epsilon", torch.tensor([[0.0, float("nan")]]), 2.0)
        masked, _ = self._run(2, "epsilon", torch.tensor([[0.0, 1.0]]), 2.0, target_mask=torch.tensor([[True, False]]))
        selected, _ = self._run(2, "epsilon", torch.tensor([[0.0]]), 2.0, findings=[0])
        self.assertTrue(torch.equal(nan, masked))
        self.assertTrue(torch.equal(nan, selected))
        # only-one-output classifier with the same first column: the second output never mattered
        scheduler = scheduler_of("epsilon")
        probe = LinearProbe((2, 8, 8))
        first_only = lambda z: probe(z)[:, :1]  # noqa: E731
        hook = ClassifierGuidanceHook(first_only, scheduler, torch.tensor([[0.0]]), 2.0)
        alone, _ = self._run(2, "epsilon", hooks=[hook])
        self.assertTrue(torch.equal(nan, alone))
        # every finding left: no guidance at all
        plain, _ = self._run(2, "epsilon")
        none_kept, _ = self._run(2, "epsilon", torch.full((1, 2), float("nan")), 2.0)
        self.assertTrue(torch.equal(plain, none_kept))

    @parameterized.expand([["2d", 2], ["3d", 3]])
    def test_v_prediction_follows_the_same_guided_trajectory(self, _, spatial_dims):
        _, unet = tiny_networks(spatial_dims)
        noise, target = latent_of(spatial_dims, seed=4), torch.tensor([[0.0, 1.0]])
        results = {}
        for prediction_type in ("epsilon", "v_prediction"):
            scheduler = scheduler_of(prediction_type)
            network = unet if prediction_type == "epsilon" else EpsilonAsV(unet, scheduler.alphas_cumprod)
            hook = ClassifierGuidanceHook(LinearProbe(noise.shape[1:]), scheduler, target, 2.0)
            results[prediction_type] = denoise(network, scheduler, noise, hooks=[hook], verbose=False)
        torch.testing.assert_close(results["v_prediction"], results["epsilon"], rtol=1e-4, atol=1e-4)

    @parameterized.expand([["noise", "noise"], ["inversion", "inversion"]])
    def test_with_counterfactual_inferer(self, _, start):
        autoencoder, unet = tiny_networks(2)
        images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        context = torch.randn(1, 3, CONTEXT_DIM)
        scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
        inferer = CounterfactualInferer(
            scheduler, 0.7, noise_strength=0.8, num_inference_steps=10, start=start, guidance_scale=1.0, verbose=False
        )
        latents = []
        autoencoder_decode = autoencoder.decode_stage_2_outputs
        autoencoder.decode_stage_2_outputs = lambda z: latents.append(z * 0.7) or autoencoder_decode(z)
        probe = LinearProbe((2, 4, 4))
        results = {}
        for name, target in (("plain", None), ("low", 0.0), ("high", 1.0)):
            hooks = []
            if target is not None:
                hooks.append(ClassifierGuidanceHook(probe, scheduler, torch.tensor([[target, float("nan")]]), 5.0))
            results[name] = inferer(images, unet, autoencoder, context, context, seed=1, hooks=hooks)
        plain, low, high = (probe(z)[:, 0] for z in latents)
        self.assertFalse(any(r.requires_grad for r in results.values()))
        self.assertTrue(bool((low < plain).all()) and bool((high > plain).all()), (low, plain, high))

    def test_from_joint(self):
        joint = JointDiffusionUNet(2, 2, 2, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                                   norm_num_groups=4, num_classes=2, classifier_hidden=8).eval()  # fmt: skip
        scheduler = scheduler_of("epsilon", steps=3)
        hook = ClassifierGuidanceHook.from_joint(joint, scheduler, torch.tensor([[0.0, 1.0]]), guidance_scale=1.0)
        noise = latent_of(2, seed=4)
        plain = denoise(joint, scheduler, noise, verbose=False)
        guided = denoise(joint, scheduler, noise, hooks=[hook], verbose=False)
        self.assertFalse(guided.requires_grad)
        self.assertFalse(torch.equal(plain, guided))
        self.assertTrue(all(p.grad is None for p in joint.parameters()))  # the hook never touches parameter grads
        _, unet = tiny_networks(2)
        with self.assertRaisesRegex(ValueError, "guidance on a network without a classifier"):
            ClassifierGuidanceHook.from_joint(unet, scheduler, torch.tensor([[0.0, 1.0]]))

    def test_from_joint_with_a_classifier_context(self):
        # a cross-attention joint UNet classifies with the context it was trained with (the empty prompt's)
        conditioning = {"with_conditioning": True, "cross_attention_dim": CONTEXT_DIM, "num_head_channels": 8}
        shape = {"channels": (8, 8), "attention_levels": (False, True), "num_res_blocks": 1, "norm_num_groups": 4}
        joint = JointDiffusionUNet(2, 2, 2, num_classes=2, classifier_hidden=8, **shape, **conditioning).eval()
        scheduler = scheduler_of("epsilon", steps=3)
        empty, text = torch.randn(1, 3, CONTEXT_DIM), torch.randn(2, 3, CONTEXT_DIM)
        target = torch.tensor([[0.0, 1.0]])
        hook = ClassifierGuidanceHook.from_joint(joint, scheduler, target, classifier_context=empty, guidance_scale=1.0)
        noise = latent_of(2, seed=4)
        with torch.no_grad():
            expected = joint.classify(noise, context=empty.expand(2, -1, -1))
        torch.testing.assert_close(hook.classifier(noise), expected)
        guided = denoise(joint, scheduler, noise, context=text, hooks=[hook], verbose=False)
        self.assertFalse(torch.equal(denoise(joint, scheduler, noise, context=text, verbose=False), guided))


class TestGuidanceBadInput(unittest.TestCase):
    def setUp(self):
        self.scheduler = scheduler_of("epsilon")
        self.probe = LinearProbe((2, 8, 8))

    @parameterized.expand(
        [
            ["1d", torch.tensor([0.0, 1.0])],
            ["3d", torch.zeros(1, 2, 1)],
            ["int", torch.tensor([[0, 1]])],
            ["list", [[0.0, 1.0]]],
            ["out_of_range", torch.tensor([[2.0, 0.0]])],
            ["infinite", torch.tensor([[float("inf"), 0.0]])],
        ]
    )
    def test_bad_target_at_construction(self, _, target):
        with self.assertRaisesRegex(ValueError, "`target`"):
            ClassifierGuidanceHook(self.probe, self.scheduler, target)

    @parameterized.expand(
        [
            ["columns", torch.tensor([[0.0, 1.0, 0.0]]), {}],
            ["batch", torch.zeros(3, 2), {}],
            ["findings", torch.tensor([[0.0]]), {"findings": [5]}],
        ]
    )
    def test_bad_target_at_first_step(self, _, target, kwargs):
        hook = ClassifierGuidanceHook(self.probe, self.scheduler, target, 1.0, **kwargs)
        name = "findings" if "findings" in kwargs else "target"
        with self.assertRaisesRegex(ValueError, f"`{name}`"):
            denoise(tiny_networks(2)[1], self.scheduler, latent_of(2), hooks=[hook], verbose=False)

    def test_other_bad_arguments(self):
        target = torch.tensor([[0.0, 1.0]])
        for scale in (float("nan"), float("inf"), -1.0, True, "1"):
            with self.assertRaisesRegex(ValueError, "`guidance_scale`"):
                ClassifierGuidanceHook(self.probe, self.scheduler, target, scale)
        with self.assertRaisesRegex(ValueError, "`target_mask`"):
            ClassifierGuidanceHook(self.probe, self.scheduler, target, target_mask=torch.ones(1, 3, dtype=torch.bool))
        with self.assertRaisesRegex(ValueError, "`findings`"):
            ClassifierGuidanceHook(self.probe, self.scheduler, target, findings=[0])
        sample_scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="sample")
        with self.assertRaisesRegex(ValueError, "prediction_type"):
            ClassifierGuidanceHook(self.probe, sample_scheduler, target)
        with self.assertRaisesRegex(ValueError, "`scheduler`"):
            ClassifierGuidanceHook(self.probe, object(), target)
        with self.assertRaisesRegex(ValueError, "`classifier`"):
            ClassifierGuidanceHook(None, self.scheduler, target)
        bad_logits = ClassifierGuidanceHook(lambda z: z.sum(), self.scheduler, target, 1.0)
        with self.assertRaisesRegex(ValueError, r"logits \(B, K\)"):
            denoise(tiny_networks(2)[1], self.scheduler, latent_of(2), hooks=[bad_logits], verbose=False)


if __name__ == "__main__":
    unittest.main()
