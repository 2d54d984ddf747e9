# Ported from ltx_core/model/audio_vae/vocoder.py, resnet.py and model_configurator.py (ltx-core 1.0.0)
"""Vocoders: log-mel -> stereo waveform.

LTX-2 (19B): HiFi-GAN (ResBlock1 + LeakyReLU), mel at 100 frames/s -> 24 kHz.
LTX-2.3: BigVGAN-v2 generator (AMPBlock1 + SnakeBeta behind anti-aliased x2 up/down kaiser-sinc filters) -> 16 kHz,
then bandwidth extension (BWE): causal log-mel of the 16 kHz wave (STFT and mel bases stored in the checkpoint)
-> a second BigVGAN generator predicts a 48 kHz residual, added to a Hann-sinc x3 resampling of the 16 kHz wave.

The config's `vocoder` section selects the variant exactly as ltx-core's `VocoderConfigurator` does: a flat
section is HiFi-GAN, a section with a `bwe` key is {`vocoder`: BigVGAN, `bwe`: BWE generator + STFT}.
Parameter and buffer names equal the official `state_dict()` names; the one non-persistent buffer (the x3
resampler filter) is computed by `init_constants()`.

Forwards take static shapes and have no value-dependent control flow: every branch depends only on the config
and on tensor shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fvrt.builder.checkpoint import CheckpointError, StageSpec, require

# --- constants (all from ltx_core/model/audio_vae/vocoder.py and resnet.py, ltx-core 1.0.0) ----------------------
STEREO = 2  # every production checkpoint is stereo; VocoderConfigurator refuses stereo != True
MEL_BINS = 64  # mel bins per channel: conv_pre's 128 in-channels are hard-coded as 2 x 64 in `Vocoder.__init__`
MEL_CHANNELS = STEREO * MEL_BINS
OUT_CHANNELS = STEREO  # conv_post -> 2 channels
PRE_POST_KERNEL = 7  # conv_pre / conv_post: kernel 7, padding 3
RESBLOCK_LRELU_SLOPE = 0.1  # resnet.py LRELU_SLOPE: before each upsample and inside ResBlock1
POST_LRELU_SLOPE = 0.01  # HiFi-GAN `act_post` is `nn.LeakyReLU()`, i.e. torch's default slope, NOT LRELU_SLOPE
AA_RATIO = 2  # Activation1d defaults: x2 up, activation, x2 down ...
AA_KERNEL = 12  # ... with 12-tap kaiser-sinc filters
AA_CUTOFF = 0.5 / AA_RATIO  # UpSample1d / DownSample1d: cutoff 0.5 / ratio, half_width 0.6 / ratio
AA_HALF_WIDTH = 0.6 / AA_RATIO
SNAKE_EPS = 1e-9  # SnakeBeta.eps
RESAMPLER_ROLLOFF = 0.99  # UpSample1d(window_type="hann"), torchaudio.functional.resample's defaults
RESAMPLER_LOWPASS_WIDTH = 6
LOG_MEL_FLOOR = 1e-5  # MelSTFT.mel_spectrogram: log(clamp(mel, 1e-5))

# ltx-core's `_vocoder_from_config` reads these with `cfg.get(key, default)`. The released 19B metadata carries
# none of them (the 2.3 one carries the first two), so the official defaults ARE the released model's values.
_LTX_CORE_DEFAULTS: dict[str, Any] = {"use_tanh_at_final": True, "use_bias_at_final": True}
_LTX2_OUTPUT_SAMPLING_RATE = 24000  # `_vocoder_from_config`'s default output_sampling_rate (metadata only)


# --- config ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorConfig:
    """One mel -> waveform generator (the HiFi-GAN / BigVGAN `Vocoder` of ltx-core)."""

    upsample_initial_channel: int
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    amp: bool  # True: BigVGAN-v2 AMPBlock1 + SnakeBeta (resblock "AMP1"); False: HiFi-GAN ResBlock1 (resblock "1")
    final_activation: str  # "tanh", "clamp" or "none"
    bias_at_final: bool

    @property
    def hop(self) -> int:
        """Output samples per input frame (product of the upsample rates)."""
        return math.prod(self.upsample_rates)


def _int_list(section: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = require(section, key, where)
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise CheckpointError(f"config '{where}.{key}' must be a non-empty list of positive ints, got {value!r}")
    return tuple(value)


def _expect(section: Mapping[str, Any], key: str, expected: Any, where: str) -> None:
    """The key must be present and equal `expected` (ltx-core's `check_config_value` semantics)."""
    value = require(section, key, where)
    if value != expected:
        raise CheckpointError(f"config '{where}.{key}' = {value!r} is not supported (fvrt implements {expected!r})")


def _official_default(section: Mapping[str, Any], key: str) -> Any:
    return section.get(key, _LTX_CORE_DEFAULTS[key])


def generator_config(section: Mapping[str, Any], where: str, *, amp: bool, final_activation: bool) -> GeneratorConfig:
    """Read one generator's config section (a flat `Vocoder` section of the official metadata)."""
    _expect(section, "stereo", True, where)
    _expect(section, "resblock", "AMP1" if amp else "1", where)
    if amp:
        _expect(section, "activation", "snakebeta", where)
    rates = _int_list(section, "upsample_rates", where)
    up_kernels = _int_list(section, "upsample_kernel_sizes", where)
    res_kernels = _int_list(section, "resblock_kernel_sizes", where)
    dilations = require(section, "resblock_dilation_sizes", where)
    channels = require(section, "upsample_initial_channel", where)
    if len(up_kernels) != len(rates):
        raise CheckpointError(f"config '{where}': {len(rates)} upsample_rates but {len(up_kernels)} kernel sizes")
    if not isinstance(dilations, Sequence) or len(dilations) != len(res_kernels):
        raise CheckpointError(f"config '{where}.resblock_dilation_sizes' must hold one list per resblock kernel")
    dil = tuple(tuple(int(d) for d in ds) for ds in dilations)
    if any(len(ds) != 3 for ds in dil):  # ResBlock1 / AMPBlock1 take exactly three dilations
        raise CheckpointError(f"config '{where}.resblock_dilation_sizes' = {dilations!r}: need three per kernel")
    if any(k % 2 == 0 for k in res_kernels):  # padding="same" is symmetric only for odd kernels
        raise CheckpointError(f"config '{where}.resblock_kernel_sizes' = {list(res_kernels)}: even kernels unsupported")
    if not isinstance(channels, int) or channels // 2 ** len(rates) < 1:
        raise CheckpointError(f"config '{where}.upsample_initial_channel' = {channels!r} is too small")
    tanh = _official_default(section, "use_tanh_at_final")
    return GeneratorConfig(
        upsample_initial_channel=channels,
        upsample_rates=rates,
        upsample_kernel_sizes=up_kernels,
        resblock_kernel_sizes=res_kernels,
        resblock_dilation_sizes=dil,
        amp=amp,
        final_activation=("tanh" if tanh else "clamp") if final_activation else "none",
        bias_at_final=bool(_official_default(section, "use_bias_at_final")),
    )


# --- filters (used by `randomize_vocoder` and `init_constants`; the loaded model uses the stored ones) ---------------


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Kaiser-windowed sinc low-pass, normalised to unit DC gain, [1, 1, K] float32 (BigVGAN's filter design)."""
    half = kernel_size // 2
    even = kernel_size % 2 == 0
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95  # Kaiser's formula, dB
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
    t = torch.arange(-half, half) + 0.5 if even else torch.arange(kernel_size) - half
    if cutoff == 0:
        return torch.zeros(1, 1, kernel_size)
    h = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return (h / h.sum()).view(1, 1, kernel_size)


@dataclass(frozen=True)
class _ResamplerGeometry:
    ratio: int
    width: int  # zero crossings each side, divided by the rolloff
    kernel_size: int
    pad: int  # replicate padding each side, input rate
    crop_left: int  # output-rate samples dropped after the transposed conv
    crop_right: int


def _resampler_geometry(ratio: int) -> _ResamplerGeometry:
    width = math.ceil(RESAMPLER_LOWPASS_WIDTH / RESAMPLER_ROLLOFF)
    k = 2 * width * ratio + 1
    return _ResamplerGeometry(ratio, width, k, width, 2 * width * ratio, k - ratio)


def hann_sinc_filter(ratio: int) -> torch.Tensor:
    """Hann-windowed sinc interpolation filter of the x`ratio` skip resampler, [1, 1, K] float32 (torchaudio's
    `resample` kernel for an integer up-ratio)."""
    g = _resampler_geometry(ratio)
    t = (torch.arange(g.kernel_size) / ratio - g.width) * RESAMPLER_ROLLOFF
    tc = t.clamp(-RESAMPLER_LOWPASS_WIDTH, RESAMPLER_LOWPASS_WIDTH)
    window = torch.cos(tc * math.pi / RESAMPLER_LOWPASS_WIDTH / 2) ** 2
    return (torch.sinc(t) * window * RESAMPLER_ROLLOFF / ratio).view(1, 1, -1)


# --- building blocks -------------------------------------------------------------------------------------------------


def _same_padding(kernel_size: int, dilation: int) -> int:
    return dilation * (kernel_size - 1) // 2


class _Filter(nn.Module):
    """Holds a persistent FIR `filter` buffer [1, 1, K] (stored in the checkpoint)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.register_buffer("filter", torch.empty(1, 1, kernel_size))


class _LowPass(nn.Module):
    """Keeps the official `downsample.lowpass.filter` key path."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.lowpass = _Filter(kernel_size)


class SnakeBeta(nn.Module):
    """x + sin^2(x e^alpha) / (e^beta + eps), per channel; alpha and beta are stored in log scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(channels))
        self.beta = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T] -> [B, C, T]."""
        alpha = torch.exp(self.alpha)[None, :, None]
        beta = torch.exp(self.beta)[None, :, None]
        return x + (1.0 / (beta + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class Activation1d(nn.Module):
    """Anti-aliased activation: x2 kaiser-sinc upsample, SnakeBeta, x2 kaiser-sinc downsample; [B, C, T] -> same."""

    # UpSample1d geometry for ratio 2, kernel 12: replicate-pad 5, transposed conv, crop 15 each side
    _UP_PAD = AA_KERNEL // AA_RATIO - 1
    _UP_CROP_LEFT = _UP_PAD * AA_RATIO + (AA_KERNEL - AA_RATIO) // 2
    _UP_CROP_RIGHT = _UP_PAD * AA_RATIO + (AA_KERNEL - AA_RATIO + 1) // 2
    # LowPassFilter1d: replicate-pad (K/2 - 1, K/2) for an even kernel, then a strided conv
    _DOWN_PAD = (AA_KERNEL // 2 - 1, AA_KERNEL // 2)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = _Filter(AA_KERNEL)
        self.downsample = _LowPass(AA_KERNEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T] -> [B, C, T]."""
        c = x.shape[1]
        up = self.upsample.filter.to(x.dtype).expand(c, -1, -1)
        y = F.pad(x, (self._UP_PAD, self._UP_PAD), mode="replicate")
        y = AA_RATIO * F.conv_transpose1d(y, up, stride=AA_RATIO, groups=c)
        y = y[..., self._UP_CROP_LEFT : y.shape[-1] - self._UP_CROP_RIGHT]
        y = self.act(y)
        y = F.pad(y, self._DOWN_PAD, mode="replicate")
        return F.conv1d(y, self.downsample.lowpass.filter.expand(c, -1, -1), stride=AA_RATIO, groups=c)


class ResBlock1(nn.Module):
    """HiFi-GAN residual block: three (LeakyReLU, dilated conv, LeakyReLU, conv) residual units; [B, C, T]."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size, 1)) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T] -> [B, C, T]."""
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            h = conv1(F.leaky_relu(x, RESBLOCK_LRELU_SLOPE))
            x = x + conv2(F.leaky_relu(h, RESBLOCK_LRELU_SLOPE))
        return x


class AMPBlock1(nn.Module):
    """BigVGAN-v2 residual block: three (Activation1d, dilated conv, Activation1d, conv) residual units; [B, C, T]."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size, 1)) for _ in dilations
        )
        self.acts1 = nn.ModuleList(Activation1d(channels) for _ in dilations)
        self.acts2 = nn.ModuleList(Activation1d(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T] -> [B, C, T]."""
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.acts1, self.acts2, strict=True):
            x = x + conv2(act2(conv1(act1(x))))
        return x


def mel_to_channels(mel: torch.Tensor) -> torch.Tensor:
    """Stereo log-mel as the audio VAE decoder emits it, [B, 2, T, 64] -> conv input [B, 2*64, T] (stereo-major)."""
    b, s, t, m = mel.shape
    if s != STEREO or m != MEL_BINS:
        raise ValueError(f"vocoder input must be [B, {STEREO}, T, {MEL_BINS}], got {list(mel.shape)}")
    return mel.transpose(2, 3).reshape(b, s * m, t)


class Generator(nn.Module):
    """HiFi-GAN or BigVGAN-v2 generator (ltx-core `Vocoder`): mel [B, 2, T, 64] -> waveform [B, 2, T * hop]."""

    def __init__(self, cfg: GeneratorConfig, output_sampling_rate: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.output_sampling_rate = output_sampling_rate
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(MEL_CHANNELS, ch, PRE_POST_KERNEL, padding=PRE_POST_KERNEL // 2)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, s, padding=(k - s) // 2)
            for i, (s, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        block = AMPBlock1 if cfg.amp else ResBlock1
        self.resblocks = nn.ModuleList(
            block(ch // 2 ** (i + 1), k, d)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        final = ch // 2 ** len(cfg.upsample_rates)
        if cfg.amp:  # HiFi-GAN's act_post is a parameterless LeakyReLU, applied in forward
            self.act_post = Activation1d(final)
        self.conv_post = nn.Conv1d(
            final, OUT_CHANNELS, PRE_POST_KERNEL, padding=PRE_POST_KERNEL // 2, bias=cfg.bias_at_final
        )

    def forward_channels(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 2*64, T] (stereo-major mel channels) -> [B, 2, T * hop]."""
        nk = len(self.cfg.resblock_kernel_sizes)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            if not self.cfg.amp:
                x = F.leaky_relu(x, RESBLOCK_LRELU_SLOPE)
            x = up(x)
            # the official model runs every kernel's block on the same input and averages (stack + mean)
            x = torch.stack([self.resblocks[i * nk + j](x) for j in range(nk)], dim=0).mean(dim=0)
        x = self.act_post(x) if self.cfg.amp else F.leaky_relu(x, POST_LRELU_SLOPE)
        x = self.conv_post(x)
        if self.cfg.final_activation == "tanh":
            return torch.tanh(x)
        if self.cfg.final_activation == "clamp":
            return torch.clamp(x, -1, 1)
        return x

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, 2, T, 64] -> waveform [B, 2, T * hop] at `output_sampling_rate`."""
        return self.forward_channels(mel_to_channels(mel))


# --- bandwidth extension (LTX-2.3) -----------------------------------------------------------------------------------


class _STFTBases(nn.Module):
    """Windowed DFT bases as stored in the checkpoint: [2 * (n_fft/2 + 1), 1, n_fft], real rows then imaginary."""

    def __init__(self, n_fft: int) -> None:
        super().__init__()
        n_freqs = n_fft // 2 + 1
        self.register_buffer("forward_basis", torch.empty(2 * n_freqs, 1, n_fft))
        self.register_buffer("inverse_basis", torch.empty(2 * n_freqs, 1, n_fft))  # stored, unused at inference


class MelSTFT(nn.Module):
    """Causal log-mel spectrogram with checkpoint-stored bases (ltx-core `MelSTFT`)."""

    def __init__(self, n_fft: int, hop_length: int, n_mels: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.stft_fn = _STFTBases(n_fft)
        self.register_buffer("mel_basis", torch.empty(n_mels, n_fft // 2 + 1))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Waveforms [N, L] (L a multiple of hop) -> log-mel [N, n_mels, L / hop].

        Causal: left-pads n_fft - hop samples (win_length = n_fft), so frame i sees samples up to (i+1)*hop.
        """
        n_freqs = self.n_fft // 2 + 1
        y = F.pad(y.unsqueeze(1), (max(0, self.n_fft - self.hop_length), 0))
        spec = F.conv1d(y, self.stft_fn.forward_basis, stride=self.hop_length)
        re, im = spec[:, :n_freqs], spec[:, n_freqs:]
        magnitude = torch.sqrt(re**2 + im**2)
        mel = torch.matmul(self.mel_basis.to(magnitude.dtype), magnitude)
        return torch.log(torch.clamp(mel, min=LOG_MEL_FLOOR))


class _HannResampler(nn.Module):
    """Integer-ratio Hann-sinc upsampler (torchaudio-equivalent); its `filter` is NOT in the checkpoint."""

    def __init__(self, ratio: int) -> None:
        super().__init__()
        self.geom = _resampler_geometry(ratio)
        self.register_buffer("filter", torch.empty(1, 1, self.geom.kernel_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, L] -> [B, C, L * ratio]."""
        g = self.geom
        c = x.shape[1]
        y = F.pad(x, (g.pad, g.pad), mode="replicate")
        y = g.ratio * F.conv_transpose1d(y, self.filter.to(x.dtype).expand(c, -1, -1), stride=g.ratio, groups=c)
        return y[..., g.crop_left : y.shape[-1] - g.crop_right]


class VocoderWithBWE(nn.Module):
    """LTX-2.3 vocoder: BigVGAN mel -> 16 kHz, then bandwidth extension to 48 kHz.

    mel [B, 2, T, 64] -> waveform [B, 2, T * hop * out_rate / in_rate], clamped to [-1, 1].
    """

    def __init__(
        self,
        vocoder: GeneratorConfig,
        bwe: GeneratorConfig,
        *,
        n_fft: int,
        hop_length: int,
        n_mels: int,
        input_sampling_rate: int,
        output_sampling_rate: int,
    ) -> None:
        super().__init__()
        self.vocoder = Generator(vocoder, input_sampling_rate)
        self.bwe_generator = Generator(bwe, output_sampling_rate)
        self.mel_stft = MelSTFT(n_fft, hop_length, n_mels)
        self.resampler = _HannResampler(output_sampling_rate // input_sampling_rate)
        self.input_sampling_rate = input_sampling_rate
        self.output_sampling_rate = output_sampling_rate
        self.hop_length = hop_length

    def init_constants(self) -> None:
        """Compute the non-persistent x3 resampler filter (float32, as the official constructor keeps it)."""
        device = self.mel_stft.mel_basis.device
        self.resampler.filter = hann_sinc_filter(self.resampler.geom.ratio).to(device)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, 2, T, 64] -> 48 kHz waveform [B, 2, 3 * T * vocoder hop], clamped to [-1, 1]."""
        x = self.vocoder(mel)  # [B, 2, L] at input_sampling_rate
        b, c, n = x.shape
        out_len = n * self.output_sampling_rate // self.input_sampling_rate
        pad = -n % self.hop_length  # whole STFT frames (a Python int from the static shape)
        if pad:
            x = F.pad(x, (0, pad))
        log_mel = self.mel_stft(x.reshape(b * c, -1))  # [B*2, 64, frames]
        residual = self.bwe_generator.forward_channels(log_mel.reshape(b, c * log_mel.shape[1], -1))
        skip = self.resampler(x)
        return torch.clamp(residual + skip, -1, 1)[..., :out_len]


# --- stage -----------------------------------------------------------------------------------------------------------


def build_vocoder(config: Mapping[str, Any]) -> nn.Module:
    """Official `config` metadata -> `Generator` (LTX-2 HiFi-GAN) or `VocoderWithBWE` (LTX-2.3)."""
    cfg = require(config, "vocoder", "config")
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"config 'vocoder' must be an object, got {cfg!r}")
    if "bwe" not in cfg:  # pre-2.3 flat section (VocoderConfigurator's switch)
        gen = generator_config(cfg, "vocoder", amp=False, final_activation=True)
        return Generator(gen, int(cfg.get("output_sampling_rate", _LTX2_OUTPUT_SAMPLING_RATE)))
    voc_cfg = require(cfg, "vocoder", "vocoder")
    bwe_cfg = require(cfg, "bwe", "vocoder")
    # ltx-core hard-codes apply_final_activation: True for the main vocoder, False for the BWE generator
    for section, where, applied in ((voc_cfg, "vocoder.vocoder", True), (bwe_cfg, "vocoder.bwe", False)):
        if section.get("apply_final_activation", applied) != applied:
            raise CheckpointError(f"config '{where}.apply_final_activation' must be {applied} (ltx-core fixes it)")
    voc = generator_config(voc_cfg, "vocoder.vocoder", amp=True, final_activation=True)
    bwe = generator_config(bwe_cfg, "vocoder.bwe", amp=True, final_activation=False)
    in_sr = require(bwe_cfg, "input_sampling_rate", "vocoder.bwe")
    out_sr = require(bwe_cfg, "output_sampling_rate", "vocoder.bwe")
    hop = require(bwe_cfg, "hop_length", "vocoder.bwe")
    n_fft = require(bwe_cfg, "n_fft", "vocoder.bwe")
    n_mels = require(bwe_cfg, "num_mels", "vocoder.bwe")
    if out_sr % in_sr:
        raise CheckpointError(f"config 'vocoder.bwe': output rate {out_sr} is not a multiple of input rate {in_sr}")
    if n_mels != MEL_BINS:  # the BWE generator's conv_pre takes 2 x 64 channels (hard-coded officially)
        raise CheckpointError(f"config 'vocoder.bwe.num_mels' = {n_mels}: the generator takes {MEL_BINS} mels")
    if bwe_cfg.get("win_size", n_fft) != n_fft:  # ltx-core ignores win_size and uses win_length = n_fft
        raise CheckpointError(f"config 'vocoder.bwe.win_size' = {bwe_cfg['win_size']} != n_fft {n_fft}")
    if bwe.hop != hop * (out_sr // in_sr):  # residual and skip must have the same length
        raise CheckpointError(f"config 'vocoder.bwe': generator hop {bwe.hop} != hop_length x {out_sr // in_sr}")
    return VocoderWithBWE(
        voc, bwe, n_fft=n_fft, hop_length=hop, n_mels=n_mels, input_sampling_rate=in_sr, output_sampling_rate=out_sr
    )


# --- random weights that make sense ----------------------------------------------------------------------------------

_RANDOM_NOMINAL_SR = 16000  # mel filterbank scale for random init (the BWE STFT runs on the 16 kHz wave)
_RANDOM_BIAS_STD = 0.02
_RANDOM_SNAKE_STD = 0.1  # log-scale alpha/beta: e^N(0, 0.1) ~ 1, the official init (zeros) plus noise
_RANDOM_BRANCH_GAIN = 0.3  # residual-branch output convs (convs2): 18 residual units must not blow the signal up
_RANDOM_POST_GAIN = 0.15  # conv_post: keep the waveform well inside the final tanh / clamp


def slaney_mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """Slaney-scale, Slaney-normalised triangular mel filterbank [n_mels, n_fft/2 + 1], 0..sr/2 (librosa's)."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def hz_to_mel(f: float) -> float:
        return f / f_sp if f < min_log_hz else min_log_mel + math.log(f / min_log_hz) / logstep

    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    hz = torch.where(mels < min_log_mel, mels * f_sp, min_log_hz * torch.exp(logstep * (mels - min_log_mel)))
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lower = (freqs[None] - hz[:-2, None]) / (hz[1:-1] - hz[:-2])[:, None]
    upper = (hz[2:, None] - freqs[None]) / (hz[2:] - hz[1:-1])[:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0)
    return (weights * (2.0 / (hz[2:] - hz[:-2]))[:, None]).float()


def stft_bases(n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Periodic-Hann-windowed DFT analysis basis and a matching synthesis basis, each [2*(n_fft/2+1), 1, n_fft]."""
    n_freqs = n_fft // 2 + 1
    n = torch.arange(n_fft, dtype=torch.float64)
    f = torch.arange(n_freqs, dtype=torch.float64)[:, None]
    phase = 2 * math.pi * f * n / n_fft
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    fwd = torch.cat([torch.cos(phase), -torch.sin(phase)]) * window
    weight = torch.full((n_freqs, 1), 2.0, dtype=torch.float64)
    weight[0] = weight[-1] = 1.0  # DC and Nyquist appear once in a real inverse DFT
    inv = torch.cat([torch.cos(phase), -torch.sin(phase)]) * torch.cat([weight, weight]) * window / n_fft
    return fwd.float()[:, None], inv.float()[:, None]


def randomize_vocoder(module: nn.Module, gen: torch.Generator) -> None:
    """Random weights that keep signals at unit scale, and the stored buffers at the official constructor's values.

    The default N(0, 0.02) weights shrink the signal ~5x per conv, so after ~8 convs the 16 kHz wave is ~1e-6,
    its log-mel sits on the 1e-5 floor and the BWE generator would see a constant; and "1 + noise" buffers would
    turn the unit-gain anti-aliasing filters into x12 amplifiers and the STFT/mel bases into noise. Instead:
    convs get variance-preserving N(0, 1/fan_in) weights, SnakeBeta log-alpha/beta N(0, 0.1), biases N(0, 0.02);
    the kaiser-sinc filters are the official constructor's, the mel basis a Slaney filterbank and the STFT bases
    a Hann-windowed DFT (the released ones come from training and are only known from the checkpoint).
    Works on the official module as well (same names); non-persistent buffers are left alone.
    """
    persistent = set(module.state_dict())
    # HiFi-GAN convs follow a LeakyReLU(0.1), which halves the variance: He gain; SnakeBeta keeps it (BigVGAN)
    act_gain = 1.0 if any(k.endswith(".alpha") for k in persistent) else math.sqrt(2.0)

    def draw(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=gen, device=gen.device) * std).to(t.dtype)

    with torch.no_grad():
        for prefix, m in module.named_modules():
            gain = act_gain * (_RANDOM_BRANCH_GAIN if prefix.rsplit(".", 2)[-2:-1] == ["convs2"] else 1.0)
            if prefix.endswith("conv_post"):
                gain = _RANDOM_POST_GAIN
            if isinstance(m, nn.ConvTranspose1d):
                # each output sample sums in_channels * kernel / stride terms
                m.weight.copy_(draw(m.weight, gain * (m.in_channels * m.kernel_size[0] / m.stride[0]) ** -0.5))
            elif isinstance(m, nn.Conv1d):
                m.weight.copy_(draw(m.weight, gain * (m.in_channels // m.groups * m.kernel_size[0]) ** -0.5))
            for pname, p in m.named_parameters(recurse=False):
                if pname in ("alpha", "beta"):
                    p.copy_(draw(p, _RANDOM_SNAKE_STD))
                elif pname == "bias" or not isinstance(m, nn.Conv1d | nn.ConvTranspose1d):
                    p.copy_(draw(p, _RANDOM_BIAS_STD))
            for bname, b in m.named_buffers(recurse=False):
                if f"{prefix}.{bname}".lstrip(".") not in persistent:
                    continue
                if bname == "filter":
                    value = kaiser_sinc_filter(AA_CUTOFF, AA_HALF_WIDTH, b.shape[-1])
                elif bname == "mel_basis":
                    value = slaney_mel_filterbank(b.shape[0], 2 * (b.shape[1] - 1), _RANDOM_NOMINAL_SR)
                elif bname in ("forward_basis", "inverse_basis"):
                    value = stft_bases(b.shape[-1])[bname == "inverse_basis"]
                else:
                    value = 1.0 + draw(b, _RANDOM_BIAS_STD)
                b.copy_(value.to(b.dtype))


STAGES = (
    StageSpec(
        "vocoder",
        # VOCODER_COMFY_KEYS_FILTER strips one leading "vocoder.": vocoder.conv_pre -> conv_pre (19B),
        # vocoder.vocoder.conv_pre -> vocoder.conv_pre (2.3); module names are the official ones.
        rules=(("vocoder.", ""),),
        build=build_vocoder,
        randomize=randomize_vocoder,
    ),
)
