"""The official implementation (ltx-core 1.0.0) as a test oracle on CPU.

Builds official stage modules from a config dict, randomises them, writes official-format checkpoint files
and loads files back with the official loader. Used only by tests; ltx-core is a test dependency.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvrt.builder.checkpoint import default_randomize, save_checkpoint, stage_spec


def install_torchaudio_stub() -> None:
    """ltx_core/model/audio_vae/ops.py imports torchaudio at module import, but only the audio *encoder*'s
    mel front end uses it, and torchaudio has no release for CPU torch 2.13/2.14. A stub module lets the
    rest import; touching it raises."""
    if "torchaudio" in sys.modules:
        return
    # transformers probes `importlib.util.find_spec("torchaudio")` on first import and caches the answer; let it
    # see the real absence before the stub exists (a stub without __spec__ would make that probe raise).
    import transformers  # noqa: F401

    try:
        import torchaudio  # noqa: F401

        return
    except ImportError:
        pass

    def _unavailable(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("torchaudio is stubbed in fvrt tests")

    stub = types.ModuleType("torchaudio")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", loader=None)
    stub.transforms = types.SimpleNamespace(MelSpectrogram=_unavailable)  # type: ignore[attr-defined]
    stub.functional = types.SimpleNamespace(resample=_unavailable)  # type: ignore[attr-defined]
    sys.modules["torchaudio"] = stub


install_torchaudio_stub()


def _configurators() -> dict[str, Callable[[Mapping[str, Any]], nn.Module]]:
    from ltx_core.model.audio_vae import AudioDecoderConfigurator, VocoderConfigurator
    from ltx_core.model.transformer import LTXModelConfigurator
    from ltx_core.model.upsampler import LatentUpsamplerConfigurator
    from ltx_core.model.video_vae import VideoDecoderConfigurator, VideoEncoderConfigurator
    from ltx_core.text_encoders.gemma import EmbeddingsProcessorConfigurator

    return {
        "dit": LTXModelConfigurator.from_config,
        "text_projection": EmbeddingsProcessorConfigurator.from_config,
        "video_encoder": VideoEncoderConfigurator.from_config,
        "video_decoder": VideoDecoderConfigurator.from_config,
        "audio_decoder": AudioDecoderConfigurator.from_config,
        "vocoder": VocoderConfigurator.from_config,
        "upsampler": LatentUpsamplerConfigurator.from_config,
    }


def _official_sd_ops() -> dict[str, Any]:
    from ltx_core.model.audio_vae import AUDIO_VAE_DECODER_COMFY_KEYS_FILTER, VOCODER_COMFY_KEYS_FILTER
    from ltx_core.model.transformer import LTXV_MODEL_COMFY_RENAMING_MAP
    from ltx_core.model.video_vae import VAE_DECODER_COMFY_KEYS_FILTER, VAE_ENCODER_COMFY_KEYS_FILTER
    from ltx_core.text_encoders.gemma import EMBEDDINGS_PROCESSOR_KEY_OPS

    return {
        "dit": LTXV_MODEL_COMFY_RENAMING_MAP,
        "text_projection": EMBEDDINGS_PROCESSOR_KEY_OPS,
        "video_encoder": VAE_ENCODER_COMFY_KEYS_FILTER,
        "video_decoder": VAE_DECODER_COMFY_KEYS_FILTER,
        "audio_decoder": AUDIO_VAE_DECODER_COMFY_KEYS_FILTER,
        "vocoder": VOCODER_COMFY_KEYS_FILTER,
        "upsampler": None,
    }


def official_random(stage: str, config: Mapping[str, Any], seed: int) -> nn.Module:
    """The official module of `stage`, fp32 on CPU, with weights drawn as fvrt's `build_random` draws them
    (parameter names are shared, so the stage's own `randomize` applies)."""
    module = _configurators()[stage](dict(config))
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        # ltx-core builds the LTX-2 caption projections on the meta device; materialise before randomising
        module = module.to_empty(device="cpu")
    module = module.to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    spec = stage_spec(stage)
    (spec.randomize or default_randomize)(module, gen)
    return module.eval()


def write_official_checkpoint(
    path: Path, config: Mapping[str, Any], modules: Mapping[str, nn.Module], extra: Mapping[str, str] | None = None
) -> Path:
    """Official-format safetensors: the official modules' tensors under the release's keys plus `config`."""
    save_checkpoint(path, modules, config, extra_metadata=extra)
    return path


def official_load(stage: str, path: Path) -> nn.Module:
    """Load `stage` from `path` with the official loader (ltx-core's SingleGPUModelBuilder), fp32 on CPU."""
    from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder

    configurators = {
        "dit": "ltx_core.model.transformer:LTXModelConfigurator",
        "text_projection": "ltx_core.text_encoders.gemma:EmbeddingsProcessorConfigurator",
        "video_encoder": "ltx_core.model.video_vae:VideoEncoderConfigurator",
        "video_decoder": "ltx_core.model.video_vae:VideoDecoderConfigurator",
        "audio_decoder": "ltx_core.model.audio_vae:AudioDecoderConfigurator",
        "vocoder": "ltx_core.model.audio_vae:VocoderConfigurator",
        "upsampler": "ltx_core.model.upsampler:LatentUpsamplerConfigurator",
    }
    mod_name, cls_name = configurators[stage].split(":")
    cls = getattr(__import__(mod_name, fromlist=[cls_name]), cls_name)
    builder = SingleGPUModelBuilder(
        model_class_configurator=cls, model_path=str(path), model_sd_ops=_official_sd_ops()[stage]
    )
    return builder.build(device=torch.device("cpu"), dtype=torch.float32).eval()


def tiny_gemma_config_data() -> object:
    """ltx-core's `Gemma3ConfigData` at the tiny sizes (scripts/official_distilled.py, shared with the bench)."""
    install_torchaudio_stub()
    return _official_distilled().tiny_gemma_config_data()


@contextlib.contextmanager
def official_tiny_gemma() -> Iterator[None]:
    """Swap ltx-core's hard-coded Gemma-3 12B config for the tiny one (both modules hold a reference)."""
    install_torchaudio_stub()
    with _official_distilled().official_tiny_gemma():
        yield


def _official_distilled() -> types.ModuleType:
    """scripts/official_distilled.py (the bench's official side) as a module."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import official_distilled

    return official_distilled
