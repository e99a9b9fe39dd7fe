"""scripts/train_shipped.sh names, for every shipped weight file, configs that exist and overrides those configs hold,
and writes into its own model folder, never into models/."""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
import unittest

from monai.bundle import ConfigParser

from tests.helpers import BUNDLES

BUNDLE = BUNDLES / "latent_diffusion"


class TestTrainShipped(unittest.TestCase):
    def test_every_command_parses_and_covers_the_shipped_files(self):
        env = dict(os.environ, DRY_RUN="1", MODEL_DIR="/tmp/reproduced")
        result = subprocess.run(["bash", str(BUNDLE / "scripts" / "train_shipped.sh")], env=env, capture_output=True,
                                text=True, check=True)  # fmt: skip
        commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
        self.assertEqual(len(commands), 16)
        trained = set()
        for command in commands:
            configs = ast.literal_eval(command[command.index("--config_file") + 1])
            parser = ConfigParser()
            parser.read_config([str(BUNDLE / name) for name in configs])
            overrides = {command[i][2:]: command[i + 1] for i in range(len(command)) if command[i].startswith("--")}
            self.assertEqual(overrides["model_dir"], "/tmp/reproduced")
            for key in overrides:
                if key not in ("config_file", "meta_file", "logging_file"):
                    self.assertIn(key, parser.config, f"{configs}: --{key} overrides nothing")
            if "pretrained_path" in overrides:  # a continuation starts a fresh optimiser, as the shipped runs did
                self.assertEqual(overrides["resume"], "false")
            dims = "3d" if "configs/3d.json" in configs else "2d"
            dims = "3d_lesion" if "configs/3d_lesion.json" in configs else dims
            dims = "2d_lesion" if "configs/2d_lesion.json" in configs else dims
            job = next(name for name in configs if "train_" in name).split("train_")[1][:-5]
            job = "diffusion_all_levels" if "configs/attention_all_levels.json" in configs else job
            trained.add(f"{job}_{dims}.pt")
        shipped = {path.name for path in (BUNDLE / "models").glob("*.pt")}
        self.assertEqual(trained, shipped)


if __name__ == "__main__":
    unittest.main()
