"""Where a joint network's classification is lost: its trained head against heads refitted on its frozen features.

The features are what the head reads (``monai_cfx.apps.mediffusion.head_features``: the network's pooled features
of the posterior mean times the scale factor at t = 0 with the empty prompt's context), on the training and testing
splits of the bundle's phantoms. Each refitted head is trained with AdamW for ``--steps`` batches of 32 on the first
``--labels`` training items in a seeded random order, with the raw or with standardised features (each feature's
training mean and standard deviation), and scored by per-finding AUROC on the testing split.
Prints one JSON line per head.

    python bundles/mediffusion/scripts/feature_probe.py --model_name joint_2d_1.0 [--model_dir <folder>] \
        [--labels 1600 160]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from monai.metrics.rocauc import compute_roc_auc
from monai.transforms import EnsureChannelFirst, LoadImage

from monai_cfx.apps.bundle_config import default_bundle_dir, load_bundle_config
from monai_cfx.apps.bundle_io import load_datalist
from monai_cfx.apps.mediffusion import head_features


def split_arrays(config, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of ``split`` as written (the phantoms are at the model's size and range), with its labels."""
    get = config.get_parsed_content
    items = load_datalist(get("datalist"), split, get("dataset_dir"), path_keys=["image"], text_keys=())
    loader, channel_first = LoadImage(image_only=True), EnsureChannelFirst()
    images = torch.stack([torch.as_tensor(channel_first(loader(item["image"]))).float() for item in items])
    return images, torch.tensor([item["label"] for item in items], dtype=torch.float32)


def fit_head(features, labels, hidden: int, steps: int, learning_rate: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    num_classes = labels.shape[1]
    if hidden:  # the reference's head, as JointDiffusionUNet builds it
        head = torch.nn.Sequential(
            torch.nn.Linear(features.shape[1], hidden), torch.nn.LeakyReLU(0.2), torch.nn.Dropout(0.3),
            torch.nn.Linear(hidden, num_classes),
        )  # fmt: skip
    else:
        head = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=0.01)
    for _ in range(steps):
        rows = torch.randint(0, len(features), (32,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(features[rows]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", default="joint_2d_0.1")
    parser.add_argument("--model_dir", default=None, help="folder of <model_name>.pt (default: the bundle's models/)")
    parser.add_argument("--labels", type=int, nargs="+", default=[1600, 160])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overrides = {"model_name": args.model_name} | ({"model_dir": args.model_dir} if args.model_dir else {})
    config = load_bundle_config(
        default_bundle_dir("mediffusion"), ["configs/inference.json"], device="cpu", **overrides
    )
    get = config.get_parsed_content
    network, autoencoder, names = get("network").eval(), get("autoencoder").eval(), list(get("label_names"))
    context, scale_factor = get("text_encoder").null_context(1), get("scale_factor")
    (train_images, train_labels), (test_images, test_labels) = (
        split_arrays(config, "training"),
        split_arrays(config, "testing"),
    )
    train = head_features(network, autoencoder, train_images, scale_factor, context, batch_size=50)
    test = head_features(network, autoencoder, test_images, scale_factor, context, batch_size=50)
    mean, std = train.mean(0), train.std(0) + 1e-6

    def report(head_name: str, labels: int, head) -> None:
        with torch.no_grad():
            probabilities = torch.sigmoid(head(test))
        aurocs = np.atleast_1d(compute_roc_auc(probabilities, test_labels, average="none"))
        print(json.dumps({"model": args.model_name, "head": head_name, "labels": labels,
                          "auroc": {n: round(float(a), 3) for n, a in zip(names, aurocs)},
                          "feature_std_range": [float(std.min()), float(std.max())]}))  # fmt: skip

    report("trained", len(train), network.classify_features)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    for count in args.labels:
        rows = order[:count]
        x, y = train[rows], train_labels[rows]
        report("mlp_raw", count, fit_head(x, y, 2048, args.steps, 1e-4, args.seed))
        standardised = fit_head((x - mean) / std, y, 2048, args.steps, 1e-4, args.seed)
        report("mlp_standardised", count, lambda f, h=standardised: h((f - mean) / std))
        linear = fit_head((x - mean) / std, y, 0, args.steps, 1e-3, args.seed)
        report("linear_standardised", count, lambda f, h=linear: h((f - mean) / std))


if __name__ == "__main__":
    main()
