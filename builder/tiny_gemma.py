"""A tiny random Gemma-3 folder in the Hugging Face layout, for text-encoder tests.

`write_tiny_gemma(folder)` writes what the official loader (`ModelLedger`'s text-encoder builder) and fvrt's
`load_gemma` both read: `config.json`, `model.safetensors` (random `Gemma3ForConditionalGeneration` weights,
tiny vision tower included), a sentencepiece `tokenizer.model` trained on a few sentences, `tokenizer_config.json`
and `preprocessor_config.json`. The official encoder builds Gemma from the hard-coded 12B
`GEMMA3_CONFIG_FOR_LTX`; tests patch it with ltx-core's config object of the same sizes, and the folder's
config.json holds the same values (a test checks), so both sides build the same model.
"""

from __future__ import annotations

import io
import json
from importlib import resources
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from fvrt.builder.checkpoint import save_safetensors
from fvrt.builder.configs import TINY_TEXT_ENCODER

SENTENCES = (
    "A cat sits on a red mat in the warm afternoon sun.",
    "The camera pans slowly across a misty pine forest at dawn.",
    "Two dogs run along the beach while waves crash on the rocks.",
    "A woman speaks softly; rain falls on the window behind her.",
    "Close-up of hands playing a grand piano, dramatic cinematic lighting.",
    "An old man laughs and raises his glass in a crowded tavern.",
)
# Gemma's special-token ids (pad 0, eos 1, bos 2, unk 3) and its image/turn markers, so that the official
# Gemma3Processor-facing config (boi/eoi/image token indices) points at real pieces.
SPECIAL_PIECES = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
SPM_VOCAB = 200
LAYOUTS = ("official", "conditional", "causal")


def tiny_gemma_config_dict() -> dict:
    """The tiny Gemma-3 config (`Gemma3Config.to_dict()` form; hidden/layers as `TINY_TEXT_ENCODER`): 4 heads x 8
    with 2 KV heads (GQA), sliding window 16 < the 1024 prompt tokens so the local mask differs from the causal
    one, and pattern 2 so that sliding and global layers alternate. RoPE keeps the 12B values (linear x8
    global). Stored in presets/tiny-gemma3.json; tests check it equals ltx-core's `Gemma3ConfigData` built with
    these sizes, which is what the official encoder is patched with."""
    data = json.loads(resources.files("fvrt.builder.presets").joinpath("tiny-gemma3.json").read_text())
    text = data["text_config"]
    if (text["hidden_size"], text["num_hidden_layers"]) != (
        TINY_TEXT_ENCODER["hidden_size"],
        TINY_TEXT_ENCODER["num_hidden_layers"],
    ):
        raise RuntimeError("presets/tiny-gemma3.json disagrees with configs.TINY_TEXT_ENCODER")
    return data


def _tokenizer_model() -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20),
        model_writer=buf,
        vocab_size=SPM_VOCAB,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(SPECIAL_PIECES),
        character_coverage=1.0,
        minloglevel=2,
    )
    return buf.getvalue()


def _layout_key(key: str, layout: str) -> str | None:
    """HF v5 `Gemma3ForConditionalGeneration.state_dict()` key -> key in `layout` (None: not written)."""
    if key.startswith("lm_head."):
        return None  # tied to embed_tokens; the official loader duplicates it itself
    if layout == "conditional":
        return key
    renames = {
        "official": {  # the layout of the released Gemma weights, as GEMMA_LLM_KEY_OPS expects it
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
        },
        "causal": {"model.language_model.": "model."},  # Gemma3ForCausalLM: text model only
    }[layout]
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def tiny_gemma_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the tiny `Gemma3ForConditionalGeneration`, keyed as its (transformers v5) state_dict.
    Scales keep activations O(1): norms 1 + N(0, 0.1) (Gemma norms multiply by 1 + w), Linears N(0, 1/fan_in)."""
    hf_config = Gemma3Config.from_dict(tiny_gemma_config_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(hf_config)
    out = {}
    for name, p in model.state_dict().items():
        if "norm" in name:
            std = 0.1
        elif p.ndim == 2 and "embed" not in name:
            std = p.shape[1] ** -0.5
        else:
            std = 0.5
        out[name] = torch.randn(p.shape, generator=gen) * std
    return out


def write_tiny_gemma(folder: Path, *, seed: int = 0, layout: str = "official") -> Path:
    """Write the tiny Gemma folder; `layout` picks the weight key layout (see `LAYOUTS`)."""
    folder.mkdir(parents=True, exist_ok=True)
    Gemma3Config.from_dict(tiny_gemma_config_dict()).to_json_file(str(folder / "config.json"))
    tensors = {}
    for key, value in tiny_gemma_weights(seed).items():
        new = _layout_key(key, layout)
        if new is not None:
            tensors[new] = value
    save_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    (folder / "tokenizer.model").write_bytes(_tokenizer_model())
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "extra_special_tokens": {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    # only looked up by the official loader (its prompt-enhancement processor); never read by fvrt
    preprocessor = {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28, "width": 28}}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))
    return folder
