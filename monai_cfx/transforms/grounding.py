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
"""Dictionary transforms that turn a datalist item's phrases (MS-CXR style) into tensors for grounding."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import MapTransform

from monai_cfx.networks.nets.text_encoder import PhraseTruncatedError

__all__ = [
    "PHRASE_SEPARATOR",
    "PhraseBoxMaskD",
    "PhraseBoxMaskDict",
    "PhraseBoxMaskd",
    "PhraseTokensD",
    "PhraseTokensDict",
    "PhraseTokensd",
    "phrase_list",
]

# joins an item's phrases into one string, so that batches of items collate (a list of strings would not)
PHRASE_SEPARATOR = " | "


def phrase_list(value: Any) -> list[dict[str, Any]]:
    """Normalise an item's phrases to ``[{"text": ..., "finding": ...?, "box": ...?}, ...]``.

    Accepts one phrase (a string), a list of strings, or a list of dicts with ``"text"`` (MS-CXR style, as the
    phantom datalists write them, with ``"finding"`` and a ``StandardMode`` ``"box"``).
    """
    items = [value] if isinstance(value, (str, Mapping)) else value
    if not isinstance(items, Sequence) or not items:
        raise ValueError(f"phrases must be a string, a list of strings or of {{'text': ...}} dicts, got {value!r}.")
    phrases = []
    for item in items:
        phrase = dict(item) if isinstance(item, Mapping) else {"text": item}
        if not isinstance(phrase.get("text"), str) or not phrase["text"].strip():
            raise ValueError(f"every phrase needs non-empty text, got {item!r} in {value!r}.")
        if PHRASE_SEPARATOR in phrase["text"]:
            raise ValueError(f"a phrase may not contain {PHRASE_SEPARATOR!r} (it joins the phrases), got {item!r}.")
        phrases.append(phrase)
    return phrases


class PhraseTokensd(MapTransform):
    """Find each phrase's tokens in the item's prompt, as a ``(P, L)`` boolean ``tokens_key`` for
    :class:`~monai_cfx.inferers.CrossAttentionGroundingInferer`.

    The phrases are read from the first of ``keys`` present (``"phrase"``, ``"phrases"``; see
    :func:`phrase_list`). The prompt is ``prompt_key``, else ``report_key`` (the report a phrase was taken
    from), else the phrases joined into one sentence. Special tokens are never selected
    (:meth:`~monai_cfx.networks.nets.TextEncoder.phrase_token_indices`). The transform also writes the prompt
    back to ``prompt_key``, the phrase texts to ``text_key`` (one string, phrases separated by ``" | "``, so
    that batches collate), and, with ``class_names``, the phrases' finding indices to ``class_key`` (-1 for
    none or unknown).

    A phrase that is in the prompt but past the text model's ``max_length`` (the model never reads it) is dropped
    with a warning, also from the item's phrases, so that later transforms stay aligned.

    Raises:
        ValueError: when an item has no phrases, a phrase is not in its prompt (the message names both), or every
            phrase is past ``max_length``.
    """

    def __init__(
        self,
        text_encoder: Any,
        keys: Sequence[str] = ("phrases", "phrase"),
        prompt_key: str = "prompt",
        report_key: str | None = "report",
        tokens_key: str = "phrase_tokens",
        text_key: str = "phrase_text",
        class_key: str = "phrase_class",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.text_encoder = text_encoder
        self.prompt_key, self.report_key = prompt_key, report_key
        self.tokens_key, self.text_key, self.class_key = tokens_key, text_key, class_key
        self.class_names = None if class_names is None else list(class_names)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        found = [key for key in self.keys if d.get(key) not in (None, "", [])]
        if not found:
            raise ValueError(f"the item has none of the phrase keys {list(self.keys)}; keys: {sorted(map(str, d))}.")
        phrases = phrase_list(d[found[0]])
        prompt = d.get(self.prompt_key) or (d.get(self.report_key) if self.report_key else None)
        if not isinstance(prompt, str) or not prompt.strip():
            prompt = ". ".join(p["text"].strip() for p in phrases) + "."
        rows, kept = [], []
        for phrase in phrases:
            try:
                indices = self.text_encoder.phrase_token_indices(prompt, phrase["text"])
            except PhraseTruncatedError as error:  # in the prompt, but past max_length: the model never reads it
                warnings.warn(f"{error} The phrase is skipped.", stacklevel=2)
                continue
            row = torch.zeros(self.text_encoder.max_length, dtype=torch.bool)
            row[indices] = True
            rows.append(row)
            kept.append(phrase)
        if not kept:
            raise ValueError(
                f"no phrase of {[p['text'] for p in phrases]!r} is within the first {self.text_encoder.max_length} "
                f"tokens of the prompt {prompt!r}; shorten the prompt or raise the text encoder's max_length."
            )
        tokens = torch.stack(rows)
        phrases = kept
        d[found[0]] = phrases  # later transforms (PhraseBoxMaskd) see the phrases kept here
        d[self.prompt_key] = prompt
        d[self.tokens_key] = tokens
        d[self.text_key] = PHRASE_SEPARATOR.join(p["text"].strip() for p in phrases)
        if self.class_names is not None:
            index = {name: i for i, name in enumerate(self.class_names)}
            d[self.class_key] = torch.tensor([index.get(p.get("finding"), -1) for p in phrases], dtype=torch.long)
        return d


class PhraseBoxMaskd(MapTransform):
    """Rasterise each phrase's ``StandardMode`` box (``[start_0, start_1, (start_2,) end_0, end_1, (end_2)]``,
    ends exclusive, in array indices) into a ``(P, *spatial)`` float mask ``mask_key`` shaped like ``ref_key``'s
    spatial size: the ground truth of box-level grounding metrics (as MS-CXR's).

    With ``allow_missing_keys``, items without phrases or whose phrases carry no boxes pass unchanged. A phrase
    without a box next to phrases with boxes gets an empty mask, on which the grounding metrics are undefined
    and skipped.

    Raises:
        ValueError: when a box is malformed or does not fit the reference image.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("phrases", "phrase"),
        ref_key: str = "image",
        mask_key: str = "phrase_mask",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.ref_key, self.mask_key = ref_key, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        found = [key for key in self.keys if d.get(key) not in (None, "", [])]
        if not found:
            if self.allow_missing_keys:
                return d
            raise ValueError(f"the item has none of the phrase keys {list(self.keys)}.")
        spatial = tuple(d[self.ref_key].shape[1:])
        phrases = phrase_list(d[found[0]])
        if self.allow_missing_keys and not any(p.get("box") for p in phrases):
            return d  # phrases without boxes (inference on a user's data): nothing to rasterise
        rows = []
        for phrase in phrases:
            box = [int(v) for v in phrase.get("box") or []]
            if not box:  # no extent known (e.g. a finding the acquisition hid): an empty mask, which metrics skip
                rows.append(torch.zeros(spatial))
                continue
            fits = len(box) == 2 * len(spatial) and all(
                0 <= box[i] < box[i + len(spatial)] <= size for i, size in enumerate(spatial)
            )
            if not fits:
                raise ValueError(
                    f"phrase {phrase['text']!r} needs a box [start..., end...] inside the image {spatial}, "
                    f"got {phrase.get('box')!r}."
                )
            mask = torch.zeros(spatial)
            mask[tuple(slice(box[i], box[i + len(spatial)]) for i in range(len(spatial)))] = 1.0
            rows.append(mask)
        d[self.mask_key] = torch.stack(rows)
        return d


PhraseTokensD = PhraseTokensDict = PhraseTokensd
PhraseBoxMaskD = PhraseBoxMaskDict = PhraseBoxMaskd
