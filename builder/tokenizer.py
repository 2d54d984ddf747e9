"""The Gemma tokenizer of an engine directory: saved into <engine dir>/tokenizer/ as the runtime reads it
(`fvrt.runtime.tokenizer`), and once per build for the calibration runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fvrt.builder.request import BuildError, Plan
from fvrt.runtime.manifest import sha256_file
from fvrt.runtime.tokenizer import TOKENIZER_DIR

Log = Callable[[str], None]

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def save_tokenizer(plan: Plan, dst: Path, scratch: Path) -> None:
    """Save the Gemma tokenizer into `dst` as the runtime reads it."""
    req = plan.request
    if req.gemma is not None:
        src = Path(req.gemma)
    elif req.random == "tiny":
        src = scratch / "gemma"
    else:  # random full: no real Gemma tokenizer exists offline; the tiny one (its ids < the 12B vocab)
        src = write_tiny_tokenizer(scratch / "gemma-tokenizer")
    if not any((src / n).is_file() for n in TOKENIZER_FILES):
        raise BuildError(f"--gemma: {src} has none of the tokenizer files {', '.join(TOKENIZER_FILES)}")
    # The runtime reads the fast tokenizer (tokenizer.json) with the `tokenizers` package alone; saving what
    # transformers loads for the official LTXVGemmaTokenizer gives it exactly the official ids (a raw
    # sentencepiece read of tokenizer.model does not: no BOS post-processor).
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(dst))
    except (OSError, ValueError) as e:
        raise BuildError(f"--gemma: cannot load the tokenizer in {src}: {e}") from None


def copy_tokenizer(plan: Plan, tmp: Path, scratch: Path, log: Log) -> dict[str, str]:
    """Save the Gemma tokenizer into tmp/tokenizer/ as the runtime reads it; returns {relative path: sha256}."""
    dst = tmp / TOKENIZER_DIR
    save_tokenizer(plan, dst, scratch)
    out = {f"{TOKENIZER_DIR}/{f.name}": sha256_file(f) for f in sorted(dst.iterdir()) if f.is_file()}
    log(f"tokenizer: saved {', '.join(sorted(p.rsplit('/', 1)[-1] for p in out))}")
    return out


def write_tiny_tokenizer(folder: Path) -> Path:
    """The tiny Gemma's sentencepiece tokenizer alone (what `write_tiny_gemma` writes, minus the weights and
    the config, which need the official package)."""
    from fvrt.builder.tiny_gemma import _tokenizer_model

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(_tokenizer_model())
    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def calib_tokenizer(plan: Plan, scratch: Path) -> Path:
    """The tokenizer as the runtime reads it, saved once per build for the calibration runs (DiT and text)."""
    tok = scratch / "calib-tokenizer"
    if not tok.is_dir():
        tok.mkdir(parents=True)
        save_tokenizer(plan, tok, scratch)
    return tok
