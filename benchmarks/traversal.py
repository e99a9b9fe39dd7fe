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
"""Cost of a 9-λ trajectory-traversal sweep with one shared neutral trajectory, against the same sweep run as
separate samplings (the neutral one and one per λ, each from ``z_T``), on the latent diffusion bundle's shipped
UNet with the trajectory traversal bundle's settings (50 DDIM steps, guidance 7.5, λ = 5, ..., 45).

Both give the same latents bit for bit (checked here too); the shared sweep runs ``50 + sum(50 - λ) = 275`` guided
UNet calls against ``10 x 50 = 500``. The runs alternate for several rounds after a warm-up; the ratios of UNet
calls and of median wall times are printed.

Run as ``python benchmarks/traversal.py [--dims 2d|3d] [--batch_size 4] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.inferers import PromptSwapHook, TrajectoryTraversalInferer, denoise, seeded_noise


class CountCalls:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self)

    def __call__(self, *_: object) -> None:
        self.calls += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=("2d", "3d"), default="2d")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    configs = ["configs/inference.json"] + (["configs/3d.json"] if args.dims == "3d" else [])
    config = load_bundle_config(default_bundle_dir("trajectory_traversal"), configs, device=torch.device("cpu"))
    unet = config.get_parsed_content("load_diffusion").eval()
    text_encoder = config.get_parsed_content("text_encoder")
    inferer: TrajectoryTraversalInferer = config.get_parsed_content("inferer")
    scheduler = config.get_parsed_content("sampling_scheduler")
    neutral = text_encoder([config.get_parsed_content("neutral_prompt")] * args.batch_size)
    target = text_encoder([config.get_parsed_content("target_prompt")] * args.batch_size)
    empty = text_encoder.null_context(args.batch_size)
    noise = seeded_noise(config.get_parsed_content("latent_shape"), range(args.batch_size))
    counter = CountCalls(unet)

    def shared() -> torch.Tensor:
        return inferer.sweep(noise, unet, neutral, target, empty).swap_latents

    def separate() -> torch.Tensor:
        scheduler.set_timesteps(inferer.num_inference_steps)
        branches = {"uncond_context": empty, "guidance_scale": inferer.guidance_scale, "verbose": False}
        denoise(unet, scheduler, noise, context=neutral, **branches)  # the neutral trajectory
        swaps = [
            denoise(unet, scheduler, noise, context=neutral, hooks=[PromptSwapHook(step, target)], **branches)
            for step in inferer.swap_steps
        ]
        return torch.stack(swaps)

    runs = {"shared": shared, "separate": separate}
    calls, times = {}, {name: [] for name in runs}
    results = {}
    for name, run in runs.items():  # warm-up, UNet calls and the equality check
        counter.calls = 0
        results[name] = run()
        calls[name] = counter.calls
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"{args.dims}, {len(inferer.swap_steps)} swaps of {inferer.num_inference_steps} DDIM steps, batch "
          f"{args.batch_size}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    print(f"bit-identical swap latents: {torch.equal(results['shared'], results['separate'])}")
    for name in runs:
        print(f"  {name:8s}  {calls[name]:4d} UNet calls  median {statistics.median(times[name]):.2f} s")
    print(f"ratio shared / separate UNet calls: {calls['shared'] / calls['separate']:.3f} (goal <= 0.55)")
    ratio = statistics.median(times["shared"]) / statistics.median(times["separate"])
    print(f"ratio shared / separate wall time: {ratio:.3f}")


if __name__ == "__main__":
    main()
