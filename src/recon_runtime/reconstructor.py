"""`Reconstructor`: encode, decode, vocode and reconstruct audio with a recon bundle.

The object is fixed after `load`: backend, provider, precision and windowing never change, and
it is safe to share between threads. What varies per call lives in the call. Execution belongs to
an executor (one per backend, `executors/`); this module keeps the front end, the windows, the
batching of equal-shape windows and the post-processing.

Long inputs (docs/long-audio.md): the VAE runs in windows sized to the input
(`window_plan.plan_fitted_windows`), the decoded log-mel windows are cross-faded into one log-mel
(`window_plan.join_mel_windows`), and one vocoder pass turns it into the waveform in chunks whose
margins are cropped (`vocoding.ChunkJob`). An input that fits one window runs the whole chain as
one graph run per window, as it always did.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import soxr

from .contract import (
    DECODER,
    ENCODER,
    HOP_LENGTH,
    LATENT_DOWNSAMPLE,
    N_MELS,
    RANDOM_WEIGHTS_WARNING,
    ROLES,
    SAMPLES_PER_LATENT_FRAME,
    TRAINING_WINDOW_FRAMES,
    VOCODER,
    VOCODER_EXTRA_SAMPLES,
    Contract,
    check_mel,
    latent_shape_problem,
    read_contract,
)
from .errors import AudioInputError, BundleError, NumericalError, ProviderError
from .executors import Executor, ExecutorOptions
from .executors.select import AUTO, CUDA, check_choices, create_executor
from .frontend import log_mel, prepare_waveform
from .vocoding import VOCODER_CHUNK_FRAMES, ChunkJob
from .window_plan import WINDOW_STEP_FRAMES, plan_fitted_windows
from .windows import Features, WindowJob, join_windows

Job = WindowJob | ChunkJob
"""What `run_jobs` runs and `join` joins: a window plan's windows, or a vocoder pass's chunks."""

_LOGGER = logging.getLogger(__name__)

DEFAULT_WINDOW_FRAMES: Final = TRAINING_WINDOW_FRAMES  # mel frames per window (10.24 s)
DEFAULT_OVERLAP_FRAMES: Final = 64  # mel frames shared by neighbouring windows (0.64 s)
MAX_BATCH: Final = 8  # windows per graph run on a GPU
# On the CPU a batch is no faster per window (benchmarks: the 1 s chain at batch 4 vs 1 gains 1.18x
# at most, the 10.24 s chain nothing) and peak memory grows with it, so windows run one at a time.
LONG_AUDIO_PLAN: Final = (
    f"fitted windows (step {WINDOW_STEP_FRAMES}), one vocoder pass (chunks of {VOCODER_CHUNK_FRAMES})"
)
"""How inputs longer than one window run (docs/long-audio.md); dataset jobs record it, since results
of another plan differ (log-mel L1 about 0.06 between this and the previous one)."""
PREVIOUS_LONG_AUDIO_PLAN: Final = "full windows, each vocoded, waveforms cross-faded"

CPU_MAX_BATCH: Final = 1


def check_windows(window_frames: int, overlap_frames: int) -> None:
    """Refuse window and overlap sizes the windowing cannot use (ValueError naming the rule): whole
    multiples of 4 log-mel frames (one latent frame), the overlap at least 0 and less than the window."""
    for name, value in (("window_frames", window_frames), ("overlap_frames", overlap_frames)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number of log-mel frames, got {value!r}")
        if value % LATENT_DOWNSAMPLE:
            raise ValueError(f"{name} must be a multiple of {LATENT_DOWNSAMPLE} log-mel frames, got {value}")
    if window_frames < LATENT_DOWNSAMPLE:
        raise ValueError(f"window_frames must be at least {LATENT_DOWNSAMPLE}, got {window_frames}")
    if not 0 <= overlap_frames < window_frames:
        raise ValueError(
            f"overlap_frames ({overlap_frames}) must be at least 0 and less than window_frames ({window_frames})"
        )


def _pad_frames(mel: np.ndarray, multiple: int, value: float) -> np.ndarray:
    """Pad [..., T, 64] along T to a multiple of `multiple` with `value`."""
    t = mel.shape[-2]
    extra = (-t) % multiple
    if not extra:
        return mel
    widths = [(0, 0)] * mel.ndim
    widths[-2] = (0, extra)
    return np.pad(mel, widths, constant_values=value)


def posterior_draw(mean: np.ndarray, std: np.ndarray, seed: int | None) -> np.ndarray:
    """A draw from the VAE's posterior, mean + std * noise, the noise from `np.random.default_rng(seed)`:
    one formula for `encode(sample=True)`, the server's /v1/encode and dataset encode jobs, so the same
    seed gives the same latents everywhere."""
    return mean + std * np.random.default_rng(seed).standard_normal(mean.shape).astype(np.float32)


class Reconstructor:
    """The AudioLDM2 VAE + HiFi-GAN chain, built from a recon bundle.

    Create it with `Reconstructor.load`. After load nothing about it changes: one instance can
    serve many threads at once. Sessions are created at load for the `stages` asked for, and
    otherwise on first use (under a lock) and only for the stages used, so a decode-only user never
    loads the encoder.
    """

    def __init__(
        self,
        bundle_dir: Path,
        contract: Contract,
        executor: Executor,
        window_frames: int = DEFAULT_WINDOW_FRAMES,
        overlap_frames: int = DEFAULT_OVERLAP_FRAMES,
        max_batch: int | None = None,
        bucket_frames: int = LATENT_DOWNSAMPLE,
    ):
        check_windows(window_frames, overlap_frames)
        if bucket_frames < LATENT_DOWNSAMPLE or bucket_frames % LATENT_DOWNSAMPLE:
            raise ValueError(f"bucket_frames must be a positive multiple of {LATENT_DOWNSAMPLE}, got {bucket_frames}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.bundle_dir = Path(bundle_dir)
        self.contract = contract
        self.executor = executor
        self.window_frames = window_frames
        self.overlap_frames = overlap_frames
        self.max_batch = max_batch or (MAX_BATCH if executor.provider == CUDA else CPU_MAX_BATCH)
        self.bucket_frames = bucket_frames

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        bundle_dir: Path | str,
        provider: str = AUTO,
        precision: str = AUTO,
        backend: str = AUTO,
        stages: Sequence[str] | None = None,
        threads: int | None = None,
        window_frames: int = DEFAULT_WINDOW_FRAMES,
        overlap_frames: int = DEFAULT_OVERLAP_FRAMES,
        max_batch: int | None = None,
        bucket_frames: int = LATENT_DOWNSAMPLE,
        cpu_arena: bool = False,
        cuda_graph: bool = False,
        expect_digest: str | None = None,
        performance_hint: str | None = None,
        compile_cache: bool = True,
        cache_dir: Path | str | None = None,
        device_id: int = 0,
    ) -> "Reconstructor":
        """Open a bundle, check its contract, and fix backend, provider and precision.

        Args:
            bundle_dir: folder written by `recon-export` (holds recon.json and the .onnx files).
            provider: "auto" (CUDA when it starts, else CPU, with one warning), "cuda" (an error
                when CUDA does not start) or "cpu".
            precision: "auto" (fp16 on CUDA when the bundle's fp16 arithmetic check passed, else
                fp32), "fp16", "fp32", "int8" (onnxruntime) or "bf16" (openvino, on a CPU with
                AVX512-BF16 or AMX; refused elsewhere).
            backend: "auto" (openvino for bf16; otherwise onnxruntime, the leaner engine on the CPU
                at fp32, or openvino where only it is installed), "onnxruntime" or "openvino".
            stages: create these stages' sessions now (e.g. ("decoder", "vocoder") for a decoder);
                None creates each on first use.
            threads: intra-op threads per session (None: the engine's default).
            window_frames, overlap_frames: long-input windowing, in mel frames (multiples of 4).
            max_batch: windows per graph run (default 8 on CUDA, 1 on the CPU).
            bucket_frames: pad a one-window input's log-mel (with silence) to a multiple of this many
                frames (at most to the window), so that clips of different lengths share a window
                shape and can run in one batch; the output is cropped to the input's length. The
                VAE attends over the whole window, so the padding changes the result slightly:
                outputs equal only between instances with the same value. Default 4 (the least
                the VAE needs), as `recon-run serve` unless given --bucket-frames.
            cpu_arena: onnxruntime's CPU memory arena; off by default for a lower peak RSS.
            cuda_graph: on CUDA, capture CUDA graphs for window shapes seen twice (a second copy of
                the weights on the GPU per shape). Not yet measured on a GPU, so off by default.
            expect_digest: refuse the bundle unless its digest (`recon-run info`) is this one. The
                hashes in recon.json catch corruption, not deliberate tampering (whoever edits a
                graph can edit recon.json too); pinning the digest of a bundle you trust does.
            performance_hint: openvino: "latency" (None, the default: one call at a time uses every
                core; single files) or "throughput" (streams: many concurrent calls, e.g. a server).
                Checked here whatever the backend. onnxruntime has no hint: `backend="onnxruntime"`
                refuses "throughput"; when `auto` picks onnxruntime the hint is dropped (logged).
            compile_cache: openvino: keep compiled graphs in `cache_dir` for the next start
                (onnxruntime caches nothing, so False changes nothing there).
            cache_dir: openvino's compiled-model cache (default: $XDG_CACHE_HOME or ~/.cache, then
                audioldm2-recon/openvino/<bundle digest>). Refused by `backend="onnxruntime"`, dropped
                (logged) when `auto` picks onnxruntime.
            device_id: the CUDA device the graphs run on (as CUDA numbers them, after
                CUDA_VISIBLE_DEVICES; `devices.resolve_device` parses `--device`). Refused by the
                openvino backend, which runs on the CPU.
        """
        bundle_dir = Path(bundle_dir)
        contract = read_contract(bundle_dir)
        check_mel(contract, str(bundle_dir / "recon.json"))
        if expect_digest is not None and expect_digest != contract.digest:
            raise BundleError(
                f"{bundle_dir}: bundle digest is {contract.digest}, expected {expect_digest}; "
                "this is not the bundle you pinned"
            )
        check_choices(provider, precision, backend, performance_hint)
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise ProviderError(f"device_id must be a CUDA device number (0, 1, ...), got {device_id!r}")
        if stages is not None:
            unknown = [s for s in stages if s not in ROLES]
            if unknown:
                raise ValueError(f"unknown stages {unknown}; use {ROLES}")
        executor = create_executor(
            bundle_dir,
            contract,
            backend=backend,
            provider=provider,
            precision=precision,
            stages=stages,
            options=ExecutorOptions(
                threads=threads,
                cpu_arena=cpu_arena,
                cuda_graph=cuda_graph,
                performance_hint=performance_hint,
                compile_cache=compile_cache,
                cache_dir=Path(cache_dir) if cache_dir is not None else None,
                device_id=device_id,
            ),
        )
        if contract.random_weights:
            _LOGGER.warning(RANDOM_WEIGHTS_WARNING, bundle_dir)
        _LOGGER.info(
            "using %s with %s graphs from %s (%s)",
            executor.provider.upper(),
            executor.graph_precision,
            bundle_dir,
            executor.describe(),
        )
        return cls(bundle_dir, contract, executor, window_frames, overlap_frames, max_batch, bucket_frames)

    @property
    def provider(self) -> str:
        return self.executor.provider

    @property
    def precision(self) -> str:
        return self.executor.precision

    @property
    def backend(self) -> str:
        return self.executor.backend

    @property
    def loaded_stages(self) -> list[str]:
        return self.executor.loaded_stages

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA

    # ------------------------------------------------------------------ front end
    def features(self, audio: np.ndarray, sample_rate: int) -> Features:
        """Prepare a waveform (mono, 16 kHz, peak 0.5) and compute its log-mel [T, 64]."""
        wave, gain = prepare_waveform(audio, sample_rate, self.contract.mel)
        return Features(log_mel(wave, self.contract.mel), gain, wave.size, wave)

    # ------------------------------------------------------------------ windows
    def run_graphs(self, roles: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        """Run consecutive stages on one batch (the executor's layouts; see `Executor.run`)."""
        return self.executor.run(roles, batch)

    def run_windows(self, roles: Sequence[str], windows: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Run windows of one shape, from any number of inputs or callers, as one batch.

        Args:
            roles: consecutive stages, e.g. ("encoder", "decoder", "vocoder").
            windows: graph inputs of equal shape without the batch axis (see `WindowJob.windows`).
        Returns:
            Per window, the last stage's outputs without the batch axis; a vocoder output after
            the encoder is cropped to 160 samples per input frame, and otherwise keeps its 32
            samples past the last frame (`join` keeps them where a decoding job asks, `WindowJob.tail`
            and `ChunkJob.tail`).
        """
        roles = tuple(roles)
        shapes = {tuple(w.shape) for w in windows}
        if len(shapes) != 1:
            raise ValueError(f"windows in one batch must share a shape, got {sorted(shapes)}")
        outs = self.run_graphs(roles, np.stack(windows))
        if roles[-1] == VOCODER:
            frames = windows[0].shape[-2] if roles[0] != DECODER else windows[0].shape[-2] * LATENT_DOWNSAMPLE
            extra = VOCODER_EXTRA_SAMPLES if roles[0] != ENCODER else 0
            outs = [o[:, : frames * HOP_LENGTH + extra] for o in outs]
        return [[o[i] for o in outs] for i in range(len(windows))]

    def join(self, job: Job, outputs: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        """Join one job's per-window outputs (as `run_windows` returns them) into whole outputs: a
        window plan's cross-faded (`windows.join_windows`), a vocoder pass's chunks cropped and laid
        end to end (`ChunkJob.join`).

        A job that asks for a vocoder pass (`vocoder_pass` is not None: longer than one window)
        joins to its log-mel [1, T, 64], not audio: run that pass's chunks and join them too
        (`run_jobs` does both). A one-window decoding job's waveform is 640 samples per latent
        frame, followed by the first `job.tail` samples its vocoder gave past its last frame.
        """
        if isinstance(job, ChunkJob):
            return [job.join([o[0] for o in outputs])]
        return [
            join_windows(job.total, job.spans, [o[k] for o in outputs], job.scale, job.axis, job.tail)
            for k in range(len(outputs[0]))
        ]

    def vocoder_pass(self, job: Job, joined: Sequence[np.ndarray]) -> ChunkJob | None:
        """The chunked vocoder pass that turns a job's joined log-mel into its waveform, or None when
        the joined outputs are the job's result (`WindowJob.vocoder_tail`)."""
        if not isinstance(job, WindowJob) or job.vocoder_tail is None:
            return None
        return ChunkJob.over(joined[0][0], job.vocoder_tail)

    def run_jobs(self, jobs: Sequence[Job]) -> list[list[np.ndarray]]:
        """Run every window of several jobs, equal shapes batched up to `max_batch`, and join each job;
        then the vocoder passes the jobs ask for (`vocoder_pass`), their chunks batched across jobs too.
        Returns each job's final outputs (a waveform where a vocoder pass followed)."""
        joined = self._run_and_join(jobs)
        passes: dict[int, ChunkJob] = {}
        for j, (job, out) in enumerate(zip(jobs, joined)):
            vocoding = self.vocoder_pass(job, out)
            if vocoding is not None:
                passes[j] = vocoding
        if passes:
            for j, out in zip(passes, self._run_and_join(list(passes.values()))):
                joined[j] = out
        return joined

    def _run_and_join(self, jobs: Sequence[Job]) -> list[list[np.ndarray]]:
        pending: dict[tuple[tuple[str, ...], tuple[int, ...]], list[tuple[int, int]]] = {}
        for j, job in enumerate(jobs):
            for i in range(len(job.windows)):
                pending.setdefault(job.key(i), []).append((j, i))
        results: list[list[list[np.ndarray] | None]] = [[None] * len(job.windows) for job in jobs]
        for (roles, _), members in pending.items():
            for k in range(0, len(members), self.max_batch):
                batch = members[k : k + self.max_batch]
                outs = self.run_windows(roles, [jobs[j].windows[i] for j, i in batch])
                for (j, i), out in zip(batch, outs):
                    results[j][i] = out
        return [self.join(job, [o for o in res if o is not None]) for job, res in zip(jobs, results)]

    def _spans(self, total: int, latent: bool = False) -> list[tuple[int, int]]:
        """The window plan over `total` mel frames (a multiple of 4), or latent frames: the mel plan / 4."""
        div = LATENT_DOWNSAMPLE if latent else 1
        return plan_fitted_windows(
            total,
            self.window_frames // div,
            self.overlap_frames // div,
            1 if latent else LATENT_DOWNSAMPLE,
            max(1, WINDOW_STEP_FRAMES // div),
        )

    def padded_frames(self, frames: int) -> int:
        """The log-mel length an input of `frames` frames runs at: a multiple of 4, and for one-window
        inputs a multiple of `bucket_frames` (at most the window; inputs longer than the window keep
        their own multiple of 4: their windows are sized by `window_plan.plan_fitted_windows`)."""
        t = -(-frames // LATENT_DOWNSAMPLE) * LATENT_DOWNSAMPLE
        if t > self.window_frames + self.overlap_frames:
            return t
        return min(-(-t // self.bucket_frames) * self.bucket_frames, max(t, self.window_frames))

    def _encoder_windows(self, feats: Features) -> tuple[list[tuple[int, int]], tuple[np.ndarray, ...], int]:
        """The plan, the encoder inputs [1, frames, 64] and the padded length of one prepared input
        (log-mel padded with silence, see `padded_frames`)."""
        frames = feats.log_mel.shape[0]
        mel = _pad_frames(feats.log_mel, self.padded_frames(frames), self.contract.mel.silence)  # frames <= target
        spans = self._spans(mel.shape[0])
        return spans, tuple(mel[None, s:e] for s, e in spans), mel.shape[0]

    def reconstruction_job(self, feats: Features) -> WindowJob:
        """The chain's windows for one prepared input. One window: encoder, decoder and vocoder in one
        graph run, the output [160*T]. More: encoder and decoder per window, the log-mel windows
        joined, and a vocoder pass (`vocoder_pass`, which `run_jobs` runs) gives [160*T]."""
        spans, windows, total = self._encoder_windows(feats)
        if len(spans) == 1:
            return WindowJob((ENCODER, DECODER, VOCODER), windows, tuple(spans), total, HOP_LENGTH, -1)
        return WindowJob((ENCODER, DECODER), windows, tuple(spans), total, 1.0, -2, vocoder_tail=0)

    def encoding_job(self, feats: Features) -> WindowJob:
        """Encoder windows for one prepared input; outputs join into (mean, std) [8, ceil(T/4), 16]."""
        spans, windows, total = self._encoder_windows(feats)
        return WindowJob((ENCODER,), windows, tuple(spans), total, 1 / LATENT_DOWNSAMPLE, 1)

    def decoding_job(self, latents: np.ndarray, num_samples: int | None = None) -> WindowJob:
        """Decoder windows for one scaled latent [8, L, 16]; the output is [640*L], or up to 32
        samples more where `num_samples` asks for them (see `decode`). One window: decoder and
        vocoder in one graph run. More: the decoded log-mel windows joined, then a vocoder pass."""
        spans = self._spans(latents.shape[1], latent=True)
        windows = tuple(latents[:, s:e] for s, e in spans)
        length = latents.shape[1] * SAMPLES_PER_LATENT_FRAME
        tail = min(VOCODER_EXTRA_SAMPLES, max(0, (num_samples or 0) - length))
        if len(spans) == 1:
            return WindowJob(
                (DECODER, VOCODER), windows, tuple(spans), latents.shape[1], SAMPLES_PER_LATENT_FRAME, -1, tail
            )
        return WindowJob(
            (DECODER,), windows, tuple(spans), latents.shape[1], float(LATENT_DOWNSAMPLE), -2, vocoder_tail=tail
        )

    def vocoding_job(self, mel: np.ndarray) -> ChunkJob:
        """The vocoder pass over one log-mel [T, 64], in chunks (`vocoding.ChunkJob`); the output is [160*T]."""
        return ChunkJob.over(mel)

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
        mean, std = (self.crop_latents(feats, z) for z in self.run_jobs([self.encoding_job(feats)])[0])
        return posterior_draw(mean, std, seed) if sample else mean

    def decode(self, latents: np.ndarray, num_samples: int | None = None) -> np.ndarray:
        """Scaled latents [8, L, 16] or [B, 8, L, 16] -> 16 kHz waveform [640*L] or [B, 640*L].

        The latents diffusers' AudioLDM, MusicLDM and AudioLDM2 pipelines generate (still multiplied
        by the scaling factor) decode to the pipeline's own audio (docs/pipelines.md).

        Args:
            num_samples: crop the output to this many samples (the original length). Up to 32 more
                than 640*L give the vocoder's samples past the last frame, as the pipelines do when
                the requested length is longer than the latents they rounded it to.
        """
        try:
            z = np.asarray(latents)
        except (TypeError, RuntimeError) as e:  # e.g. a CUDA tensor, or one that requires grad
            raise AudioInputError(
                f"latents must be an array on the CPU (from torch: tensor.detach().float().cpu().numpy()), "
                f"got {type(latents).__name__} ({' '.join(str(e).split())[:200]})"
            ) from None
        batched = z.ndim == 4
        if z.ndim == 3:
            z = z[None]
        problem = latent_shape_problem(np.shape(latents), batched=True)
        if problem:
            raise AudioInputError(problem)
        if not np.issubdtype(z.dtype, np.floating):
            raise AudioInputError(f"latents must be floating point, got {z.dtype}")
        if not np.isfinite(z).all():
            raise AudioInputError("latents contain NaN or inf")
        z = z.astype(np.float32, copy=False)
        wave = np.stack([w for (w,) in self.run_jobs([self.decoding_job(item, num_samples) for item in z])])
        if num_samples is not None:
            wave = wave[:, :num_samples]
        return wave if batched else wave[0]

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """AudioLDM2 log-mel [T, 64] or [B, T, 64] (time first, natural log) -> 16 kHz waveform [160*T] or [B, 160*T].

        For mels from elsewhere (another model, an edit): they must follow the front end in
        docs/front-end.md (silence is ln(1e-5)).
        """
        m = np.asarray(mel)
        batched = m.ndim == 3
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[2] != N_MELS or m.shape[1] < 1:
            raise AudioInputError(
                f"log-mel must be [frames, {N_MELS}] or [batch, frames, {N_MELS}], got {list(np.shape(mel))}"
            )
        if not np.issubdtype(m.dtype, np.floating):
            raise AudioInputError(f"log-mel must be floating point, got {m.dtype}")
        if not np.isfinite(m).all():
            raise AudioInputError("log-mel contains NaN or inf")
        m = m.astype(np.float32, copy=False)
        wave = np.stack([w for (w,) in self.run_jobs([self.vocoding_job(item) for item in m])])
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
        """Reconstruct several inputs; windows of equal shape run as one batch (up to `max_batch`)."""
        feats = [self.features(a, sr) for a, sr in items]
        return [self.finish(f, w, output_rate) for f, w in zip(feats, self.reconstruct_features(feats))]

    def reconstruct_features(self, feats: Sequence[Features]) -> list[np.ndarray]:
        """Prepared inputs -> 16 kHz reconstructions at the prepared level (peak near 0.5)."""
        joined = self.run_jobs([self.reconstruction_job(f) for f in feats])
        return [self.crop(f, w) for f, (w,) in zip(feats, joined)]

    @staticmethod
    def crop_latents(feats: Features, latents: np.ndarray) -> np.ndarray:
        """Joined encoder output [8, frames, 16] cut to the input's ceil(T/4) latent frames (drops bucket padding)."""
        return latents[:, : -(-feats.log_mel.shape[0] // LATENT_DOWNSAMPLE)]

    @staticmethod
    def crop(feats: Features, wave: np.ndarray) -> np.ndarray:
        """A joined 16 kHz reconstruction cut (or padded) to the prepared input's length."""
        wave = wave[: feats.num_samples]
        if wave.size < feats.num_samples:  # the training framing yields N // 160 frames
            wave = np.pad(wave, (0, feats.num_samples - wave.size))
        return wave

    def finish(self, feats: Features, wave: np.ndarray, output_rate: int | None = None) -> np.ndarray:
        """Restore the input level and resample a 16 kHz reconstruction to `output_rate`."""
        with np.errstate(over="ignore"):  # an input level past float32's range is refused below, not warned about
            out = wave * np.float32(feats.gain)
        rate = self.contract.mel.sample_rate
        if output_rate and output_rate != rate:
            out = soxr.resample(out, rate, output_rate, quality="HQ").astype(np.float32)
        if not np.isfinite(out).all():  # the graphs' output is finite (checked): the input's level is too high
            raise NumericalError(
                f"the reconstruction at the input's level (gain {feats.gain:.3g}) is past float32's range",
                input_caused=True,
            )
        return out.astype(np.float32, copy=False)


class StreamedJob:
    """A job's graph runs one at a time, in the order that sends its waveform soonest, and the
    waveform that is final after each (a server streams a decode with it; `Reconstructor.run_jobs`
    is the same work all at once, and the parts laid end to end are its output).

    A job without a vocoder pass is its windows in order, each adding to the cross-fade
    (`WindowJob.streaming_join`). A job with one (`WindowJob.vocoder_tail`) interleaves its decoder
    windows with the vocoder pass's chunks: a chunk comes as soon as the log-mel join is final over
    the frames it reads (after decoder window i, everything before window i + 1's start), so audio
    leaves as each chunk is done and the first part waits only for the windows under the first chunk.
    """

    def __init__(self, job: WindowJob):
        self.job = job
        self._mel: np.ndarray | None = None
        self.vocoding: ChunkJob | None = None
        self.steps: list[tuple[Job, int]] = [(job, i) for i in range(len(job.windows))]
        if job.vocoder_tail is None:
            self._join: Any = job.streaming_join()
            return
        frames = int(round(job.total * job.scale))
        self._mel = np.empty((frames, N_MELS), np.float32)
        # the chunks' windows are views of the log-mel, each filled before its chunk is queued
        self.vocoding = ChunkJob.over(self._mel, job.vocoder_tail)
        self._mel_join = job.streaming_join()
        self._filled = 0
        self._join = self.vocoding.streaming_join()
        chunks, k = self.vocoding.chunks, 0
        self.steps = []
        for i in range(len(job.windows)):
            self.steps.append((job, i))
            final = int(round(job.spans[i + 1][0] * job.scale)) if i + 1 < len(job.windows) else frames
            while k < len(chunks) and chunks[k].end <= final:
                self.steps.append((self.vocoding, k))
                k += 1

    @property
    def length(self) -> int:
        """Samples the parts add up to."""
        if self.vocoding is not None:
            return self.vocoding.length
        return int(round(self.job.total * self.job.scale)) + self.job.tail

    def add(self, step: int, outputs: Sequence[np.ndarray]) -> np.ndarray:
        """Step `step`'s outputs (as `Reconstructor.run_windows` gives them for its window); returns the
        waveform that is final now, in order after the parts before (possibly empty). Steps must come in order."""
        job, _ = self.steps[step]
        if job is self.job and self._mel is not None:  # a decoder window: into the log-mel join
            part = self._mel_join.add(outputs[0])[0]
            self._mel[self._filled : self._filled + part.shape[0]] = part
            self._filled += part.shape[0]
            return np.empty(0, np.float32)
        return self._join.add(outputs[0])
