"""Tests for ``monai_cfx.data.split_fractions``."""

from __future__ import annotations

import unittest

from monai_cfx.data import split_fractions


class TestSplitFractions(unittest.TestCase):
    def test_split_fractions(self):
        fractions = split_fractions(32, 200, 200)
        self.assertEqual([int(round(f * 432)) for f in fractions], [32, 200, 200])
        with self.assertRaisesRegex(ValueError, "`counts`"):
            split_fractions(1, 2)


if __name__ == "__main__":
    unittest.main()
