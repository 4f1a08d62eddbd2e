"""int8 graphs for CPUs: static QDQ quantization with per-graph mixed precision chosen by measurement.

Only Conv and MatMul are quantized (int8 per-channel weights, uint8 activations, MinMax
calibration); ConvTranspose has no int8 CPU kernel and stays fp32. Which blocks stay fp32 is
decided against an error budget measured on calibration-independent generated signals: every
candidate block is quantized, then the blocks whose exclusion helps most are put back to fp32 one
by one until the graph meets its budget, and then until the whole chain does. Random weights can
under- or overstate sensitivity, so the choice is always measured, never assumed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime as ort

from recon_runtime.audio_io import discover, is_audio_file, read_audio
from recon_runtime.contract import DECODER, ENCODER, LATENT_DOWNSAMPLE, PEAK_EPS, PEAK_LEVEL, ROLES, VOCODER
from recon_runtime.frontend import log_mel, prepare_waveform

from .errors import ExportError, ParityError
from .signals import test_signal
from .validate import mel_batch, rel_l2

_LOGGER = logging.getLogger(__name__)

QUANTIZED_OPS: Final = ("Conv", "MatMul")
# 7-bit weights: CPUs without VNNI (AVX2 only, like this workplace's EPYC) multiply u8 x s8 pairs
# with vpmaddubsw, which saturates at int16 for full-range weights. Measured on the full encoder,
# every block quantized: rel-L2 32 % with full range, 7.8 % with reduce_range. Safe on VNNI CPUs too.
REDUCE_RANGE: Final = True
# Error budgets vs the fp32 graph (rel-L2 of the main output) and for the chain (log-mel L1 of the
# output waveform vs the fp32 chain's, in nats). Issue 5: decoder mel <= 3 %, chain <= 0.02 nats.
INT8_BUDGETS: Final = {ENCODER: 0.05, DECODER: 0.03, VOCODER: 0.01}
CHAIN_LOG_MEL_L1_BUDGET: Final = 0.02
# First and last vocoder convolutions stay fp32: they cost nothing and carry the waveform's fine detail.
ALWAYS_FP32: Final = {VOCODER: ("/vocoder/conv_pre/", "/vocoder/conv_post/")}
CALIBRATION_KINDS: Final = ("speech", "music", "noise", "silence", "sweep")
CALIBRATION_FRAMES: Final = (128, 256)
CALIBRATION_MAX_FRAMES: Final = 256  # user audio is cut into windows of this many frames
CALIBRATION_MAX_WINDOWS: Final = 24
VALIDATION_KINDS: Final = ("speech", "music", "sweep", "noise")
VALIDATION_FRAMES: Final = 256
VALIDATION_SEED: Final = 1000  # distinct from calibration seeds: the check is calibration-independent


def block_of(node_name: str) -> str:
    """The block a node belongs to: /decoder/up_blocks.0/resnets.1, /vocoder/resblocks.3, /encoder/conv_in."""
    parts = node_name.split("/")
    nested = len(parts) > 3 and parts[2].split(".")[0] in ("up_blocks", "down_blocks", "mid_block")
    return "/".join(parts[:4] if nested else parts[:3])


def calibration_mels(folder: Path | None = None) -> list[np.ndarray]:
    """Log-mel windows [T, 64] (T a multiple of 4) for calibration: the user's audio, or a built-in set."""
    mels: list[np.ndarray] = []
    if folder is not None:
        files = [p for p, _ in discover([Path(folder)], is_audio_file)]
        if not files:
            raise ExportError(f"{folder}: no audio files for --calibration")
        for path in files:
            wave, _ = prepare_waveform(*read_audio(path))
            mel = log_mel(wave)
            for start in range(0, mel.shape[0], CALIBRATION_MAX_FRAMES):
                chunk = mel[start : start + CALIBRATION_MAX_FRAMES]
                chunk = chunk[: chunk.shape[0] - chunk.shape[0] % LATENT_DOWNSAMPLE]
                if chunk.shape[0] >= 4 * LATENT_DOWNSAMPLE:
                    mels.append(chunk)
        step = max(1, len(mels) // CALIBRATION_MAX_WINDOWS)
        return mels[::step][:CALIBRATION_MAX_WINDOWS]
    for i, kind in enumerate(CALIBRATION_KINDS):
        for j, frames in enumerate(CALIBRATION_FRAMES):
            wave = test_signal(kind, (frames - 1) * 160 / 16000, seed=10 * i + j)
            mels.append(log_mel(wave)[:frames])
    return mels


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


@dataclass
class GraphQuantResult:
    model: onnx.ModelProto
    rel_l2: float
    budget: float
    kept_fp32: list[str]
    sensitivity: dict[str, float] = field(default_factory=dict)


class Int8Quantizer:
    """Quantizes the three fp32 graphs of a bundle in a work folder and checks them against budgets."""

    def __init__(
        self,
        fp32_files: dict[str, Path],
        work: Path,
        calibration: list[np.ndarray],
        budgets: dict[str, float] | None = None,
        chain_budget: float = CHAIN_LOG_MEL_L1_BUDGET,
        echo: Callable[[str], None] = _LOGGER.info,
    ):
        self.fp32 = fp32_files
        self.work = Path(work)
        self.budgets = {**INT8_BUDGETS, **(budgets or {})}
        self.chain_budget = chain_budget
        self.echo = echo
        self._fp32_sessions = {r: _session(p) for r, p in fp32_files.items()}
        self._candidates: dict[str, dict[str, list[str]]] = {}
        self.calibration = self._calibration_feeds(calibration)
        self.validation = self._validation_feeds()

    # --------------------------------------------------------------------------- data
    def _run32(self, role: str, x: np.ndarray) -> list[np.ndarray]:
        sess = self._fp32_sessions[role]
        return sess.run(None, {sess.get_inputs()[0].name: x})

    def _calibration_feeds(self, mels: list[np.ndarray]) -> dict[str, list[dict[str, np.ndarray]]]:
        feeds: dict[str, list[dict[str, np.ndarray]]] = {r: [] for r in ROLES}
        for mel in mels:
            x = mel[None, None].astype(np.float32)
            z = self._run32(ENCODER, x)[0]
            decoded = self._run32(DECODER, z)[0]
            feeds[ENCODER].append({"log_mel": x})
            feeds[DECODER].append({"latent": z})
            feeds[VOCODER] += [{"log_mel": x[:, 0]}, {"log_mel": decoded[:, 0]}]
        return feeds

    def _validation_feeds(self) -> dict[str, Any]:
        mel = mel_batch(VALIDATION_KINDS, VALIDATION_FRAMES, seed=VALIDATION_SEED).astype(np.float32)
        z = self._run32(ENCODER, mel[:, None])[0]
        decoded = self._run32(DECODER, z)[0]
        wave = self._run32(VOCODER, decoded[:, 0])[0]
        return {
            ENCODER: (mel[:, None], z),
            DECODER: (z, decoded),
            VOCODER: (decoded[:, 0], wave),
            "chain_gain": _front_end_gain(wave),
            "chain_log_mel": np.stack([log_mel(w) for w in wave * _front_end_gain(wave)]),
        }

    # --------------------------------------------------------------------------- quantization
    def _preprocessed(self, role: str) -> Path:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        out = self.work / f"{role}.pre.onnx"
        if not out.exists():
            quant_pre_process(str(self.fp32[role]), str(out), skip_symbolic_shape=True)
        return out

    def candidates(self, role: str) -> dict[str, list[str]]:
        """Quantizable nodes grouped by block, minus those always kept fp32."""
        if role in self._candidates:
            return self._candidates[role]
        model = onnx.load(str(self._preprocessed(role)), load_external_data=False)
        blocks: dict[str, list[str]] = self._candidates.setdefault(role, {})
        for node in model.graph.node:
            if node.op_type not in QUANTIZED_OPS:
                continue
            if any(node.name.startswith(p) for p in ALWAYS_FP32.get(role, ())):
                continue
            blocks.setdefault(block_of(node.name), []).append(node.name)
        return blocks

    def quantize(self, role: str, exclude_blocks: Iterable[str]) -> onnx.ModelProto:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        blocks = self.candidates(role)
        excluded = set(exclude_blocks)
        nodes = [n for b, names in blocks.items() if b not in excluded for n in names]
        if not nodes:
            return onnx.load(str(self.fp32[role]))
        out = self.work / f"{role}.int8.onnx"
        cache = self.work / f"{role}.calibration"
        quantize_static(
            str(self._preprocessed(role)),
            str(out),
            _Reader(self.calibration[role]),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            reduce_range=REDUCE_RANGE,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=str(cache),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        return onnx.load(str(out))

    def error(self, role: str, model: onnx.ModelProto) -> float:
        x, expected = self.validation[role]
        return rel_l2(expected, _session(model).run(None, {_session_input(role): x})[0])

    def chain_error(self, models: dict[str, onnx.ModelProto]) -> float:
        """Mean |log-mel(int8 chain output) - log-mel(fp32 chain output)| in nats.

        Both outputs get the gain that brings the fp32 output's peak to the front end's 0.5, so the
        log-mel is taken at the level the front end works at (random weights give outputs ~40 dB
        quieter than a trained vocoder's, where ln(max(mel, 1e-5)) would magnify noise-floor bins).
        """
        sessions = {r: _session(m) for r, m in models.items()}
        x = self.validation[ENCODER][0]
        z = sessions[ENCODER].run(None, {"log_mel": x})[0]
        mel = sessions[DECODER].run(None, {"latent": z})[0]
        wave = sessions[VOCODER].run(None, {"log_mel": mel[:, 0]})[0]
        if not np.isfinite(wave).all():
            return float("inf")
        ours = np.stack([log_mel(w) for w in wave * self.validation["chain_gain"]])
        return float(np.mean(np.abs(ours - self.validation["chain_log_mel"])))

    def fit_graph(self, role: str) -> GraphQuantResult:
        """Quantize all candidate blocks, then keep the most harmful ones fp32 until under budget."""
        budget = self.budgets[role]
        blocks = list(self.candidates(role))
        model = self.quantize(role, [])
        err = self.error(role, model)
        self.echo(f"  int8 {role}: all {len(blocks)} blocks quantized, rel-L2 {err:.4f} (budget {budget})")
        result = GraphQuantResult(model, err, budget, [])
        if err <= budget:
            return result
        for block in blocks:  # sensitivity: the error with just this block kept fp32
            result.sensitivity[block] = self.error(role, self.quantize(role, [block]))
        order = sorted(blocks, key=lambda b: result.sensitivity[b])
        for block in order[:-1]:  # keeping every block fp32 would not be an int8 graph at all
            result.kept_fp32.append(block)
            result.model = self.quantize(role, result.kept_fp32)
            result.rel_l2 = self.error(role, result.model)
            self.echo(f"  int8 {role}: keep {block} fp32 -> rel-L2 {result.rel_l2:.4f}")
            if result.rel_l2 <= budget:
                return result
        raise ParityError(
            f"int8 {role}: error budget rel-L2 {budget} cannot be met with any block quantized "
            f"(best {result.rel_l2:.4f} with {len(result.kept_fp32)} of {len(blocks)} blocks in fp32); "
            "export without int8, or calibrate with --calibration on your own audio"
        )

    def run(self) -> tuple[dict[str, GraphQuantResult], float]:
        """Fit every graph, then tighten until the chain meets its log-mel budget.

        Each tightening step tries, in every graph, its most harmful block still quantized, and
        keeps the one that lowers the chain error most (greedy on the chain's own metric).
        """
        results = {role: self.fit_graph(role) for role in ROLES}
        chain = self.chain_error({r: res.model for r, res in results.items()})
        self.echo(f"  int8 chain: log-mel L1 vs fp32 {chain:.4f} nats (budget {self.chain_budget})")
        while chain > self.chain_budget:
            best: tuple[float, str, str, onnx.ModelProto] | None = None
            for role in ROLES:
                block = self._most_harmful(results[role], role)
                if block is None:
                    continue
                model = self.quantize(role, [*results[role].kept_fp32, block])
                trial = self.chain_error({r: (model if r == role else x.model) for r, x in results.items()})
                if best is None or trial < best[0]:
                    best = (trial, role, block, model)
            if best is None:
                raise ParityError(
                    f"int8 chain: log-mel L1 budget {self.chain_budget} nats cannot be met (best {chain:.4f}); "
                    "export without int8 or raise the budget"
                )
            chain, role, block, model = best
            res = results[role]
            res.kept_fp32.append(block)
            res.model, res.rel_l2 = model, self.error(role, model)
            self.echo(f"  int8 chain: keep {block} fp32 -> {chain:.4f} nats")
        return results, chain

    def _most_harmful(self, res: GraphQuantResult, role: str) -> str | None:
        """The quantized block whose return to fp32 lowers this graph's error most (measured once).

        None when one block is left: the graph must keep something quantized to be int8.
        """
        left = [b for b in self.candidates(role) if b not in res.kept_fp32]
        if len(left) <= 1:
            return None
        if not res.sensitivity:
            res.sensitivity = {b: self.error(role, self.quantize(role, [*res.kept_fp32, b])) for b in left}
        return min(left, key=lambda b: res.sensitivity.get(b, float("inf")))


def _front_end_gain(wave: np.ndarray) -> np.ndarray:
    """Per-item gain [B, 1] that puts each waveform's peak at the front end's level (0.5)."""
    return (PEAK_LEVEL / (np.abs(wave).max(axis=-1, keepdims=True) + PEAK_EPS)).astype(np.float32)


def _session_input(role: str) -> str:
    return {ENCODER: "log_mel", DECODER: "latent", VOCODER: "log_mel"}[role]


def quantize_bundle(
    fp32_files: dict[str, Path],
    calibration_dir: Path | None,
    echo: Callable[[str], None],
    budgets: dict[str, float] | None = None,
    chain_budget: float = CHAIN_LOG_MEL_L1_BUDGET,
) -> tuple[dict[str, GraphQuantResult], float]:
    """int8 models for the three graphs, each within its budget, and the chain's measured error."""
    with tempfile.TemporaryDirectory(prefix="recon-int8-") as work:
        quantizer = Int8Quantizer(
            fp32_files, Path(work), calibration_mels(calibration_dir), budgets, chain_budget, echo
        )
        return quantizer.run()


def describe(results: dict[str, GraphQuantResult], chain: float) -> dict[str, str]:
    """Human-readable cost lines for `recon-run info`."""
    return {
        role: f"int8 costs rel-L2 {r.rel_l2:.2%} vs fp32 (budget {r.budget:.0%}); chain log-mel L1 {chain:.4f} nats; "
        f"{len(r.kept_fp32)} block(s) kept fp32"
        for role, r in results.items()
    }
