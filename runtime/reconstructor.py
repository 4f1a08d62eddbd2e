"""`Reconstructor`: encode, decode and reconstruct audio with a recon bundle on ONNX Runtime."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import soxr

from .chunking import overlap_add
from .contract import (
    DECODER,
    ENCODER,
    FP16,
    FP32,
    HOP_LENGTH,
    INT8,
    LATENT_CHANNELS,
    LATENT_DOWNSAMPLE,
    LATENT_FREQ_BINS,
    ROLES,
    TRAINING_WINDOW_FRAMES,
    VOCODER,
    Contract,
    check_mel,
    read_contract,
)
from .errors import AudioInputError, BundleError, ProviderError, ReconError
from .frontend import log_mel, prepare_waveform
from .sessions import (
    CPU,
    CUDA,
    FixedShapeChain,
    GraphSession,
    SessionConfig,
    cuda_available,
    onnxruntime_distributions,
    require_finite,
)

_LOGGER = logging.getLogger(__name__)

DEFAULT_WINDOW_FRAMES: Final = TRAINING_WINDOW_FRAMES  # mel frames per window (10.24 s)
DEFAULT_OVERLAP_FRAMES: Final = 64  # mel frames shared by neighbouring windows (0.64 s)
MAX_BATCH: Final = 8  # equal-length inputs run together up to this many
MAX_CAPTURED_SHAPES: Final = 2  # CUDA-graph chains kept (each holds a copy of the weights on the GPU)
SAMPLES_PER_LATENT_FRAME: Final = HOP_LENGTH * LATENT_DOWNSAMPLE


@dataclass
class Features:
    """A prepared input: its log-mel and what is needed to give the output back at its level."""

    log_mel: np.ndarray  # float32 [T, 64]
    gain: float  # multiply the 16 kHz output by this to restore the input level
    num_samples: int  # length at 16 kHz
    waveform: np.ndarray  # float32 [num_samples], the prepared 16 kHz input


def _pad_frames(mel: np.ndarray, multiple: int, value: float) -> np.ndarray:
    """Pad [..., T, 64] along T to a multiple of `multiple` with `value`."""
    t = mel.shape[-2]
    extra = (-t) % multiple
    if not extra:
        return mel
    widths = [(0, 0)] * mel.ndim
    widths[-2] = (0, extra)
    return np.pad(mel, widths, constant_values=value)


class Reconstructor:
    """The AudioLDM2 VAE + HiFi-GAN chain on ONNX Runtime, built from a recon bundle.

    Create it with `Reconstructor.load`. Sessions are created on first use and only for the
    stages used, so a decode-only user never loads the encoder.
    """

    def __init__(
        self,
        bundle_dir: Path,
        contract: Contract,
        provider: str,
        precision: str,
        threads: int | None = None,
        window_frames: int = DEFAULT_WINDOW_FRAMES,
        overlap_frames: int = DEFAULT_OVERLAP_FRAMES,
        cpu_arena: bool = False,
        cuda_graph: bool = False,
    ):
        if window_frames % LATENT_DOWNSAMPLE or overlap_frames % LATENT_DOWNSAMPLE:
            raise ValueError(f"window and overlap must be multiples of {LATENT_DOWNSAMPLE} frames")
        self.bundle_dir = Path(bundle_dir)
        self.contract = contract
        self.provider = provider
        self.precision = precision
        self.window_frames = window_frames
        self.overlap_frames = overlap_frames
        self._config = SessionConfig(
            provider=provider, threads=threads, cpu_arena=cpu_arena, cuda_graph=cuda_graph and provider == CUDA
        )
        self._sessions: dict[str, GraphSession] = {}
        self._fixed: dict[tuple[Any, ...], FixedShapeChain] = {}
        self._shapes_seen: Counter[tuple[Any, ...]] = Counter()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        bundle_dir: Path | str,
        provider: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        window_frames: int = DEFAULT_WINDOW_FRAMES,
        overlap_frames: int = DEFAULT_OVERLAP_FRAMES,
        cpu_arena: bool = False,
        cuda_graph: bool = False,
    ) -> "Reconstructor":
        """Open a bundle, check its contract, and pick provider and precision.

        Args:
            bundle_dir: folder written by `recon-export` (holds recon.json and the .onnx files).
            provider: "auto" (CUDA when onnxruntime offers it, else CPU), "cuda" or "cpu".
            precision: "auto" (fp16 on CUDA, fp32 on CPU), "fp16", "fp32" or "int8".
            threads: intra-op threads for CPU sessions (None: onnxruntime's default).
            window_frames, overlap_frames: long-input windowing, in mel frames (multiples of 4).
            cpu_arena: onnxruntime's CPU memory arena; off by default for a lower peak RSS.
            cuda_graph: on CUDA, capture CUDA graphs for input shapes seen twice (at most
                MAX_CAPTURED_SHAPES; other shapes run normally). Each captured shape holds a
                second copy of the weights on the GPU. Not yet measured on a GPU, so off by default.
        """
        bundle_dir = Path(bundle_dir)
        contract = read_contract(bundle_dir)
        check_mel(contract, str(bundle_dir / "recon.json"))
        if provider not in ("auto", CPU, CUDA):
            raise ProviderError(f"unknown provider {provider!r}; use auto, cuda or cpu")
        if precision not in ("auto", FP16, FP32, INT8):
            raise ProviderError(f"unknown precision {precision!r}; use auto, fp16, fp32 or int8")
        dists = onnxruntime_distributions()
        if len(dists) > 1:
            _LOGGER.warning(
                "both %s are installed and overwrite each other's files; keep one "
                "(pip uninstall -y onnxruntime onnxruntime-gpu, then install the one you want)",
                " and ".join(dists),
            )
        if provider == "auto":
            provider = CUDA if cuda_available() else CPU
        elif provider == CUDA and not cuda_available():
            raise ProviderError(
                "the CUDA provider is not in this onnxruntime build; install the GPU extra "
                "(see README) or use --provider cpu"
            )
        available = contract.precisions
        if not available:
            raise BundleError(f"{bundle_dir}: recon.json lists no complete set of graphs")
        if precision == "auto":
            preferred = (FP16, FP32) if provider == CUDA else (FP32, FP16)
            precision = next((p for p in preferred if p in available), available[0])
        elif precision not in available:
            raise BundleError(
                f"{bundle_dir}: bundle has no {precision} graphs (it has {', '.join(available)}); "
                f"export them with recon-export --precision {precision}"
            )
        for role in ROLES:
            entry = contract.graph(role, precision)
            if entry is None or not (bundle_dir / entry.file).is_file():
                missing = entry.file if entry else f"{role}.{precision}.onnx"
                raise BundleError(f"{bundle_dir / missing}: missing from the bundle; re-export it")
        if contract.random_weights:
            _LOGGER.warning("%s holds RANDOM weights: output is not meaningful audio", bundle_dir)
        _LOGGER.info("using %s with %s graphs from %s", provider.upper(), precision, bundle_dir)
        return cls(
            bundle_dir, contract, provider, precision, threads, window_frames, overlap_frames, cpu_arena, cuda_graph
        )

    def session(self, role: str) -> GraphSession:
        """The session for one stage, created (and its file verified) on first use."""
        if role not in self._sessions:
            entry = self.contract.graph(role, self.precision)
            if entry is None:
                raise BundleError(f"{self.bundle_dir}: no {role} graph at {self.precision}")
            try:
                self._sessions[role] = GraphSession(self.bundle_dir, self.contract, entry, self._config)
            except ProviderError:
                if self._sessions:
                    raise
                _LOGGER.warning("CUDA did not start; falling back to CPU with fp32 graphs")
                self.provider, self._config.provider = CPU, CPU
                if self.precision == FP16 and FP32 in self.contract.precisions:
                    self.precision = FP32
                return self.session(role)
        return self._sessions[role]

    @property
    def loaded_stages(self) -> list[str]:
        return list(self._sessions)

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA

    # ------------------------------------------------------------------ front end
    def features(self, audio: np.ndarray, sample_rate: int) -> Features:
        """Prepare a waveform (mono, 16 kHz, peak 0.5) and compute its log-mel [T, 64]."""
        wave, gain = prepare_waveform(audio, sample_rate, self.contract.mel)
        return Features(log_mel(wave, self.contract.mel), gain, wave.size, wave)

    # ------------------------------------------------------------------ graph chains
    def run_graphs(self, roles: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
        """Run consecutive stages on a host input; on CUDA intermediates stay on the GPU.

        Input layouts: encoder/decoder take their graph input; the vocoder takes [B, T, 64].
        Returns the host outputs of the last stage.
        """
        if self.on_gpu and self._config.cuda_graph:
            try:
                fixed = self._fixed_chain(roles, x)
                if fixed is not None:
                    return fixed.run(x)
            except ReconError:
                raise
            except Exception as e:  # noqa: BLE001 - onnxruntime refused the pinned sessions or the capture
                _LOGGER.warning("CUDA graph capture failed (%s); continuing without it", " ".join(str(e).split())[:200])
                self._config.cuda_graph = False
                self._fixed.clear()
        if self.on_gpu:
            value = None
            for i, role in enumerate(roles):
                sess = self.session(role)
                if value is None:
                    value = sess.to_device(x)
                    outs = sess.run_on_device(sess.input_names[0], value)
                elif role == VOCODER:
                    b, _, t, f = value.shape()
                    outs = sess.run_on_device(sess.input_names[0], value, shape=(b, t, f))
                else:
                    outs = sess.run_on_device(sess.input_names[0], value)
                value = outs[0]
                if i == len(roles) - 1:
                    host = [o.numpy() for o in outs]
                    for name, out in zip(sess.output_names, host):
                        require_finite(out, f"{role} graph output {name!r}")
                    return host
        outs = [x]
        for role in roles:
            sess = self.session(role)
            inp = outs[0]
            if role == VOCODER and inp.ndim == 4:
                inp = inp[:, 0]
            outs = sess.run({sess.input_names[0]: inp})
        return outs

    def _fixed_chain(self, roles: Sequence[str], x: np.ndarray) -> FixedShapeChain | None:
        """The captured chain for this input shape, built the second time the shape is seen.

        Failures (onnxruntime refusing the pinned sessions or the capture) are handled in run_graphs.
        """
        key = (tuple(roles), tuple(x.shape))
        self._shapes_seen[key] += 1
        if key not in self._fixed and self._shapes_seen[key] >= 2 and len(self._fixed) < MAX_CAPTURED_SHAPES:
            entries = [self.contract.graph(r, self.precision) for r in roles]
            self._fixed[key] = FixedShapeChain(self.bundle_dir, self.contract, entries, self._config, x.shape)
        return self._fixed.get(key)

    def _mel_to_wave(self, mel: np.ndarray) -> np.ndarray:
        """[B, T, 64] log-mel (T a multiple of 4) -> [B, 160*T] waveform through the VAE and vocoder."""

        def run(s: int, e: int) -> np.ndarray:
            wave = self.run_graphs((ENCODER, DECODER, VOCODER), mel[:, None, s:e])[0]
            return wave[:, : (e - s) * HOP_LENGTH]

        return overlap_add(
            mel.shape[1],
            self.window_frames,
            self.overlap_frames,
            run,
            scale=HOP_LENGTH,
            axis=-1,
            multiple=LATENT_DOWNSAMPLE,
        )

    def _mel_to_latents(self, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B, T, 64] -> scaled (mean, std), each [B, 8, T/4, 16]."""

        def run(s: int, e: int) -> np.ndarray:
            mean, std = self.run_graphs((ENCODER,), mel[:, None, s:e])
            return np.stack([mean, std])

        both = overlap_add(
            mel.shape[1],
            self.window_frames,
            self.overlap_frames,
            run,
            scale=1 / LATENT_DOWNSAMPLE,
            axis=3,
            multiple=LATENT_DOWNSAMPLE,
        )
        return both[0], both[1]

    def _latents_to_wave(self, latents: np.ndarray) -> np.ndarray:
        """[B, 8, L, 16] scaled latents -> [B, 640*L] waveform."""
        window = self.window_frames // LATENT_DOWNSAMPLE
        overlap = self.overlap_frames // LATENT_DOWNSAMPLE

        def run(s: int, e: int) -> np.ndarray:
            wave = self.run_graphs((DECODER, VOCODER), latents[:, :, s:e])[0]
            return wave[:, : (e - s) * SAMPLES_PER_LATENT_FRAME]

        return overlap_add(latents.shape[2], window, overlap, run, scale=SAMPLES_PER_LATENT_FRAME, axis=-1)

    # ------------------------------------------------------------------ public API
    def encode(self, audio: np.ndarray, sample_rate: int, sample: bool = False, seed: int | None = None) -> np.ndarray:
        """Audio -> scaled latents float32 [8, ceil(T/4), 16] (the posterior mean, or a draw).

        Args:
            sample: draw mean + std * noise (as the official code does) instead of the mean.
            seed: seed for the draw.
        """
        return self.encode_features(self.features(audio, sample_rate), sample, seed)

    def encode_features(self, feats: Features, sample: bool = False, seed: int | None = None) -> np.ndarray:
        """Prepared input -> scaled latents [8, ceil(T/4), 16] (see `encode`)."""
        mel = _pad_frames(feats.log_mel[None], LATENT_DOWNSAMPLE, self.contract.mel.silence)
        mean, std = self._mel_to_latents(mel)
        if sample:
            mean = mean + std * np.random.default_rng(seed).standard_normal(mean.shape).astype(np.float32)
        return mean[0]

    def decode(self, latents: np.ndarray, num_samples: int | None = None) -> np.ndarray:
        """Scaled latents [8, L, 16] or [B, 8, L, 16] -> 16 kHz waveform [640*L] or [B, 640*L].

        Args:
            num_samples: crop the output to this many samples (the original length).
        """
        z = np.asarray(latents)
        batched = z.ndim == 4
        if z.ndim == 3:
            z = z[None]
        if z.ndim != 4 or z.shape[1] != LATENT_CHANNELS or z.shape[3] != LATENT_FREQ_BINS or z.shape[2] < 1:
            raise AudioInputError(
                f"latents must be [{LATENT_CHANNELS}, frames, {LATENT_FREQ_BINS}] or "
                f"[batch, {LATENT_CHANNELS}, frames, {LATENT_FREQ_BINS}], got {list(np.shape(latents))}"
            )
        if not np.issubdtype(z.dtype, np.floating):
            raise AudioInputError(f"latents must be floating point, got {z.dtype}")
        if not np.isfinite(z).all():
            raise AudioInputError("latents contain NaN or inf")
        wave = self._latents_to_wave(z.astype(np.float32))
        if num_samples is not None:
            wave = wave[:, :num_samples]
        return wave if batched else wave[0]

    def reconstruct(self, audio: np.ndarray, sample_rate: int, output_rate: int | None = None) -> np.ndarray:
        """Audio -> VAE -> vocoder -> audio at the input's level and length.

        Returns:
            float32 [samples] at `output_rate` (default 16 kHz), as long as the input.
        """
        return self.reconstruct_many([(audio, sample_rate)], output_rate)[0]

    def reconstruct_many(
        self, items: Sequence[tuple[np.ndarray, int]], output_rate: int | None = None
    ) -> list[np.ndarray]:
        """Reconstruct several inputs; those of equal length run as one batch."""
        feats = [self.features(a, sr) for a, sr in items]
        return [self.finish(f, w, output_rate) for f, w in zip(feats, self.reconstruct_features(feats))]

    def reconstruct_features(self, feats: Sequence[Features]) -> list[np.ndarray]:
        """Prepared inputs -> 16 kHz reconstructions at the prepared level (peak near 0.5)."""
        results: list[np.ndarray | None] = [None] * len(feats)
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(feats):
            groups.setdefault(f.log_mel.shape[0], []).append(i)
        for indices in groups.values():
            for k in range(0, len(indices), MAX_BATCH):
                batch = indices[k : k + MAX_BATCH]
                mel = np.stack([feats[i].log_mel for i in batch])
                mel = _pad_frames(mel, LATENT_DOWNSAMPLE, self.contract.mel.silence)
                waves = self._mel_to_wave(mel)
                for j, i in enumerate(batch):
                    wave = waves[j, : feats[i].num_samples]
                    if wave.size < feats[i].num_samples:  # the training framing yields N // 160 frames
                        wave = np.pad(wave, (0, feats[i].num_samples - wave.size))
                    results[i] = wave
        return [r for r in results if r is not None]

    def finish(self, feats: Features, wave: np.ndarray, output_rate: int | None = None) -> np.ndarray:
        """Restore the input level and resample a 16 kHz reconstruction to `output_rate`."""
        out = wave * np.float32(feats.gain)
        rate = self.contract.mel.sample_rate
        if output_rate and output_rate != rate:
            out = soxr.resample(out, rate, output_rate, quality="HQ").astype(np.float32)
        require_finite(out, "reconstructed audio")
        return out.astype(np.float32, copy=False)
