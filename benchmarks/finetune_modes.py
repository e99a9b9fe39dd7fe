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
"""Fine-tuning step time and trainable parameters of each Latent Drifting mode, against mode ``full``.

Every trainer is the one the Latent Drifting bundle's ``configs/finetune.json`` builds (same data, batch size,
optimiser, ``FineTunePrepareBatch`` and ``DriftDiffusionInferer``), with only ``mode`` and ``drift`` changed and
no checkpoint written. The trainers take turns for several rounds after a warm-up, so that drift in the machine's
speed hits all alike; the median seconds per iteration give the ratios to ``full`` at δ = 0. DreamBooth's steps
carry a prior batch as large as the instance batch (the set-up that samples its prior is not timed).

Run as ``python benchmarks/finetune_modes.py [--iterations 8] [--repeats 3] [--dims 2d]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from diffusion_trainer_throughput import seconds_per_iteration  # this folder: run as a script

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config

__all__ = ["main"]

RUNS = [
    ("full", 0.0),
    ("full", 0.05),
    ("dreambooth", 0.0),
    ("textual_inversion", 0.0),
    ("custom_diffusion", 0.0),
]


def make_trainer(mode: str, drift: float, dims: str, iterations: int):
    configs = ["configs/inference.json", "configs/finetune.json"] + (["configs/3d.json"] if dims == "3d" else [])
    config = load_bundle_config(
        default_bundle_dir("latent_drifting"),
        configs,
        device=torch.device("cpu"),
        mode=mode,
        drift=drift,
        max_epochs=1,
        num_prior_samples=16,
        num_inference_steps=10,
    )
    config["train#handlers"] = []  # no checkpoint
    trainer = config.get_parsed_content("train#trainer")
    trainer.state.epoch_length = iterations
    return trainer, config.get_parsed_content("fine_tuning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dims", choices=("2d", "3d"), default="2d")
    args = parser.parse_args()

    trainers = {}
    for mode, drift in RUNS:
        trainers[(mode, drift)] = make_trainer(mode, drift, args.dims, args.iterations)
    for trainer, _ in trainers.values():  # warm-up
        seconds_per_iteration(trainer)
    times: dict[tuple[str, float], list[float]] = {run: [] for run in trainers}
    for _ in range(args.repeats):
        for run, (trainer, _) in trainers.items():
            times[run].append(seconds_per_iteration(trainer))
    median = {run: statistics.median(values) for run, values in times.items()}
    full = median[("full", 0.0)]
    full_parameters = trainers[("full", 0.0)][1].num_trainable()
    print(f"{args.dims}, threads {torch.get_num_threads()}, {args.iterations} iterations x {args.repeats} rounds")
    print(f"{'mode':>18} {'drift':>6} {'ms/step':>9} {'vs full':>8} {'trainable':>11} {'vs full':>9}")
    for (mode, drift), seconds in median.items():
        trainable = trainers[(mode, drift)][1].num_trainable()
        print(
            f"{mode:>18} {drift:>6.2f} {1000 * seconds:>9.1f} {seconds / full:>8.2f} {trainable:>11,d} "
            f"{trainable / full_parameters:>9.5f}"
        )


if __name__ == "__main__":
    main()
