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
"""What bringing a user's scan to the model and its outputs back onto the scan's grid adds to a counterfactual.

For one chest phantom written as a 16-bit PNG at several sizes, side by side in one run:

- **preprocessing**: the counterfactual bundle's own ``preprocessing`` (load, checks, intensity rule, resize and
  pad to 64x64) and its ``Invertd`` of the counterfactual and the difference map back to the PNG's grid;
- **counterfactual**: the bundle's ``CounterfactualInferer`` call on the 64x64 model input (50 steps, strength 0.6,
  DDIM inversion, guidance 3).

The ratio preprocessing / counterfactual is printed per size (medians of ``--repeats`` rounds after a warm-up).

Run as ``python benchmarks/scan_preprocessing.py [--sizes 64 512 2048] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Invertd
from PIL import Image

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.data import generate_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = load_bundle_config(default_bundle_dir("counterfactual"), device=torch.device("cpu"))
    preprocessing = config.get_parsed_content("preprocessing")
    inferer = config.get_parsed_content("counterfactual_inferer")
    unet, autoencoder = config.get_parsed_content("load_diffusion"), config.get_parsed_content("load_autoencoder")
    text = config.get_parsed_content("text_encoder")
    healthy, null = text(["Normal chest radiograph."]), text.null_context(1)
    invert = Invertd(["pred", "difference"], preprocessing, orig_keys="image", nearest_interp=False)

    print(f"{'size':>6} {'preprocessing s':>16} {'counterfactual s':>17} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            subject = generate_phantom("chest", 1850, size)
            path = Path(folder) / f"chest_{size}.png"
            Image.fromarray(np.round(subject["image"][0] * 65535).astype(np.uint16).T).save(path)

            def prepare_and_invert(path=path):
                item = preprocessing({"image": str(path), "label": [0.0] * 4})
                item["pred"], item["difference"] = item["image"] * 0.9, item["image"] * 0.1
                return invert(item), item

            def counterfactual(image):
                with torch.no_grad():
                    return inferer(image[None], unet, autoencoder, healthy, null, seed=0)

            _, item = prepare_and_invert()
            counterfactual(item["image"])  # warm-up
            timings: dict[str, list[float]] = {"preprocessing": [], "counterfactual": []}
            for _ in range(args.repeats):
                start = time.perf_counter()
                prepare_and_invert()
                timings["preprocessing"].append(time.perf_counter() - start)
                start = time.perf_counter()
                counterfactual(item["image"])
                timings["counterfactual"].append(time.perf_counter() - start)
            pre, cf = (statistics.median(timings[k]) for k in ("preprocessing", "counterfactual"))
            print(f"{size:>6} {pre:>16.3f} {cf:>17.3f} {pre / cf:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
