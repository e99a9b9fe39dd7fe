"""What the inference bundles check before any model loads: datalists, items, the output folder, CLI overrides."""

import json
import os
import tempfile
import unittest
from pathlib import Path

from monai_cfx.apps.bundle_io import check_cli_overrides, check_output_dir, load_datalist, validate_items

COUNTERFACTUAL = Path(__file__).resolve().parents[2] / "bundles" / "counterfactual" / "configs"


class TestLoadDatalist(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        (self.tmp / "a.nii.gz").write_bytes(b"")

    def write(self, content) -> Path:
        path = self.tmp / "datalist.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    def test_paths_only_where_they_belong(self):
        path = self.write({"testing": [{"image": "a.nii.gz", "prompt": "", "report": "r", "note": "a.nii.gz"}]})
        (item,) = load_datalist(path, base_dir=self.tmp, text_keys=("prompt", "report"))
        self.assertEqual(item["image"], str(self.tmp / "a.nii.gz"))
        self.assertNotIn("prompt", item)  # empty: the config's default prompt, never the dataset folder
        self.assertEqual(item["note"], "a.nii.gz")  # not a path key: left alone
        (absolute,) = load_datalist(self.write({"testing": ["/abs/b.png"]}))
        self.assertEqual(absolute["image"], "/abs/b.png")

    def test_refusals_name_the_datalist_and_the_item(self):
        cases = [
            ("{not json", ValueError, "not valid JSON"),
            ({"training": []}, ValueError, "no 'testing' list"),
            ({"testing": []}, ValueError, "non-empty list"),
            ({"testing": [{"image": ""}]}, ValueError, "item 0 .*'image' must be a non-empty file path"),
            ({"testing": [{"image": "a.nii.gz"}, {"image": []}]}, ValueError, "item 1 .*'image'"),
            ({"testing": [{"image": "a.nii.gz", "prompt": ["x", "y"]}]}, ValueError, "'prompt' must be one string"),
            ({"testing": [{"mask": "a.nii.gz"}]}, ValueError, "has no 'image' key"),
            ({"testing": [3]}, ValueError, "must be an object"),
        ]
        for content, error, message in cases:
            with self.subTest(content=content):
                path = self.write(content)
                with self.assertRaisesRegex(error, message) as raised:
                    load_datalist(path)
                self.assertIn(str(path), str(raised.exception))
        with self.assertRaisesRegex(FileNotFoundError, "missing.json"):
            load_datalist(self.tmp / "missing.json")


class TestChecks(unittest.TestCase):
    def test_output_dir(self):
        with tempfile.TemporaryDirectory() as folder:
            a_file = Path(folder) / "file.txt"
            a_file.write_text("x")
            with self.assertRaisesRegex(NotADirectoryError, "file.txt"):
                check_output_dir(a_file / "out")
            (Path(folder) / "done").mkdir()
            (Path(folder) / "done" / "counterfactuals.json").write_text("[]")
            with self.assertRaisesRegex(FileExistsError, "counterfactuals.json"):
                check_output_dir(Path(folder) / "done", manifest_names=["counterfactuals.json"])
            check_output_dir(Path(folder) / "done", overwrite=True, manifest_names=["counterfactuals.json"])
            self.assertEqual(check_output_dir(Path(folder) / "new" / "deeper"), Path(folder) / "new" / "deeper")
            self.assertFalse((Path(folder) / "new").exists())  # checking creates nothing
            self.assertEqual(sorted(os.listdir(folder)), ["done", "file.txt"])
        with self.assertRaisesRegex(PermissionError, "not writable"):
            check_output_dir("/proc/monai_cfx_out")

    def test_cli_overrides(self):
        config = str(COUNTERFACTUAL / "inference.json")
        base = ["monai.bundle", "run", "--config_file", config]
        check_cli_overrides([*base, "--noise_strength", "0.2", "--diffusion_def#channels", "[1]"])
        with self.assertRaisesRegex(ValueError, "--noise_strenght.*'noise_strength'"):
            check_cli_overrides([*base, "--noise_strenght", "0.2"])
        listed = str([config, str(COUNTERFACTUAL / "evaluate.json")])
        check_cli_overrides(["run", "--config_file", listed, "--save_outputs", "true"])  # a key of evaluate.json
        with self.assertRaisesRegex(ValueError, "--save_output"):
            check_cli_overrides(["run", "--config_file", config, "--save_output", "true"])
        check_cli_overrides(["pytest", "-q"])  # not a bundle command line: nothing to check

    def test_validate_items_names_the_item(self):
        def transform(item):
            if item["image"] == "bad.png":
                raise RuntimeError("wrapped") from ValueError("constant image")
            return item

        items = [{"image": "good.png"}, {"image": "bad.png"}]
        with self.assertRaisesRegex(ValueError, r"item 1 \('bad.png'\).*ValueError: constant image"):
            validate_items(items, transform)
        with self.assertRaisesRegex(ValueError, "no items"):
            validate_items([], transform)
        self.assertEqual(validate_items(items[:1], transform), items[:1])


if __name__ == "__main__":
    unittest.main()
