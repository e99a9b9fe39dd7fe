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
"""Stable Diffusion-size figures: seconds per counterfactual and per phrase grounding, fp32 against bf16 autocast.

MONAI networks of Stable Diffusion 1.5's size with random weights (no weights are downloaded): a
``DiffusionModelUNet`` with SD 1.5's layout (channels 320/640/1280/1280, cross-attention at the first three levels,
8 heads, context 77 x 768; about 860M parameters) and an ``AutoencoderKL`` of SD's VAE size (channels
128/256/512/512, 4 latent channels, f = 8), on one 512² image (64² latent). Timed per image:

- the counterfactual of the reference protocol (DDIM inversion to strength 0.6 of 50 steps, then guided denoising:
  90 UNet evaluations) and the counterfactual bundle's default (10 steps, strength 0.8, guidance on the first 4
  steps: 20 evaluations);
- the phrase grounding bundle's grounding (50-step schedule, capture window 0.4-0.6, the 32² and 16² levels recorded);
- each in float32 and with the UNet under bf16 autocast (``monai_cfx.networks.accelerate(autocast_dtype="bfloat16")``,
  the configs' ``unet_acceleration`` switch), with the mean absolute difference of bf16 to fp32
  (random weights amplify rounding more than trained ones; the counterfactual bundle's test bounds it on the shipped
  weights).

Meant for a GPU (``--device cuda``, the default when one is present); on CPU, check it runs with a small layout:
``python benchmarks/sd_size.py --image_size 64 --unet_channels 32 64 64 64 --vae_channels 32 32 32 32 --steps 4``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from monai_cfx.inferers import CounterfactualInferer, CrossAttentionGroundingInferer
from monai_cfx.networks import accelerate


def timed(call: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    call()  # warm-up: kernels, allocator, autotuning
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--unet_channels", type=int, nargs=4, default=[320, 640, 1280, 1280])
    parser.add_argument("--vae_channels", type=int, nargs=4, default=[128, 256, 512, 512])
    parser.add_argument("--steps", type=int, default=50, help="schedule of the reference counterfactual and grounding")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    heads = 8
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=4, out_channels=4, num_res_blocks=2, channels=args.unet_channels,
        attention_levels=(True, True, True, False), num_head_channels=[c // heads for c in args.unet_channels],
        with_conditioning=True, cross_attention_dim=768, transformer_num_layers=1, use_flash_attention=True,
    ).to(device).eval()  # fmt: skip
    autoencoder = AutoencoderKL(
        spatial_dims=2, in_channels=3, out_channels=3, channels=args.vae_channels, latent_channels=4,
        num_res_blocks=2, attention_levels=(False, False, False, False), with_encoder_nonlocal_attn=True,
        with_decoder_nonlocal_attn=True, use_flash_attention=True,
    ).to(device).eval()  # fmt: skip
    # MONAI zero-initialises the output convolutions (of the UNet, its res blocks and transformers): give them
    # small weights (the blocks stay near identity), or every prediction is zero and no path could differ
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(std=1e-3)
    millions = sum(p.numel() for p in unet.parameters()) / 1e6
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.00085, beta_end=0.012
    )
    image = torch.rand(1, 3, args.image_size, args.image_size, device=device) * 2 - 1  # SD's range
    context, uncond = torch.randn(1, 77, 768, device=device), torch.zeros(1, 77, 768, device=device)
    reference = CounterfactualInferer(scheduler, 0.18215, noise_strength=0.6, num_inference_steps=args.steps,
                                      start="inversion", guidance_scale=3.0, verbose=False)  # fmt: skip
    default = CounterfactualInferer(scheduler, 0.18215, noise_strength=0.8, num_inference_steps=10, start="inversion",
                                    guidance_scale=3.0, guided_steps=4, verbose=False)  # fmt: skip
    grounding = CrossAttentionGroundingInferer(scheduler, 0.18215, num_inference_steps=args.steps, layers=[1, 2])
    memory = "" if device.type != "cuda" else f", {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    print(f"UNet {millions:.0f}M parameters, {args.image_size}² image, {device}{memory}, {threads} threads")
    print(f"{'call':<34} {'UNet evals':>10} {'fp32 s':>8} {'bf16 s':>8} {'ratio':>6} {'mean |diff|':>11}")
    rows = (
        (f"counterfactual, {args.steps} steps, 0.6", reference.num_unet_evaluations(),
         lambda u, a: reference(image, u, a, context, uncond, seed=0)),
        ("counterfactual, bundle default", default.num_unet_evaluations(),
         lambda u, a: default(image, u, a, context, uncond, seed=0)),
        (f"grounding, {args.steps}-step schedule", 2 * len(grounding.captured_steps()) + grounding.captured_steps()[0],
         lambda u, a: grounding(image, u, a, context, uncond, [[1, 2, 3]])[0]),
    )  # fmt: skip
    results = {}
    for name, evaluations, call in rows:
        results[name] = [evaluations, *timed(lambda c=call: c(unet, autoencoder), device, args.repeats)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # the same UNet under bf16 autocast, as the configs' switch does it (weights stay float32; the autoencoder
    # runs in float32, once per image)
    accelerate(unet, autocast_dtype="bfloat16")
    for name, _, call in rows:
        seconds, out = timed(lambda c=call: c(unet, autoencoder), device, args.repeats)
        evaluations, fp32_seconds, fp32_out = results[name]
        difference = float((out.float() - fp32_out.float()).abs().mean())
        print(f"{name:<34} {evaluations:>10} {fp32_seconds:8.2f} {seconds:8.2f} {seconds / fp32_seconds:6.2f} "
              f"{difference:11.2e}")  # fmt: skip
    if device.type == "cuda":
        print(f"peak GPU memory (bf16 runs): {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
