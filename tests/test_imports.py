"""Every public subpackage imports first in a fresh interpreter (no import cycle hidden by an earlier import)."""

from __future__ import annotations

import subprocess
import sys
import unittest

SUBPACKAGES = ("monai_cfx.networks.nets", "monai_cfx.networks", "monai_cfx.transforms", "monai_cfx.inferers",
               "monai_cfx.engines", "monai_cfx.handlers", "monai_cfx.metrics", "monai_cfx.visualize",
               "monai_cfx.apps.mediffusion", "monai_cfx.apps.traversal")  # fmt: skip


class TestFreshImports(unittest.TestCase):
    def test_each_subpackage_imports_first(self):
        processes = {
            name: subprocess.Popen([sys.executable, "-c", f"import {name}"], stderr=subprocess.PIPE, text=True)
            for name in SUBPACKAGES
        }
        failed = {name: p.communicate(timeout=300)[1][-500:] for name, p in processes.items() if p.wait(300) != 0}
        self.assertEqual(failed, {})


if __name__ == "__main__":
    unittest.main()
