# Ported from ltx_core/text_encoders/gemma/{encoders/base_encoder.py,encoders/encoder_configurator.py,
# tokenizer.py} (ltx-core 1.0.0)
"""Stage `text_encoder`: Gemma-3 (text part only) through `transformers`, plus the prompt tokenizer.

The official encoder runs `Gemma3ForConditionalGeneration.model(input_ids, attention_mask,
output_hidden_states=True)` on 1024 left-padded tokens and keeps all `num_hidden_layers + 1` hidden states (HF
convention: the scaled embeddings, the outputs of layers 1..N-1, and the *final-normed* output of layer N).
This module runs the same `transformers` layers (`Gemma3TextModel`'s embedding, decoder layers, final norm and
rotary tables) but drives them itself, so that the graph is export-friendly:

- position ids are `arange(T)` (the HF default the official code relies on; not padding-aware);
- the boolean attention masks (causal, plus sliding-window for local layers, AND the left-padding mask) are
  built with static-shape tensor ops instead of `transformers.masking_utils` (which branches in Python on the
  mask contents), and handed to the layers' SDPA attention exactly as HF would build them;
- no KV cache, no output-capturing hooks; the result is one stacked tensor `[B, T, D, N + 1]`, the layout the
  feature extractors consume (`torch.stack(hidden_states, dim=-1)` in the official code).

Padded query rows attend to nothing (all keys masked), as in HF. What SDPA returns for such a row depends on
the backend (CPU, CUDA math and mem-efficient: 0; cuDNN, torch 2.11's bf16 default on H100: finite non-zero),
so padded hidden states are backend-dependent, as they are in the official code; they never reach valid tokens
(masked as keys) and the feature extractor zeroes them. An export backend must keep them finite.

Weights come from a Hugging Face-layout folder (config.json, model.safetensors or a sharded index, tokenizer
files), memory-mapped. Accepted key layouts (first match wins, see `GEMMA_KEY_RULES`): the official release
layout `language_model.model.*` (what ltx-core's `GEMMA_LLM_KEY_OPS` expects), the transformers>=4.52
`Gemma3ForConditionalGeneration` layout `model.language_model.*`, and the `Gemma3ForCausalLM` layout `model.*`.
Vision tower, projector and LM head tensors are ignored (prompt enhancement is out of scope).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Gemma3Config, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding, Gemma3TextModel

from fvrt.builder.safetensors_io import CheckpointError, KeyRule, SafetensorsFile
from fvrt.runtime.manifest import json_object

logger = logging.getLogger(__name__)

MAX_TOKENS = 1024
"""Prompt length: `module_ops_from_gemma_root` builds `LTXVGemmaTokenizer(root, 1024)`; every prompt is padded
(left) or truncated to exactly this many tokens, and the connectors' registers tile it (1024 = 8 x 128)."""

GEMMA_KEY_RULES: tuple[KeyRule, ...] = (
    # official release layout (ltx-core GEMMA_LLM_KEY_OPS: language_model.model.* -> model.model.language_model.*)
    ("language_model.model.", "model."),
    ("language_model.lm_head.", None),
    # transformers >= 4.52 Gemma3ForConditionalGeneration.save_pretrained layout
    ("model.language_model.", "model."),
    ("model.vision_tower.", None),
    ("model.multi_modal_projector.", None),
    # vision parts of the official layout; LM head of both ConditionalGeneration and CausalLM
    ("vision_tower.", None),
    ("multi_modal_projector.", None),
    ("lm_head.", None),
    # Gemma3ForCausalLM layout (text-only checkpoints); must come after "model.language_model." etc.
    ("model.", "model."),
)
"""Checkpoint prefix -> module prefix of `GemmaTextEncoder`; None claims the tensor for nothing (ignored)."""

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def _module_key(ckpt_key: str) -> tuple[bool, str | None]:
    """(matched any rule, module key or None when the rule ignores the tensor)."""
    for ckpt_prefix, mod_prefix in GEMMA_KEY_RULES:
        if ckpt_key.startswith(ckpt_prefix):
            return True, None if mod_prefix is None else mod_prefix + ckpt_key[len(ckpt_prefix) :]
    return False, None


# --------------------------------------------------------------------------------------------------------------
# tokenizer


class GemmaPromptTokenizer:
    """Prompt -> exactly `max_length` token ids, left-padded, truncated on the right with a warning.

    Mirrors `LTXVGemmaTokenizer.tokenize_with_weights` (strip, `padding="max_length"`, `truncation=True`, pad
    token falls back to EOS); the official code truncates silently, fvrt logs a warning.
    """

    def __init__(self, folder: str | Path, max_length: int = MAX_TOKENS) -> None:
        folder = Path(folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, model_max_length=max_length
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder}: cannot load the Gemma tokenizer: {e}") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length

    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input_ids [1, max_length] int64, attention_mask [1, max_length] int64, 1 = real token)."""
        text = prompt.strip()
        n = len(self.tokenizer(text, truncation=False, verbose=False).input_ids)
        if n > self.max_length:
            logger.warning(
                "prompt has %d tokens; only the first %d are used (the text encoder takes %d tokens)",
                n,
                self.max_length,
                self.max_length,
            )
        enc = self.tokenizer(
            text, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return enc.input_ids.to(torch.int64), enc.attention_mask.to(torch.int64)


# --------------------------------------------------------------------------------------------------------------
# the model


class GemmaTextEncoder(nn.Module):
    """Gemma-3 text model returning every hidden state. Parameters live under `model.` (a `Gemma3TextModel`)."""

    def __init__(self, config: Gemma3TextConfig) -> None:
        super().__init__()
        config._attn_implementation = "sdpa"  # what HF picks by default; the masks below are boolean SDPA masks
        self.config = config
        self.model = Gemma3TextModel(config)
        self.layer_types: tuple[str, ...] = tuple(config.layer_types[: config.num_hidden_layers])
        self.sliding_window: int | None = config.sliding_window
        self.tokenizer: GemmaPromptTokenizer | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_hidden_states(self) -> int:
        """num_hidden_layers + 1 (49 for Gemma-3 12B)."""
        return int(self.config.num_hidden_layers) + 1

    def init_constants(self) -> None:
        """Non-persistent buffers (not in the checkpoint): rotary inverse frequencies and the embedding scale,
        computed by transformers' own code on the weights' device (the module was built on meta)."""
        device = self.model.embed_tokens.weight.device
        self.model.rotary_emb = Gemma3RotaryEmbedding(self.config, device=device)
        scale = torch.tensor(self.config.hidden_size**0.5, device=device)  # float32, as HF's buffer
        self.model.embed_tokens.register_buffer("embed_scale", scale, persistent=False)

    def _masks(self, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean SDPA masks [B, 1, T, T] (True = attend): causal AND key-is-real, plus the sliding window
        `k > q - window` for local layers (`transformers.masking_utils` semantics)."""
        t = attention_mask.shape[-1]
        idx = torch.arange(t, device=attention_mask.device)
        q, k = idx[:, None], idx[None, :]
        keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        full = (k <= q) & keys
        masks = {"full_attention": full}
        if self.sliding_window is not None:
            masks["sliding_attention"] = full & (k > q - self.sliding_window)
        return masks

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """The distinct layer types ("full_attention", "sliding_attention"), sorted: the order of `prologue`'s
        (mask, cos, sin) triples."""
        return tuple(sorted(set(self.layer_types)))

    @property
    def layer_kind_index(self) -> list[int]:
        """Per decoder layer, the index of its type in `attention_kinds`."""
        return [self.attention_kinds.index(t) for t in self.layer_types]

    def prologue(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything before the first decoder layer: (scaled embeddings [B, T, D], then per attention kind the
        boolean mask [B, 1, T, T] and the rotary cos, sin [B, T, head_dim])."""
        m = self.model
        h = m.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        masks = self._masks(attention_mask)
        tables: list[torch.Tensor] = []
        for kind in self.attention_kinds:
            cos, sin = m.rotary_emb(h, positions, kind)
            tables += [masks[kind], cos, sin]
        return (h, *tables)

    @staticmethod
    def run_layer(
        layer: nn.Module, h: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """One decoder layer (the same code for local and global layers: only the mask and rotary table differ)."""
        return layer(h, position_embeddings=(cos, sin), attention_mask=mask)

    def epilogue(self, states: torch.Tensor) -> torch.Tensor:
        """states [N + 1, B, T, D] (the embeddings, then every layer's output) -> [B, T, D, N + 1], the last one
        final-normed (HF `output_hidden_states` convention)."""
        hidden = torch.cat([states[:-1], self.model.norm(states[-1:])], dim=0)
        return hidden.permute(1, 2, 3, 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T] int64; attention_mask: [B, T] (1 = real token, 0 = left padding).

        Returns all hidden states stacked as [B, T, D, N + 1] in the weights' dtype: index 0 is the scaled
        embedding, index i the output of layer i, and index N the final-normed output of layer N. (The engines
        run the same three pieces: `prologue`, `run_layer` x N, `epilogue`.)
        """
        h, *tables = self.prologue(input_ids, attention_mask)
        states = [h]
        for layer, k in zip(self.model.layers, self.layer_kind_index, strict=True):
            h = self.run_layer(layer, h, *tables[3 * k : 3 * k + 3])
            states.append(h)
        return self.epilogue(torch.stack(states))

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and run: returns (hidden states [1, T, D, N + 1], attention mask [1, T] int64)."""
        if self.tokenizer is None:
            raise RuntimeError("this GemmaTextEncoder has no tokenizer (load it with load_gemma)")
        ids, mask = self.tokenizer(prompt)
        device = self.model.embed_tokens.weight.device
        ids, mask = ids.to(device), mask.to(device)
        return self(ids, mask), mask


# --------------------------------------------------------------------------------------------------------------
# loading


def gemma_text_config(folder: str | Path) -> Gemma3TextConfig:
    """The text config of a Gemma-3 HF folder (`config.json` of a `gemma3` or `gemma3_text` model)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Gemma-3 folder in the Hugging Face layout)")
    raw = json_object(path.read_text(), str(path), CheckpointError)
    model_type = raw.get("model_type")
    if model_type == "gemma3":
        cfg = Gemma3Config.from_dict(raw).text_config
    elif model_type == "gemma3_text":
        cfg = Gemma3TextConfig.from_dict(raw)
    else:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a Gemma-3 model ('gemma3' / 'gemma3_text')")
    # knobs the SDPA path or the official encoder do not use; refuse rather than compute something else
    for key, expected in (("attn_logit_softcapping", None), ("use_bidirectional_attention", False)):
        value = getattr(cfg, key, expected)
        if value != expected:
            raise CheckpointError(f"{path}: text config '{key}' = {value!r} is not supported (expected {expected!r})")
    return cfg


def _weight_files(folder: Path) -> list[Path]:
    index = folder / _INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / _SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder}: no {_SINGLE_FILE} or {_INDEX_FILE} (Gemma weights must be safetensors)")


def _collect(
    files: Iterable[SafetensorsFile], expected: dict[str, torch.Tensor]
) -> dict[str, tuple[SafetensorsFile, str]]:
    """Module key -> (file, checkpoint key) for every tensor a rule maps into the module; strict on extras."""
    found: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in files:
        for ck in f.entries:
            matched, mk = _module_key(ck)
            if not matched:
                raise CheckpointError(f"{f.path}: unexpected tensor '{ck}' (not a Gemma-3 key)")
            if mk is None:
                continue  # vision tower / projector / LM head
            if mk not in expected:
                raise CheckpointError(f"{f.path}: unexpected tensor '{ck}' (the Gemma text model has no '{mk}')")
            if mk in found:
                raise CheckpointError(f"{f.path}: tensor '{ck}' duplicates '{found[mk][1]}' ({found[mk][0].path})")
            found[mk] = (f, ck)
    return found


def _checkpoint_name(module_key: str, found: dict[str, tuple[SafetensorsFile, str]]) -> str:
    """Name a missing module tensor in the layout the files use (official layout when nothing was found)."""
    prefix = "language_model.model."
    for mk, (_, ck) in found.items():
        prefix = ck[: len(ck) - len(mk) + len("model.")]
        break
    return prefix + module_key[len("model.") :]


def load_gemma(
    folder: str | Path, dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu"
) -> GemmaTextEncoder:
    """Load the Gemma-3 text encoder (and its tokenizer) from a Hugging Face-layout folder.

    Strict: a missing, unexpected (under a text-model prefix) or mis-shaped tensor raises `CheckpointError`
    naming it. Weights are memory-mapped; with `dtype` None or equal to the stored dtype, CPU weights stay mapped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Gemma folder not found: {folder}")
    config = gemma_text_config(folder)
    files = [SafetensorsFile(p) for p in _weight_files(folder)]
    with torch.device("meta"):
        module = GemmaTextEncoder(config)
    expected = module.state_dict()
    found = _collect(files, expected)
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: missing Gemma tensor '{_checkpoint_name(missing[0], found)}'{more}")
    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    for mk, (f, ck) in found.items():
        info = f.entries[ck]
        want = tuple(expected[mk].shape)
        if info.shape != want:
            raise CheckpointError(f"{f.path}: tensor '{ck}' has shape {list(info.shape)}, Gemma expects {list(want)}")
        t = f.tensor(ck)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[mk] = t.to(device)
    module.load_state_dict(state, strict=True, assign=True)
    module.init_constants()
    left = [n for n, p in module.named_parameters() if p.is_meta] + [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"GemmaTextEncoder: uninitialised tensors after loading: {', '.join(left[:8])}")
    module.tokenizer = GemmaPromptTokenizer(folder)
    return module.eval()
