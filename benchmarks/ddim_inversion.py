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
"""Per-step cost of ``monai_cfx`` DDIM inversion against a plain loop over MONAI's ``DDIMScheduler.reversed_step``.

Both loops run the same small ``DiffusionModelUNet`` (2D, 32x32 latent, batch 4) side by side in one process,
after a warm-up, and report the median over several repeats. MONAI's ``reversed_step`` reads
``alphas_cumprod`` past its end at the last of the 50 steps, so both are timed over the first 49 steps and
compared per step. The guided line times ``ddim_invert`` with classifier-free guidance (one model call on the
doubled batch per step) against the same unguided MONAI loop. Only an overhead check: no assertions.

Run as ``python benchmarks/ddim_inversion.py [--device cuda] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from monai_cfx.inferers import ddim_invert

__all__ = ["main"]

NUM_INFERENCE_STEPS = 50


def monai_reversed_loop(model: torch.nn.Module, scheduler: DDIMScheduler, latent: torch.Tensor, num_steps: int):
    """The plain loop one writes with MONAI alone (as in MONAI's tutorials), over its first ``num_steps`` steps."""
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    sample = latent
    with torch.no_grad():
        for t in scheduler.timesteps.flip(0)[:num_steps].tolist():
            model_timesteps = torch.full((sample.shape[0],), t, device=latent.device, dtype=torch.long)
            sample, _ = scheduler.reversed_step(model(sample, model_timesteps), t, sample)
    return sample


def seconds(function: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Wall time of one call, waiting for queued GPU work on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(device: str = "cpu", repeats: int = 5) -> None:
    torch.manual_seed(0)
    device = torch.device(device)
    model = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=4,
        out_channels=4,
        channels=(32, 64, 64),
        attention_levels=(False, True, True),
        num_res_blocks=1,
        num_head_channels=32,
        with_conditioning=True,
        cross_attention_dim=64,
    ).to(device)
    # the output conv is zero-initialised; randomise it so the latents (and the arithmetic) are not trivial
    for parameter in model.parameters():
        if not parameter.any():
            torch.nn.init.normal_(parameter, std=0.02)
    model.eval()
    scheduler = DDIMScheduler(clip_sample=False)
    latent = torch.randn(4, 4, 32, 32, device=device)
    context = torch.randn(1, 8, 64, device=device)
    uncond_context = torch.zeros(1, 8, 64, device=device)
    # MONAI's reversed_step crashes at the 50th step, so compare over the first 49
    num_steps = NUM_INFERENCE_STEPS - 1
    end_fraction = num_steps / NUM_INFERENCE_STEPS

    def ours() -> torch.Tensor:
        return ddim_invert(
            model, scheduler, latent, NUM_INFERENCE_STEPS, context=context, end_fraction=end_fraction, verbose=False
        )

    def ours_guided() -> torch.Tensor:
        return ddim_invert(
            model,
            scheduler,
            latent,
            NUM_INFERENCE_STEPS,
            context=context,
            uncond_context=uncond_context,
            guidance_scale=3.0,
            end_fraction=end_fraction,
            verbose=False,
        )

    def monai() -> torch.Tensor:
        conditioned = lambda x, t: model(x, t, context=context.expand(len(x), -1, -1))  # noqa: E731
        return monai_reversed_loop(conditioned, scheduler, latent, num_steps)

    # warm-up (allocator, kernels, thread pools) before any timing
    for function in (ours, ours_guided, monai):
        function()
    # interleave the repeats so that load changes on a shared machine hit all loops alike
    times: dict[str, list[float]] = {"ours": [], "ours_guided": [], "monai": []}
    for _ in range(repeats):
        for name, function in (("ours", ours), ("ours_guided", ours_guided), ("monai", monai)):
            times[name].append(seconds(function, device))
    per_step = {name: statistics.median(values) / num_steps for name, values in times.items()}

    print(f"device {device}, latent {tuple(latent.shape)}, {num_steps} steps, median of {repeats} repeats")
    print(f"monai reversed_step loop : {per_step['monai'] * 1e3:8.2f} ms/step")
    print(f"monai_cfx ddim_invert    : {per_step['ours'] * 1e3:8.2f} ms/step")
    print(f"ratio ours / monai       : {per_step['ours'] / per_step['monai']:8.3f}")
    print(f"monai_cfx guided (2x batch): {per_step['ours_guided'] * 1e3:6.2f} ms/step")
    print(f"ratio guided / monai     : {per_step['ours_guided'] / per_step['monai']:8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    main(arguments.device, arguments.repeats)
