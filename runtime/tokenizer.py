# Ported from ltx_core/text_encoders/gemma/tokenizer.py (LTXVGemmaTokenizer; ltx-core 1.0.0)
"""The prompt tokenizer, read from the engine directory without `transformers`.

Engine-directory contract: `<engine_dir>/tokenizer/` holds what `transformers`' `save_pretrained` writes for the
Gemma tokenizer the official code loads (`AutoTokenizer.from_pretrained(gemma_root)`): `tokenizer.json` (the
fast tokenizer: normalizer, BPE model and the post-processor that prepends BOS) and `tokenizer_config.json`
(pad / EOS tokens). Loading the serialised fast tokenizer with the `tokenizers` package gives the very ids the
official `LTXVGemmaTokenizer(gemma_root, 1024)` gives: the prompt is stripped, encoded, truncated on the right to
1024 tokens (BOS included) and left-padded with the pad token (EOS when there is none) to exactly 1024.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import tokenizers
import torch

logger = logging.getLogger(__name__)

PROMPT_TOKENS = 1024  # base_encoder.py: LTXVGemmaTokenizer(tokenizer_root, 1024); the text engine's static length
TOKENIZER_DIR = "tokenizer"  # inside the engine directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TokenizerError(ValueError):
    """The tokenizer files are missing or unusable; the message names the file."""


def _token_text(entry: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


class PromptTokenizer:
    """prompt -> (input_ids [1, 1024] int64, attention_mask [1, 1024] int64, 1 = real token, left padding)."""

    def __init__(self, folder: str | Path, max_length: int = PROMPT_TOKENS) -> None:
        folder = Path(folder)
        for name in TOKENIZER_FILES:
            if not (folder / name).is_file():
                raise TokenizerError(f"{folder}: tokenizer file {name} is missing")
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{folder}/tokenizer_config.json: cannot read it ({e})") from None
        try:
            tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers binding raises a bare Exception for any malformed file
            raise TokenizerError(f"{folder}/tokenizer.json: cannot load it ({e})") from None
        pad = _token_text(config.get("pad_token")) or _token_text(config.get("eos_token"))
        pad_id = tok.token_to_id(pad) if pad is not None else None
        if pad_id is None:
            raise TokenizerError(f"{folder}/tokenizer_config.json: no usable pad_token or eos_token ({pad!r})")
        self.max_length = max_length
        self._count = tokenizers.Tokenizer.from_str(tok.to_str())  # untruncated, to warn about truncation
        self._count.no_truncation()
        self._count.no_padding()
        tok.enable_truncation(max_length, direction="right")  # HF `truncation=True`: longest_first, right side
        tok.enable_padding(direction="left", pad_id=pad_id, pad_token=pad, length=max_length)
        self._tok = tok

    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        text = prompt.strip()
        n = len(self._count.encode(text).ids)
        if n > self.max_length:
            logger.warning(
                "the prompt has %d tokens; only the first %d are used (the text encoder takes %d)",
                n,
                self.max_length,
                self.max_length,
            )
        enc = self._tok.encode(text)
        ids = torch.tensor([enc.ids], dtype=torch.int64)
        mask = torch.tensor([enc.attention_mask], dtype=torch.int64)
        return ids, mask
