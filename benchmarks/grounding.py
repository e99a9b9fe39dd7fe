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
"""Cost of ``CrossAttentionGroundingInferer`` with the phrase grounding bundle's settings and shipped weights.

- ``evaluations``: UNet image evaluations per phrase and the AUROC they buy, against the reference protocol
  (300 inversion steps, both branches at every step: 600 evaluations per phrase; run with leading spacing, since
  trailing needs a step count that divides 1000), on held-out phantoms with boxes. Goal: <= 60 evaluations
  with a macro AUROC within 0.01 of the 300-step run.
- ``phrases``: one image with 8 phrases against the same image with 1 (goal: <= 3x).
- ``overhead``: the inversion with the recorder capturing, and the whole grounding call, against the same UNet passes
  without the recorder's hooks (goal for the capture: <= 1.15x).
- ``memory``: peak RSS of a grounding call for several step counts (each in a fresh process; flat in the
  steps), and of a 3D call on a ``--volume_size``-cubed volume with the shipped 3D networks (goal at 128: 6 GB).

Timings alternate the compared runs over several rounds after a warm-up and print ratios of medians.
Run as ``python benchmarks/grounding.py evaluations|phrases|overhead|memory [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.inferers import CrossAttentionGroundingInferer
from monai_cfx.metrics import GroundingMetric


def bundle(dims: str = "2d", **overrides):
    configs = ["configs/inference.json", "configs/evaluate.json"] + (["configs/3d.json"] if dims == "3d" else [])
    data = default_bundle_dir("latent_diffusion") / "data" / ("chest_64" if dims == "2d" else "brain_32")
    overrides.setdefault("dataset_dir", str(data))
    return load_bundle_config(default_bundle_dir("phrase_grounding"), configs, device=torch.device("cpu"), **overrides)


def inferer_like(config, **changes) -> CrossAttentionGroundingInferer:
    settings = {
        "scale_factor": config.get_parsed_content("scale_factor"),
        "num_inference_steps": config.get_parsed_content("num_inference_steps"),
        "capture_window": config.get_parsed_content("capture_window"),
        "layers": config.get_parsed_content("attention_layers"),
        "drive": config.get_parsed_content("drive"),
        "sigma": config.get_parsed_content("heatmap_sigma"),
        "otsu": config.get_parsed_content("otsu"),
        "timestep_spacing": config.get_parsed_content("timestep_spacing"),
    }
    settings.update(changes)
    return CrossAttentionGroundingInferer(config.get_parsed_content("sampling_scheduler"), **settings)


class RowCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, _module, args) -> None:
        self.rows += args[0].shape[0]


def evaluations(args: argparse.Namespace) -> None:
    config = bundle(num_items=args.num_items)
    unet = config.get_parsed_content("load_diffusion").eval()
    prepare = config.get_parsed_content("prepare_batch")
    dataset = config.get_parsed_content("dataset")
    items = [dataset[i] for i in range(len(dataset))]
    label_names = config.get_parsed_content("label_names")
    print(f"{len(items)} held-out phantoms, {sum(len(i['phrase_tokens']) for i in items)} phrases with boxes")
    print("| inversion steps | UNet evaluations per image | per phrase | macro AUROC | all AUROC | binned | CNR |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    # trailing spacing needs steps that divide 1000 (MONAI's step arithmetic); the reference's 300 runs leading
    runs = [(steps, config.get_parsed_content("timestep_spacing")) for steps in args.steps]
    runs.append((args.reference_steps, "leading"))
    for steps, spacing in runs:
        inferer = inferer_like(config, num_inference_steps=steps, timestep_spacing=spacing)
        metric, counter = GroundingMetric(label_names), RowCounter(unet)
        phrases = 0
        for item in items:
            batch = {k: (v[None] if isinstance(v, torch.Tensor) else [v]) for k, v in item.items()}
            images, _, call_args, kwargs = prepare(batch)
            heatmaps, _ = inferer(images, unet, *call_args, **kwargs)
            classes = [int(c) for c in item["phrase_class"]]  # -1 (no known class) counts in "all" only
            metric(heatmaps[0].unsqueeze(1), item["phrase_mask"].unsqueeze(1), classes=classes)
            phrases += len(classes)
        counter.handle.remove()
        summary = metric.aggregate()
        results[(steps, spacing)] = summary["macro"]["auroc"]
        macro, overall = summary["macro"], summary["all"]
        print(
            f"| {steps} ({spacing}) | {counter.rows / len(items):.0f} | {counter.rows / phrases:.1f} "
            f"| {macro['auroc']:.4f} "
            f"| {overall['auroc']:.4f} | {overall['auroc_binned']:.4f} | {overall['cnr']:.3f} |"
        )
    reference = runs[-1]
    for (steps, spacing), auroc in results.items():
        print(f"{steps} {spacing} steps: macro AUROC - {reference[0]}-step AUROC = {auroc - results[reference]:+.4f}")
    print(f"reference protocol (both branches, every step): {2 * args.reference_steps} evaluations per phrase")


def timed(function, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternate(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run, after one warm-up call each, taking turns for ``repeats`` rounds (so that drift
    in the machine's speed hits all runs alike); prints them."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run, 1))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name}: {value * 1000:.0f} ms")
    return medians


def _one_image(config):
    unet = config.get_parsed_content("load_diffusion").eval()
    autoencoder = config.get_parsed_content("load_autoencoder").eval()
    text_encoder = config.get_parsed_content("text_encoder")
    size, dims = config.get_parsed_content("image_size"), config.get_parsed_content("spatial_dims")
    image = torch.rand((1, 1) + (size,) * dims, generator=torch.Generator().manual_seed(0))
    words = ["opacity", "effusion", "heart", "nodule", "left", "right", "lung", "base"]
    prompt = "Chest radiograph with " + ", ".join(words) + "."
    tokens = [text_encoder.phrase_token_indices(prompt, w) for w in words]
    return unet, autoencoder, image, text_encoder([prompt]), text_encoder.null_context(1), tokens


def phrases(args: argparse.Namespace) -> None:
    config = bundle()
    unet, autoencoder, image, context, null, tokens = _one_image(config)
    inferer = inferer_like(config)
    one = lambda: inferer(image, unet, autoencoder, context, null, tokens[:1])  # noqa: E731
    eight = lambda: inferer(image, unet, autoencoder, context, null, tokens)  # noqa: E731
    medians = alternate({"1 phrase": one, "8 phrases": eight}, args.repeats)
    print(f"8 phrases / 1 phrase = {medians['8 phrases'] / medians['1 phrase']:.3f} (goal <= 3)")


def overhead(args: argparse.Namespace) -> None:
    config = bundle()
    unet, autoencoder, image, context, null, tokens = _one_image(config)
    inferer = inferer_like(config)
    scale = inferer.scale_factor

    def without_hooks():
        # the same UNet passes, no recorder: the inferer's own inversion with nothing recording
        with torch.no_grad():
            inferer.invert(autoencoder.encode(image)[0] * scale, unet, context, null)

    def capture():
        # the same passes with the recorder capturing (its hooks, and plain attention on the captured layers)
        recorder = inferer.recorder(unet, tokens[:1], batch_size=1)
        with torch.no_grad(), recorder:
            inferer.invert(autoencoder.encode(image)[0] * scale, unet, context, null, recorder)
            recorder.maps()

    def grounding():
        inferer(image, unet, autoencoder, context, null, tokens[:1])

    runs = {"without hooks": without_hooks, "capturing": capture, "grounding": grounding}
    medians = alternate(runs, args.repeats)
    base = medians["without hooks"]
    print(f"capturing / same passes without hooks = {medians['capturing'] / base:.3f} (goal <= 1.15)")
    print(f"whole grounding call (with the heat maps' resizing, smoothing and Otsu masks) / same = "
          f"{medians['grounding'] / base:.3f}")  # fmt: skip


def _peak_rss_child(dims: str, steps: int, volume_size: int | None) -> None:
    """Run one grounding call and print the process's peak RSS in MB (Linux reports ru_maxrss in kB)."""
    config = bundle(dims)
    unet, autoencoder = (
        config.get_parsed_content("load_diffusion").eval(),
        config.get_parsed_content("load_autoencoder").eval(),
    )
    text_encoder = config.get_parsed_content("text_encoder")
    spatial_dims = config.get_parsed_content("spatial_dims")
    size = volume_size or config.get_parsed_content("image_size")
    prompt = (
        "Brain MRI with a left frontal white matter lesion." if dims == "3d" else "Chest radiograph with cardiomegaly."
    )
    phrase = "left frontal white matter lesion" if dims == "3d" else "cardiomegaly"
    image = torch.rand((1, 1) + (size,) * spatial_dims)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    heatmaps, _ = inferer_like(config, num_inference_steps=steps)(
        image, unet, autoencoder, text_encoder([prompt]), text_encoder.null_context(1),
        [text_encoder.phrase_token_indices(prompt, phrase)],
    )  # fmt: skip
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before_mb": before, "peak_mb": peak, "seconds": seconds, "shape": list(heatmaps.shape)}))


def memory(args: argparse.Namespace) -> None:
    def child(dims: str, steps: int, volume_size: int | None = None) -> dict:
        cmd = [sys.executable, __file__, "_child", "--dims", dims, "--child_steps", str(steps)]
        if volume_size:
            cmd += ["--volume_size", str(volume_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    def cells(result: dict) -> str:
        return f"{result['peak_mb']:.0f} | {result['before_mb']:.0f} | {result['seconds']:.1f}"

    print("| run | peak RSS (MB) | RSS before the call (MB) | seconds |")
    print("|---|---|---|---|")
    peaks = []
    for steps in args.steps:
        result = child("2d", steps)
        peaks.append(result["peak_mb"])
        print(f"| 2D 64x64, {steps} steps | {cells(result)} |")
    print(f"peak RSS, most / fewest steps = {peaks[-1] / peaks[0]:.3f} (flat: about 1)")
    size = args.volume_size
    result = child("3d", args.volume_steps, size)
    print(f"| 3D {size}^3, {args.volume_steps} steps | {cells(result)} |")
    print(f"3D {size}^3 peak RSS = {result['peak_mb'] / 1024:.2f} GB (goal at 128^3: <= 6 GB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("evaluations", "phrases", "overhead", "memory", "_child"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num_items", type=int, default=60)
    parser.add_argument("--steps", type=int, nargs="+", default=None)
    parser.add_argument("--reference_steps", type=int, default=300)
    parser.add_argument("--volume_size", type=int, default=128)
    parser.add_argument("--volume_steps", type=int, default=50)
    parser.add_argument("--dims", default="2d")
    parser.add_argument("--child_steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    if args.task == "_child":
        _peak_rss_child(args.dims, args.child_steps, args.volume_size if args.dims == "3d" else None)
        return
    if args.steps is None:
        args.steps = [25, 50, 100, 250] if args.task == "evaluations" else [50, 100, 250]
    {"evaluations": evaluations, "phrases": phrases, "overhead": overhead, "memory": memory}[args.task](args)


if __name__ == "__main__":
    main()
