"""How phrase-specific the cross-attention maps are: the AUROC against each phrase's box of the map of the phrase's
own tokens, of another phrase of the same report, of the report's first word and of the padding tokens, all from
one inversion per image with the bundle's settings (validation split).

python scripts/token_specificity.py [--num_items 40] [--dataset_dir ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.metrics import compute_binned_auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_items", type=int, default=40)
    parser.add_argument("--dataset_dir", default=str(default_bundle_dir("latent_diffusion") / "data" / "chest_64"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_bundle_config(
        default_bundle_dir("phrase_grounding"), ["configs/inference.json", "configs/evaluate.json"],
        device=torch.device("cpu"),
        dataset_dir=args.dataset_dir, data_list_key="validation", num_items=args.num_items, otsu=False,
    )  # fmt: skip
    inferer, prepare = config.get_parsed_content("grounding_inferer"), config.get_parsed_content("prepare_batch")
    unet, text_encoder = config.get_parsed_content("load_diffusion"), config.get_parsed_content("text_encoder")
    dataset = config.get_parsed_content("dataset")
    scores: dict[str, list[float]] = {"own tokens": [], "another phrase": [], "first word": [], "padding": []}
    for index in range(len(dataset)):
        item = dataset[index]
        phrases = [row.nonzero().flatten().tolist() for row in item["phrase_tokens"]]
        length = len(text_encoder.tokenizer(item["prompt"])["input_ids"])
        extra = [[1], list(range(length, text_encoder.max_length))]  # the first word; the padding positions
        images, _, call_args, kwargs = prepare({"image": item["image"][None], "prompt": [item["prompt"]],
                                                "phrase_tokens": item["phrase_tokens"][None]})  # fmt: skip
        kwargs["token_indices"] = phrases + extra
        heatmaps = inferer(images, unet, *call_args, **kwargs)[0][0]
        for k in range(len(phrases)):
            box = item["phrase_mask"][k][None, None]
            if not box.any():
                continue

            def auroc(map_: torch.Tensor, box: torch.Tensor = box) -> float:
                return float(compute_binned_auroc(map_[None, None], box, None)[0])

            scores["own tokens"].append(auroc(heatmaps[k]))
            scores["first word"].append(auroc(heatmaps[len(phrases)]))
            scores["padding"].append(auroc(heatmaps[len(phrases) + 1]))
            if len(phrases) > 1:
                scores["another phrase"].append(auroc(heatmaps[(k + 1) % len(phrases)]))
    print("| tokens whose map is scored against the phrase's box | boxes | AUROC |")
    print("|---|---|---|")
    for name, values in scores.items():
        print(f"| {name} | {len(values)} | {np.nanmean(values):.3f} |")


if __name__ == "__main__":
    main()
