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
"""Data-parallel training (configs/multi_gpu_train.json) with torchrun and gloo on the CPU: Latent Drifting's
Textual Inversion (trained token embeddings outside the UNet) and Mediffusion's joint network (a head called outside
forward). Each process trains on its share, the gradients are averaged (the run fails if the processes' weights
differ at the end), rank 0 alone writes, and the folder holds the files of a one-process run."""

from __future__ import annotations

import json
import sys

import torch

from monai_cfx.data import ensure_phantom_datalist
from tests.bundles.test_multi_process_inference import free_port
from tests.helpers import BUNDLES, TempFolderCase, check_ok, run_relocated


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]


class TestMultiProcessTraining(TempFolderCase):
    def test_textual_inversion_on_two_processes(self):
        bundle = BUNDLES / "latent_drifting"
        # 4 target images, 2 per process and step: one step per process (two for one process with batches of 2)
        common = ["--dataset_dir", str(self.tmp / "target"), "--num_target_training", "4", "--num_target_held_out", "4"]
        common += ["--max_epochs", "1", "--batch_size", "2", "--log_every", "1"]
        common += ["--mode", "textual_inversion", "--drift", "0.02"]
        one, two = self.tmp / "one" / "ti.pt", self.tmp / "two" / "ti.pt"
        check_ok(self, run_relocated(bundle, ["inference.json", "finetune.json"], *common, "--finetuned_path",
                                     str(one), cwd=self.tmp))  # fmt: skip
        result = run_relocated(bundle, ["inference.json", "finetune.json", "multi_gpu_train.json"], *common,
                               "--finetuned_path", str(two), cwd=self.tmp, launcher=torchrun())  # fmt: skip
        check_ok(self, result)  # includes GradientAllReduce's end-of-run check that both processes agree
        log = result.stdout + result.stderr
        self.assertEqual(log.count("Epoch: 1/1, Iter: 1/1"), 2, log[-3000:])  # each process: 1 step of its 2 images
        self.assertEqual(sorted(p.name for p in two.parent.iterdir()), sorted(p.name for p in one.parent.iterdir()))
        expected, actual = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
        self.assertEqual(actual["token_embeddings"]["tokens"], expected["token_embeddings"]["tokens"])
        self.assertEqual((actual["mode"], actual["drift"], actual["unet"]), ("textual_inversion", 0.02, {}))
        state = torch.load(two.parent / "ti_training_state.pt", weights_only=True)
        self.assertEqual(len(state["random"]), 2)  # every process's random states, for an exact resume

    def test_mediffusion_joint_network_on_two_processes(self):
        bundle = BUNDLES / "mediffusion"
        data = self.tmp / "phantoms"
        ensure_phantom_datalist(data, kind="chest", num=40, seed=5000, size=64)
        common = ["--dataset_dir", str(data), "--num_subjects", "40", "--seed", "5000", "--max_epochs", "1"]
        common += ["--epoch_length", "2", "--batch_size", "4", "--labelled_fraction", "0.25", "--log_every", "1"]
        outputs = {}
        for name, configs, launcher in (("one", ["train.json"], None),
                                        ("two", ["train.json", "multi_gpu_train.json"], torchrun())):  # fmt: skip
            out, models = self.tmp / f"mediffusion_{name}", self.tmp / f"models_{name}"
            result = run_relocated(bundle, configs, *common, "--output_dir", str(out), "--model_dir", str(models),
                                   "--model_name", "joint", cwd=self.tmp, launcher=launcher)  # fmt: skip
            check_ok(self, result)
            outputs[name] = (out, models, result.stdout + result.stderr)
        (out_one, models_one, _), (out_two, models_two, log) = outputs["one"], outputs["two"]
        self.assertEqual(log.count("Epoch: 1/1, Iter: 2/2"), 2, log[-3000:])  # both processes, 2 steps each
        self.assertEqual(sorted(p.name for p in out_two.iterdir()), sorted(p.name for p in out_one.iterdir()))
        self.assertEqual(sorted(p.name for p in models_two.iterdir()), ["joint.pt"])
        record = json.loads((out_two / "training.json").read_text())
        self.assertEqual(record["iterations"], 2)
        self.assertEqual(record["num_labelled"], json.loads((out_one / "training.json").read_text())["num_labelled"])
        published = torch.load(models_two / "joint.pt", weights_only=True)
        self.assertEqual(sorted(published), sorted(torch.load(models_one / "joint.pt", weights_only=True)))
