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
"""monai_cfx: diffusion counterfactuals, phrase grounding, Latent Drifting and trajectory traversal for MONAI."""

from __future__ import annotations

import warnings

__version__ = "0.1.0"

# MONAI 1.6 decorates some modules with torch.jit, which torch >= 2.10 deprecates; the warning is
# noise for users of this library and says nothing about their code.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.(script|interface).*", category=DeprecationWarning)

__all__ = ["__version__"]
