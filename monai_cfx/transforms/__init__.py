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
"""MONAI transforms: difference maps, Otsu thresholds, phrase tokens and box masks, cached latents."""

from .difference import (
    DifferenceMap,
    DifferenceMapD,
    DifferenceMapd,
    DifferenceMapDict,
    OtsuThreshold,
    OtsuThresholdD,
    OtsuThresholdd,
    OtsuThresholdDict,
)
from .grounding import (
    PHRASE_SEPARATOR,
    PhraseBoxMaskD,
    PhraseBoxMaskd,
    PhraseBoxMaskDict,
    PhraseTokensD,
    PhraseTokensd,
    PhraseTokensDict,
    phrase_list,
)
from .latent import EncodeLatentd
from .scan import (
    INTENSITY_MODES,
    CheckScand,
    ScaleIntensityToModeld,
    ScanToModelDimsd,
    fit_to_size,
    scan_name,
    scan_preprocessing,
)

__all__ = [
    "CheckScand",
    "INTENSITY_MODES",
    "ScaleIntensityToModeld",
    "ScanToModelDimsd",
    "fit_to_size",
    "scan_name",
    "scan_preprocessing",
    "DifferenceMap",
    "DifferenceMapD",
    "DifferenceMapDict",
    "DifferenceMapd",
    "EncodeLatentd",
    "OtsuThreshold",
    "OtsuThresholdD",
    "OtsuThresholdDict",
    "OtsuThresholdd",
    "PHRASE_SEPARATOR",
    "PhraseBoxMaskD",
    "PhraseBoxMaskDict",
    "PhraseBoxMaskd",
    "PhraseTokensD",
    "PhraseTokensDict",
    "PhraseTokensd",
    "phrase_list",
]
