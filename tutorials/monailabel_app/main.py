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
"""A MONAI Label app serving monai_cfx's counterfactual and phrase-grounding bundles (see README.md here):

    monailabel start_server --app tutorials/monailabel_app --studies /data/studies --conf bundles /path/to/bundles

Models: ``counterfactual_2d`` / ``_3d`` (label: the difference map; request fields ``prompt``, ``noise_strength``,
``guidance_scale``, ``healthy_prompt``) and ``grounding_2d`` / ``_3d`` (label: the heat maps; ``phrase`` or ``phrases``
and ``prompt``). Every task runs the bundle folder's own configs; see ``monai_cfx.apps.monailabel``.
"""

from __future__ import annotations

from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp

import monai_cfx
from monai_cfx.apps.monailabel import bundle_infer_tasks

DEFAULT_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


class MonaiCfxApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundles = Path(conf.get("bundles") or DEFAULT_BUNDLES)
        self.dims = [int(d) for d in str(conf.get("dims", "2,3")).split(",")]
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai_cfx",
            description="Healthy counterfactuals with difference maps, and phrase-grounding heat maps",
            version=monai_cfx.__version__,
        )

    def init_infers(self):
        return bundle_infer_tasks(self.bundles, dims=self.dims)
