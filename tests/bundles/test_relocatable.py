"""Every bundle runs from any working directory: no cwd-relative config references, paths from bundle_root, the
latent diffusion definitions the other bundles copy kept equal to that bundle's, and a ConfigWorkflow loaded with
only bundle_root and config paths. (tests/bundles/test_user_formats.py runs the counterfactual and grounding CLIs
from another folder.)"""

import contextlib
import re
import tempfile
import unittest
from pathlib import Path

from monai.bundle import ConfigParser, ConfigWorkflow

from tests.helpers import BUNDLES

# job configs of each bundle, each merged on top of configs/inference.json (the traversal and Mediffusion bundles
# list their own merges)
JOBS = {
    "latent_diffusion": ["train_autoencoder", "train_diffusion", "train_oracle", "evaluate"],
    "counterfactual": ["evaluate"],
    "phrase_grounding": ["evaluate"],
    "latent_drifting": ["finetune", "evaluate", "drift_search"],
    "trajectory_traversal": ["evaluate"],
    "mediffusion": ["evaluate_classifier", "evaluate_counterfactual"],
}
# what the counterfactual, grounding and drifting bundles copy from the latent diffusion bundle: the architecture
# of the weights they load, which must not drift apart
SHARED_DEFINITIONS = [
    "latent_channels",
    "autoencoder_channels",
    "text_encoder_path",
    "text_max_length",
    "cross_attention_dim",
    "text_encoder",
    "autoencoder_def",
    "diffusion_def",
    "prediction_type",
    "num_train_timesteps",
    "sampling_scheduler",
]
MACRO_FILE_REFERENCE = re.compile(r"%[^#\"\s]*\.(json|yaml|yml)#")


def _raw(bundle: str, names: list[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f"{name}.json") for name in names])
    return parser


class TestRelocatableBundles(unittest.TestCase):
    def test_no_config_refers_to_a_file_relative_to_the_working_directory(self):
        for path in sorted(BUNDLES.glob("*/configs/*.json")):
            with self.subTest(config=str(path.relative_to(BUNDLES))):
                self.assertIsNone(MACRO_FILE_REFERENCE.search(path.read_text()))

    def test_metadata_keeps_its_required_packages_after_monai_reads_it(self):
        for path in sorted(BUNDLES.glob("*/configs/metadata.json")):
            with self.subTest(metadata=str(path.relative_to(BUNDLES))):
                parser = ConfigParser()
                parser.read_meta(str(path))
                required = parser.get("_meta_")["required_packages_version"]
                self.assertTrue({"monai_cfx", "transformers", "nibabel"} <= set(required), required)

    def test_copied_definitions_equal_the_latent_diffusion_bundles(self):
        weight_files = ["load_autoencoder_path", "load_diffusion_path", "scale_factor_path"]
        # (the bundle's configs, the latent diffusion bundle's configs they copy, whether the weight files are copied)
        recipes = {
            "3d_lesion": (["3d", "3d_lesion"], ["3d", "3d_lesion"], True),
            "2d_lesion": (["2d_lesion"], ["2d_lesion"], True),
        }
        for bundle in ("counterfactual", "phrase_grounding", "latent_drifting"):
            cases = [([], [], False), (["3d"], ["3d"], False)]
            cases += [
                case for name, case in recipes.items() if (BUNDLES / bundle / "configs" / f"{name}.json").is_file()
            ]
            if bundle == "phrase_grounding":
                # its defaults are the lesion recipes (2D and 3D), 2d_all_levels.json the 2D UNet before
                cases[0] = ([], ["2d_lesion"], True)
                cases[1] = (["3d"], ["3d", "3d_lesion"], True)
                cases.append((["2d_all_levels"], ["attention_all_levels"], False))
            for extra, source_extra, with_weight_files in cases:
                source = _raw("latent_diffusion", ["inference", *source_extra])
                copy = _raw(bundle, ["inference", *extra])
                keys = SHARED_DEFINITIONS + ["diffusion_attention_levels"] + (weight_files if with_weight_files else [])
                for key in keys:
                    with self.subTest(bundle=bundle, extra=extra, key=key):
                        self.assertEqual(copy.get(key), source.get(key))

    def test_paths_resolve_from_bundle_root_in_another_folder(self):
        with tempfile.TemporaryDirectory() as elsewhere, contextlib.chdir(elsewhere):
            for bundle, jobs in JOBS.items():
                root = BUNDLES / bundle
                for job in [None, *jobs]:
                    names = ["inference"] + ([job] if job else [])
                    with self.subTest(bundle=bundle, configs=names):
                        workflow = ConfigWorkflow(
                            config_file=[str(root / "configs" / f"{name}.json") for name in names],
                            meta_file=str(root / "configs" / "metadata.json"),
                            logging_file=str(root / "configs" / "logging.conf"),
                            workflow_type=None,
                            bundle_root=str(root),
                        )
                        parser = workflow.parser
                        self.assertEqual(Path(parser.get_parsed_content("bundle_root")), root)
                        for key in ("load_diffusion_path", "load_autoencoder_path", "scale_factor_path"):
                            if key in parser:
                                self.assertTrue(Path(parser.get_parsed_content(key)).is_file(), key)
                        self.assertTrue(str(parser.get_parsed_content("output_dir")).startswith(str(root)))


if __name__ == "__main__":
    unittest.main()
