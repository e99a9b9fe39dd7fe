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
"""Wall time of ``CounterfactualInferer`` against MONAI's ``LatentDiffusionInferer.sample``.

Both run the latent diffusion bundle's shipped UNet and autoencoder for the same number of DDIM steps, on the
same batch, with the same text conditioning and no guidance:

- **counterfactual**: ``CounterfactualInferer(noise_strength=1.0, start="noise", guidance_scale=1.0)`` on images:
  encode, add noise, the library's sampling loop with its step hooks, decode;
- **monai_pipeline**: the same edit written with MONAI calls: ``AutoencoderKL.encode`` (posterior mean),
  ``scheduler.add_noise`` and ``LatentDiffusionInferer.sample`` from there: equal work, so the ratio is the
  library's own overhead (goal <= 1.05);
- **monai_sample**: ``LatentDiffusionInferer.sample`` on latent noise alone, without encoding the images:
  the ratio to it also counts the encoder pass that an edit needs and sampling from noise does not.

The runs alternate for several rounds after a warm-up; the ratios of median times are printed.

Run as ``python benchmarks/counterfactual_overhead.py [--dims 2d|3d] [--steps 50] [--batch_size 8] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.inferers import LatentDiffusionInferer

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.inferers import CounterfactualInferer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=("2d", "3d"), default="2d")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    configs = ["configs/inference.json"] + (["configs/3d.json"] if args.dims == "3d" else [])
    config = load_bundle_config(default_bundle_dir("latent_diffusion"), configs, device=torch.device("cpu"))
    autoencoder = config.get_parsed_content("load_autoencoder").eval()
    unet = config.get_parsed_content("load_diffusion").eval()
    text_encoder = config.get_parsed_content("text_encoder")
    scale_factor = config.get_parsed_content("scale_factor")
    image_size, spatial_dims = config.get_parsed_content("image_size"), config.get_parsed_content("spatial_dims")
    latent_shape = config.get_parsed_content("latent_shape")

    generator = torch.Generator().manual_seed(0)
    images = torch.rand((args.batch_size, 1) + (image_size,) * spatial_dims, generator=generator)
    noise = torch.randn((args.batch_size, *latent_shape), generator=generator)
    with torch.no_grad():
        context = text_encoder(["Normal chest radiograph."] * args.batch_size)

    counterfactual = CounterfactualInferer(
        config.get_parsed_content("sampling_scheduler"),
        scale_factor,
        noise_strength=1.0,
        num_inference_steps=args.steps,
        start="noise",
        guidance_scale=1.0,
        verbose=False,
    )
    monai_scheduler = config.get_parsed_content("sampling_scheduler")
    monai_inferer = LatentDiffusionInferer(monai_scheduler, scale_factor=scale_factor)

    def run_counterfactual() -> None:
        counterfactual(images, unet, autoencoder, context, seed=0)

    def run_monai_pipeline() -> None:
        monai_scheduler.set_timesteps(args.steps)
        with torch.no_grad():
            latent = autoencoder.encode(images)[0] * scale_factor
        start = monai_scheduler.add_noise(latent, noise, monai_scheduler.timesteps[:1])
        monai_inferer.sample(start, autoencoder, unet, conditioning=context, verbose=False)

    def run_monai_sample() -> None:
        monai_scheduler.set_timesteps(args.steps)
        monai_inferer.sample(noise, autoencoder, unet, conditioning=context, verbose=False)

    runs = {
        "counterfactual": run_counterfactual,
        "monai_pipeline": run_monai_pipeline,
        "monai_sample": run_monai_sample,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.dims}, {args.steps} DDIM steps, batch {args.batch_size}, {torch.get_num_threads()} thread(s)")
    for name, value in medians.items():
        print(f"  {name:15s} median {value:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times[name])})")
    pipeline_ratio = medians["counterfactual"] / medians["monai_pipeline"]
    print(f"ratio counterfactual / monai_pipeline wall time: {pipeline_ratio:.3f} (goal <= 1.05)")
    print(f"ratio counterfactual / monai_sample wall time: {medians['counterfactual'] / medians['monai_sample']:.3f}")


if __name__ == "__main__":
    main()
