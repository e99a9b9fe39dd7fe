"""Stable Diffusion folders as MONAI networks: tiny SD 1.x and 2.x pipelines written by diffusers' own classes
(``save_pretrained``) load into MONAI networks that equal diffusers' outputs, one DDIM sampling run and a DDIM
inversion equal diffusers' pipeline and inverse scheduler, a fine-tuned UNet goes back to diffusers, and folders
MONAI cannot express are refused by name with nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import unittest
from pathlib import Path

import torch
from parameterized import parameterized

from monai_cfx.inferers import ddim_invert, denoise
from monai_cfx.networks import encode_mean
from monai_cfx.networks.nets.stable_diffusion import (
    StableDiffusionAutoencoderKL,
    load_stable_diffusion,
    load_stable_diffusion_autoencoder,
    load_stable_diffusion_unet,
    save_unet_to_diffusers,
)
from monai_cfx.networks.schedulers import set_timestep_spacing

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
CONTEXT = 32  # the tiny CLIP text model's hidden size


def unet_kwargs(kind: str) -> dict:
    kwargs = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT,
                  norm_num_groups=8)  # fmt: skip
    if kind == "sd1":  # SD 1.x: attention_head_dim is one number of heads, 1x1 conv projections
        kwargs.update(attention_head_dim=2)
    else:  # SD 2.x: heads per level, linear projections, upcast attention
        kwargs.update(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True)
    return kwargs


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Weights moved off their initialisation (diffusers zero-initialises some output layers)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def save_pipeline(folder: str, kind: str, safe_serialization: bool = True):
    """A tiny StableDiffusionPipeline of diffusers' own classes, saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.helpers import tiny_clip_tokenizer

    torch.manual_seed(0)
    unet = perturbed(UNet2DConditionModel(**unet_kwargs(kind)))
    vae = perturbed(AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4,
                                  sample_size=16))  # fmt: skip
    tokenizer, text_config = tiny_clip_tokenizer(os.path.join(folder + "_vocab"), CONTEXT)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon" if kind == "sd1" else "v_prediction")  # fmt: skip
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    pipeline.save_pretrained(folder, safe_serialization=safe_serialization)
    return pipeline


@unittest.skipUnless(HAS_DIFFUSERS, "diffusers (a test dependency, the dev extra) writes the fixtures")
class TestStableDiffusionConversion(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp())
        cls.pipelines = {}
        for kind, safe in (("sd1", True), ("sd2", False)):  # safetensors, and .bin read with weights_only
            cls.pipelines[kind] = save_pipeline(str(cls.tmp / kind), kind, safe_serialization=safe)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @parameterized.expand([("sd1",), ("sd2",)])
    def test_networks_equal_diffusers(self, kind):
        pipeline, folder = self.pipelines[kind], self.tmp / kind
        weights = "diffusion_pytorch_model." + ("safetensors" if kind == "sd1" else "bin")
        self.assertTrue((folder / "unet" / weights).is_file())
        unet = load_stable_diffusion_unet(folder / "unet")
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
        context = torch.randn(2, 7, CONTEXT)
        with torch.no_grad():
            expected = pipeline.unet(x, t, encoder_hidden_states=context).sample
            torch.testing.assert_close(unet(x, t, context=context), expected, atol=1e-5, rtol=1e-5)
        autoencoder, scale_factor = load_stable_diffusion_autoencoder(folder / "vae")
        self.assertIsInstance(autoencoder, StableDiffusionAutoencoderKL)
        self.assertEqual(scale_factor, 0.18215)
        images = torch.rand(2, 3, 16, 16) * 2 - 1  # SD's range
        with torch.no_grad():
            posterior = pipeline.vae.encode(images).latent_dist
            z_mu, z_sigma = autoencoder.encode(images)
            torch.testing.assert_close(z_mu, posterior.mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(z_sigma, posterior.std, atol=1e-5, rtol=1e-5)
            # the contract the inferers use: the deterministic latent in, the decoded image out
            torch.testing.assert_close(encode_mean(autoencoder, images), posterior.mean, atol=1e-5, rtol=1e-5)
            decoded = pipeline.vae.decode(posterior.mean).sample
            torch.testing.assert_close(autoencoder.decode_stage_2_outputs(z_mu), decoded, atol=1e-5, rtol=1e-5)

    @parameterized.expand([("sd1", 3.0), ("sd2", 5.0)])
    def test_ddim_sampling_and_inversion_equal_diffusers(self, kind, guidance_scale):
        """One guided DDIM run of the library's loop on the converted folder equals diffusers' pipeline with the same
        noise and text embeddings; DDIM inversion equals diffusers' DDIMInverseScheduler."""
        from diffusers import DDIMInverseScheduler

        pipeline = self.pipelines[kind]
        sd = load_stable_diffusion(self.tmp / kind)
        self.assertEqual((sd.timestep_spacing, sd.image_size), ("leading", 16))
        self.assertEqual(sd.scheduler.prediction_type, "epsilon" if kind == "sd1" else "v_prediction")
        generator = torch.Generator().manual_seed(3)
        latents = torch.randn(1, 4, 8, 8, generator=generator)
        with torch.no_grad():
            context, uncond = sd.text_encoder(["a chest radiograph"]), sd.text_encoder([""])
            expected = pipeline(prompt_embeds=context, negative_prompt_embeds=uncond, latents=latents,
                                num_inference_steps=10, guidance_scale=guidance_scale,
                                output_type="latent").images  # fmt: skip
        set_timestep_spacing(sd.scheduler, 10, sd.timestep_spacing)
        ours = denoise(sd.unet, sd.scheduler, latents, context=context, uncond_context=uncond,
                       guidance_scale=guidance_scale, verbose=False)  # fmt: skip
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)

        if sd.scheduler.prediction_type != "epsilon":
            # for v-prediction the library inverts DDIM's step exactly (v read at the level the model was told),
            # diffusers' DDIMInverseScheduler reads it at the sample's level: different updates by design
            return
        inverse = DDIMInverseScheduler.from_config(pipeline.scheduler.config)
        inverse.set_timesteps(10)
        sample = latents.clone()
        with torch.no_grad():
            for t in inverse.timesteps:
                sample = inverse.step(
                    pipeline.unet(sample, t, encoder_hidden_states=uncond).sample, t, sample
                ).prev_sample
        inverted = ddim_invert(sd.unet, sd.scheduler, latents, 10, context=uncond, verbose=False,
                               timestep_spacing=sd.timestep_spacing)  # fmt: skip
        torch.testing.assert_close(inverted, sample, atol=1e-4, rtol=1e-4)

    def test_fine_tuned_unet_goes_back_to_diffusers(self):
        from diffusers import UNet2DConditionModel

        for kind in ("sd1", "sd2"):
            unet = load_stable_diffusion_unet(self.tmp / kind / "unet")
            with torch.no_grad():
                unet.out[2].conv.bias.add_(0.1)  # a "fine-tune"
            config = json.loads((self.tmp / kind / "unet" / "config.json").read_text())
            out = self.tmp / f"{kind}_back"
            save_unet_to_diffusers(unet, out, config)
            back = UNet2DConditionModel.from_pretrained(out).eval()
            x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([400]), torch.randn(1, 5, CONTEXT)
            with torch.no_grad():
                torch.testing.assert_close(back(x, t, encoder_hidden_states=context).sample,
                                           unet(x, t, context=context), atol=1e-5, rtol=1e-5)  # fmt: skip
            with self.assertRaises(FileExistsError):  # never over an existing folder unless asked
                save_unet_to_diffusers(unet, out, config)

    def test_bad_folders_are_refused_by_name(self):
        def copy(name):
            target = self.tmp / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.tmp / "sd1", target)
            return target

        with self.assertRaisesRegex(FileNotFoundError, "not a diffusers pipeline folder"):
            load_stable_diffusion(self.tmp / "sd1" / "unet")
        folder = copy("no_vae")
        shutil.rmtree(folder / "vae")
        with self.assertRaisesRegex(FileNotFoundError, r"lacks the component folders \['vae'\]"):
            load_stable_diffusion(folder)
        folder = copy("sdxl")
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
        with self.assertRaisesRegex(ValueError, "config.json: `addition_embed_type` is 'text_time'"):
            load_stable_diffusion(folder)
        folder = copy("wider")
        (folder / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 128]}))
        with self.assertRaisesRegex(ValueError, "do not fit .*shapes differ"):
            load_stable_diffusion(folder)
        folder = copy("latents")
        vae = json.loads((folder / "vae" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 8, "out_channels": 8}))
        (folder / "vae" / "config.json").write_text(json.dumps(vae))
        with self.assertRaisesRegex(ValueError, "do not fit"):
            load_stable_diffusion(folder)  # the UNet's weights take 4 channels, not 8
        folder = copy("euler")
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        scheduler["_class_name"] = "FlowMatchEulerDiscreteScheduler"
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
        with self.assertRaisesRegex(ValueError, "scheduler_config.json: `_class_name` is 'FlowMatchEulerDiscrete"):
            load_stable_diffusion(folder)

    def test_vae_with_other_latent_channels_is_refused(self):
        from diffusers import AutoencoderKL

        folder = self.tmp / "vae8"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(self.tmp / "sd1", folder)
        shutil.rmtree(folder / "vae")
        AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                      latent_channels=8, norm_num_groups=4).save_pretrained(folder / "vae")  # fmt: skip
        with self.assertRaisesRegex(ValueError, "has 8 latent channels but the UNet .* takes 4"):
            load_stable_diffusion(folder)


if __name__ == "__main__":
    unittest.main()
