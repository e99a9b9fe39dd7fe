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
"""Training throughput of the latent diffusion bundle's trainer against a plain MONAI ``SupervisedTrainer``.

Both train the bundle's own ``diffusion_def`` (2D, 16x16x3 latents of 64x64 chest phantoms) with the same
batch size, optimiser, loss and ``DiffusionInferer``:

- **bundle**: what ``configs/train_diffusion.json`` runs: a ``CacheDataset`` of images with the
  autoencoder posterior cached by ``EncodeLatentd``, and ``LatentDiffusionPrepareBatch`` (posterior
  sample, scaling, prompt dropout, cached MiniLM contexts, noise and timesteps).
- **plain**: MONAI's ``SupervisedTrainer`` with MONAI's ``DiffusionPrepareBatch`` on items that already
  hold a latent and a text context: the work a hand-written loop on precomputed inputs does.

The two alternate for several rounds after a warm-up; the median seconds per iteration give the ratio
``bundle throughput / plain throughput`` (goal >= 0.95). Weights are random: throughput does not depend on them.

Run as ``python benchmarks/diffusion_trainer_throughput.py [--iterations 20] [--repeats 3] [--batch_size 32]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.data import PhantomDataset
from monai_cfx.engines import LatentDiffusionPrepareBatch
from monai_cfx.transforms import EncodeLatentd

__all__ = ["main"]


def make_trainer(network, loader, scheduler, prepare_batch, iterations):
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        epoch_length=iterations,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=torch.nn.MSELoss(),
        inferer=DiffusionInferer(scheduler),
        prepare_batch=prepare_batch,
    )


def seconds_per_iteration(trainer) -> float:
    trainer.state.max_epochs = None  # allow another run of the same trainer
    start = time.perf_counter()
    trainer.run()
    return (time.perf_counter() - start) / trainer.state.epoch_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_images", type=int, default=256)
    args = parser.parse_args()

    config = load_bundle_config(
        default_bundle_dir(), ["configs/inference.json", "configs/train_diffusion.json"], device=torch.device("cpu")
    )
    torch.manual_seed(0)
    autoencoder = config.get_parsed_content("autoencoder_def").eval()
    text_encoder = config.get_parsed_content("text_encoder")
    scheduler = config.get_parsed_content("scheduler")
    num_train_timesteps = config.get_parsed_content("num_train_timesteps")
    phantoms = PhantomDataset("chest", args.num_images, size=config.get_parsed_content("image_size"))
    items = [{"image": torch.as_tensor(p["image"]), "report": p["report"]} for p in phantoms]
    scale_factor = 1.0

    # bundle: images with cached posteriors, latents and contexts drawn by LatentDiffusionPrepareBatch
    bundle_data = CacheDataset(items, EncodeLatentd("image", autoencoder), progress=False)
    bundle_prepare = LatentDiffusionPrepareBatch(autoencoder, text_encoder, num_train_timesteps, scale_factor)
    # plain: the same latents (one posterior sample) and contexts, precomputed
    with torch.no_grad():
        plain_items = [
            {
                "image": autoencoder.sampling(item["image_z_mu"][None], item["image_z_sigma"][None])[0] * scale_factor,
                "condition": text_encoder([item["report"]])[0],
            }
            for item in bundle_data
        ]
    plain_prepare = DiffusionPrepareBatch(num_train_timesteps, condition_name="condition")

    torch.manual_seed(0)
    bundle_net = config.get_parsed_content("diffusion_def")
    plain_net = config.get_parsed_content("diffusion_def")
    plain_net.load_state_dict(bundle_net.state_dict())
    trainers = {
        "bundle": make_trainer(
            bundle_net,
            DataLoader(bundle_data, batch_size=args.batch_size, shuffle=True),
            scheduler,
            bundle_prepare,
            args.iterations,
        ),
        "plain": make_trainer(
            plain_net,
            DataLoader(plain_items, batch_size=args.batch_size, shuffle=True),
            scheduler,
            plain_prepare,
            args.iterations,
        ),
    }
    for trainer in trainers.values():  # warm-up (allocator, text context cache)
        trainer.state.epoch_length = 2
        seconds_per_iteration(trainer)
        trainer.state.epoch_length = args.iterations
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name, trainer in trainers.items():
            times[name].append(seconds_per_iteration(trainer))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.iterations} iterations x {args.repeats}")
    for name, value in median.items():
        print(f"{name:>7}: {1000 * value:8.1f} ms/iteration  ({args.batch_size / value:6.1f} images/s)")
    print(f"throughput ratio bundle/plain: {median['plain'] / median['bundle']:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
