"""int8 graphs for CPUs: static QDQ quantization with per-graph mixed precision chosen by measurement.

Only Conv and MatMul are quantized (int8 per-channel weights, uint8 activations, percentile
calibration); ConvTranspose has no int8 CPU kernel and stays fp32. Which blocks stay fp32 is
decided against an error budget measured on calibration-independent generated signals: every
candidate block is quantized, then the blocks whose exclusion helps most are put back to fp32 one
by one until the graph meets its budget, and then until the whole chain does. Random weights can
under- or overstate sensitivity, so the choice is always measured, never assumed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime as ort

from recon_runtime.contract import (
    CHAIN_LOG_MEL_L1_BUDGET,
    DECODER,
    ENCODER,
    INT8_BUDGETS,
    LATENT_CHANNELS,
    LATENT_DOWNSAMPLE,
    LATENT_FREQ_BINS,
    N_MELS,
    ROLES,
    SILENCE_LOG_MEL,
    VOCODER,
)
from recon_runtime.files.audio import discover, is_audio_file, read_audio
from recon_runtime.frontend import log_mel, prepare_waveform

from .errors import ExportError, ParityError
from .signals import test_signal
from .validate import front_end_gain, mel_batch, rel_l2

_LOGGER = logging.getLogger(__name__)

QUANTIZED_OPS: Final = ("Conv", "MatMul")
# 7-bit weights: CPUs without VNNI (AVX2 only, like the measured AMD EPYC) multiply u8 x s8 pairs
# with vpmaddubsw, which saturates at int16 for full-range weights. Measured on the full encoder,
# every block quantized: rel-L2 32 % with full range, 7.8 % with reduce_range. Safe on VNNI CPUs too.
REDUCE_RANGE: Final = True


@dataclass(frozen=True)
class QuantScheme:
    """How Conv/MatMul are quantized: weight type and range, activation calibration."""

    reduce_range: bool = REDUCE_RANGE
    calibration: str = "percentile"  # "minmax" or "percentile"
    percentile: float = 99.99

    def label(self) -> str:
        calib = self.calibration if self.calibration == "minmax" else f"percentile {self.percentile}"
        return f"w int8{' 7-bit' if self.reduce_range else ''}, act uint8 {calib}"


# Measured on the full architecture, every block quantized, vs MinMax (graph rel-L2 / chain log-mel L1
# with only that graph int8): percentile 99.99 encoder 7.8 % / 0.049 (MinMax 7.8 % / 0.050), decoder
# 10.1 % / 0.049 (11.3 % / 0.055), vocoder 0.82 % / 0.149 (0.87 % / 0.163) (benchmarks/int8_variants.py).
# Tried once and dropped: full-range uint8 weights (u8u8: no more accurate, slower than fp32), and
# unquantized Conv outputs (halved the vocoder's error but block ORT's QLinearConv fusion: slower than fp32).
DEFAULT_SCHEME: Final = QuantScheme()
# First and last vocoder convolutions stay fp32: they cost nothing and carry the waveform's fine detail.
ALWAYS_FP32: Final = {VOCODER: ("/vocoder/conv_pre/", "/vocoder/conv_post/")}
CALIBRATION_KINDS: Final = ("speech", "music", "noise", "silence", "sweep")
CALIBRATION_SECONDS: Final = (1.28, 2.55)  # built-in signals: a short clip (padded with silence) and a full window
CALIBRATION_FRAMES: Final = 256  # every calibration input is one window of this many mel frames
CALIBRATION_MIN_FRAMES: Final = 16  # a shorter tail of a longer file is not worth a window
CALIBRATION_MAX_WINDOWS: Final = 24
VALIDATION_KINDS: Final = ("speech", "music", "sweep", "noise")
VALIDATION_FRAMES: Final = 256
VALIDATION_SEED: Final = 1000  # distinct from calibration seeds: the check is calibration-independent
STAGE_CACHE_SIZE: Final = 12  # stage outputs kept during the chain search (small: 4 validation clips)
# Input shapes at which each graph's multiply-accumulates are counted (the cost side of the search).
COST_FRAMES: Final = 256


def block_of(node_name: str) -> str:
    """The block a node belongs to: /decoder/up_blocks.0/resnets.1, /vocoder/resblocks.3, /encoder/conv_in."""
    parts = node_name.split("/")
    nested = len(parts) > 3 and parts[2].split(".")[0] in ("up_blocks", "down_blocks", "mid_block")
    return "/".join(parts[:4] if nested else parts[:3])


def node_macs(model: onnx.ModelProto, input_shape: Sequence[int]) -> dict[str, int]:
    """Multiply-accumulates of every Conv, ConvTranspose and MatMul node for one concrete input shape.

    Shapes come from one run on zeros (static shape inference loses them after dynamic Pad/Reshape).
    """
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "MatMul")]
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    wanted = list(dict.fromkeys(t for n in nodes for t in (n.input[0], n.output[0]) if t not in weights))
    known = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in known)
    sess = _session(probe)
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(None, {sess.get_inputs()[0].name: np.zeros(input_shape, np.float32)})
    shapes = {name: v.shape for name, v in zip(names, values)}
    shapes[sess.get_inputs()[0].name] = tuple(input_shape)
    macs: dict[str, int] = {}
    for node in nodes:
        out, x = shapes[node.output[0]], shapes.get(node.input[0], ())
        if node.op_type == "Conv":  # each output element: Cin/groups x kernel
            macs[node.name] = int(np.prod(out)) * int(np.prod(weights[node.input[1]][1:]))
        elif node.op_type == "ConvTranspose":  # each input element: Cout/groups x kernel
            macs[node.name] = int(np.prod(x)) * int(np.prod(weights[node.input[1]][1:]))
        else:
            macs[node.name] = int(np.prod(out)) * int(x[-1])
    return macs


def cost_input_shape(role: str) -> tuple[int, ...]:
    """The graph input shape (batch 1, COST_FRAMES mel frames) used to count MACs."""
    latent = COST_FRAMES // LATENT_DOWNSAMPLE
    return {
        ENCODER: (1, 1, COST_FRAMES, N_MELS),
        DECODER: (1, LATENT_CHANNELS, latent, LATENT_FREQ_BINS),
        VOCODER: (1, COST_FRAMES, N_MELS),
    }[role]


def _windows(mel: np.ndarray) -> list[np.ndarray]:
    """Cut [T, 64] into CALIBRATION_FRAMES windows; a short tail is padded with silence.

    Histogram calibration needs every input of one shape, and silence padding is what the runtime
    does to a clip's end anyway.
    """
    out = []
    for start in range(0, mel.shape[0], CALIBRATION_FRAMES):
        chunk = mel[start : start + CALIBRATION_FRAMES]
        if chunk.shape[0] < CALIBRATION_MIN_FRAMES and out:
            break
        pad = CALIBRATION_FRAMES - chunk.shape[0]
        out.append(np.pad(chunk, ((0, pad), (0, 0)), constant_values=SILENCE_LOG_MEL).astype(np.float32))
    return out


def calibration_mels(folder: Path | None = None) -> list[np.ndarray]:
    """Log-mel windows [CALIBRATION_FRAMES, 64] for calibration: the user's audio, or a built-in set."""
    mels: list[np.ndarray] = []
    if folder is not None:
        files = [p for p, _ in discover([Path(folder)], is_audio_file)]
        if not files:
            raise ExportError(f"{folder}: no audio files for --calibration")
        for path in files:
            wave, _ = prepare_waveform(*read_audio(path))
            mels += _windows(log_mel(wave))
        step = max(1, len(mels) // CALIBRATION_MAX_WINDOWS)
        return mels[::step][:CALIBRATION_MAX_WINDOWS]
    for i, kind in enumerate(CALIBRATION_KINDS):
        for j, seconds in enumerate(CALIBRATION_SECONDS):
            mels += _windows(log_mel(test_signal(kind, seconds, seed=10 * i + j)))
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
    """The graph's error with each block alone returned to fp32, measured once at `sensitivity_base`."""
    sensitivity_base: float = 0.0
    int8_share: float = 0.0
    """Fraction of the graph's Conv/ConvTranspose/MatMul multiply-accumulates that run in int8."""
    fp32_fallback: bool = False
    """No block could stay quantized within the budgets: the int8 set uses the fp32 graph here."""


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
        scheme: QuantScheme = DEFAULT_SCHEME,
    ):
        self.scheme = scheme
        self.fp32 = fp32_files
        self.work = Path(work)
        self.budgets = {**INT8_BUDGETS, **(budgets or {})}
        self.chain_budget = chain_budget
        self.echo = echo
        self._fp32_sessions = {r: _session(p) for r, p in fp32_files.items()}
        self._candidates: dict[str, dict[str, list[str]]] = {}
        self._costs: dict[str, tuple[dict[str, int], int]] = {}
        self._fp32_models: dict[str, onnx.ModelProto] = {}
        self.trajectory: list[dict[str, Any]] = []
        self._stage_cache: dict[tuple[int, ...], tuple[list[onnx.ModelProto], np.ndarray]] = {}
        self._last_quantized: dict[str, tuple[Any, onnx.ModelProto]] = {}
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
        gain = front_end_gain(wave)
        return {
            ENCODER: (mel[:, None], z),
            DECODER: (z, decoded),
            VOCODER: (decoded[:, 0], wave),
            "chain_gain": gain,
            "chain_log_mel": np.stack([log_mel(w) for w in wave * gain]),
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

    def fp32_model(self, role: str) -> onnx.ModelProto:
        """The fp32 graph, loaded once (the same object each time, so cached stage outputs match it)."""
        if role not in self._fp32_models:
            self._fp32_models[role] = onnx.load(str(self.fp32[role]))
        return self._fp32_models[role]

    def block_costs(self, role: str) -> tuple[dict[str, int], int]:
        """Multiply-accumulates per candidate block, and the graph's total, at COST_FRAMES frames."""
        if role not in self._costs:
            macs = node_macs(self.fp32_model(role), cost_input_shape(role))
            per_block = {b: sum(macs.get(n, 0) for n in names) for b, names in self.candidates(role).items()}
            self._costs[role] = (per_block, sum(macs.values()))
        return self._costs[role]

    def int8_share(self, role: str, kept_fp32: Iterable[str]) -> float:
        """Fraction of the graph's multiply-accumulates that run in int8 with these blocks kept fp32."""
        per_block, total = self.block_costs(role)
        kept = set(kept_fp32)
        return sum(c for b, c in per_block.items() if b not in kept) / max(total, 1)

    def _benefit_per_mac(self, res: GraphQuantResult, role: str, block: str) -> float:
        """How much keeping `block` fp32 lowers the graph's error, per multiply-accumulate it gives up."""
        base = res.sensitivity_base
        return (base - res.sensitivity.get(block, base)) / max(self.block_costs(role)[0][block], 1)

    def quantize(self, role: str, exclude_blocks: Iterable[str]) -> onnx.ModelProto:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        blocks = self.candidates(role)
        excluded = set(exclude_blocks)
        key = (frozenset(excluded), self.scheme)
        if role in self._last_quantized and self._last_quantized[role][0] == key:
            return self._last_quantized[role][1]  # a search step re-tries the unchanged graphs
        nodes = [n for b, names in blocks.items() if b not in excluded for n in names]
        if not nodes:
            return self.fp32_model(role)
        out = self.work / f"{role}.int8.onnx"
        sc = self.scheme
        method = CalibrationMethod.MinMax if sc.calibration == "minmax" else CalibrationMethod.Percentile
        tag = sc.calibration if sc.calibration == "minmax" else f"p{sc.percentile}"
        cache = self.work / f"{role}.{tag}.calibration"
        extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if sc.calibration == "percentile":
            extra["CalibPercentile"] = sc.percentile
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's calibrator prints progress
            quantize_static(
                str(self._preprocessed(role)),
                str(out),
                _Reader(self.calibration[role]),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                reduce_range=sc.reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                calibrate_method=method,
                calibration_cache_path=str(cache),
                extra_options=extra,
            )
        model = onnx.load(str(out))
        self._last_quantized[role] = (key, model)
        return model

    def error(self, role: str, model: onnx.ModelProto) -> float:
        x, expected = self.validation[role]
        return rel_l2(expected, _session(model).run(None, {_session_input(role): x})[0])

    def chain_error(self, models: dict[str, onnx.ModelProto]) -> float:
        """Mean |log-mel(int8 chain output) - log-mel(fp32 chain output)| in nats.

        Both outputs get the gain that brings the fp32 output's peak to the front end's 0.5, so the
        log-mel is taken at the level the front end works at (random weights give outputs ~40 dB
        quieter than a trained vocoder's, where ln(max(mel, 1e-5)) would magnify noise-floor bins).
        """
        x = self.validation[ENCODER][0]
        z = self._stage(models, ENCODER, x)
        mel = self._stage(models, DECODER, z)
        wave = self._stage(models, VOCODER, mel[:, 0])
        if not np.isfinite(wave).all():
            return float("inf")
        ours = np.stack([log_mel(w) for w in wave * self.validation["chain_gain"]])
        return float(np.mean(np.abs(ours - self.validation["chain_log_mel"])))

    def _stage(self, models: dict[str, onnx.ModelProto], role: str, x: np.ndarray) -> np.ndarray:
        """One stage of the chain on the validation input, reusing outputs for unchanged upstream models.

        A search step changes one graph, so the stages before it need not run again.
        """
        upstream = ROLES[: ROLES.index(role) + 1]
        key = tuple(id(models[r]) for r in upstream)
        if key not in self._stage_cache:
            out = _session(models[role]).run(None, {_session_input(role): x})[0]
            # the models are kept with the output so their ids cannot be reused while cached
            self._stage_cache[key] = ([models[r] for r in upstream], out)
            while len(self._stage_cache) > STAGE_CACHE_SIZE:
                self._stage_cache.pop(next(iter(self._stage_cache)))
        return self._stage_cache[key][1]

    def fit_graph(self, role: str) -> GraphQuantResult:
        """Quantize all candidate blocks, then keep the most harmful ones fp32 until under budget."""
        budget = self.budgets[role]
        blocks = list(self.candidates(role))
        model = self.quantize(role, [])
        err = self.error(role, model)
        self.echo(f"  int8 {role}: all {len(blocks)} blocks quantized, rel-L2 {err:.4f} (budget {budget})")
        result = GraphQuantResult(model, err, budget, [], int8_share=self.int8_share(role, []))
        if err <= budget:
            return result
        for block in blocks:  # sensitivity: the error with just this block kept fp32
            result.sensitivity[block] = self.error(role, self.quantize(role, [block]))
        result.sensitivity_base = err
        # Cheapest error first: blocks that remove most error per multiply-accumulate go back to fp32 first.
        order = sorted(blocks, key=lambda b: -self._benefit_per_mac(result, role, b))
        for block in order[:-1]:
            result.kept_fp32.append(block)
            result.model = self.quantize(role, result.kept_fp32)
            result.rel_l2 = self.error(role, result.model)
            result.int8_share = self.int8_share(role, result.kept_fp32)
            self.echo(
                f"  int8 {role}: keep {block} fp32 -> rel-L2 {result.rel_l2:.4f} "
                f"(int8 share {result.int8_share:.0%} of MACs)"
            )
            if result.rel_l2 <= budget:
                return result
        self.echo(f"  int8 {role}: budget {budget} not met with any block quantized; this stage stays fp32")
        self._fall_back(result, role)
        return result

    def _fall_back(self, res: GraphQuantResult, role: str) -> None:
        """The whole graph back to fp32: the int8 set then reuses the fp32 file for this stage."""
        res.kept_fp32 = list(self.candidates(role))
        res.model = self.fp32_model(role)
        res.rel_l2, res.int8_share, res.fp32_fallback = 0.0, 0.0, True

    def run(self) -> tuple[dict[str, GraphQuantResult], float]:
        """Fit every graph, then tighten until the chain meets its log-mel budget.

        Each tightening step tries, in every graph, the quantized block with the most error removed
        per multiply-accumulate, and keeps the one that lowers the chain error most per
        multiply-accumulate given up (greedy on the chain's own metric, cost-aware).
        """
        results = {role: self.fit_graph(role) for role in ROLES}
        chain = self.chain_error({r: res.model for r, res in results.items()})
        self._record(results, chain, None)
        self.echo(f"  int8 chain: log-mel L1 vs fp32 {chain:.4f} nats (budget {self.chain_budget})")
        while chain > self.chain_budget:
            # (gain per MAC, chain error, role, block or None for the whole graph, model)
            trials: list[tuple[float, float, str, str | None, onnx.ModelProto]] = []
            for role, res in results.items():
                if res.fp32_fallback:
                    continue
                costs, _ = self.block_costs(role)
                left = [b for b in self.candidates(role) if b not in res.kept_fp32]
                moves: list[tuple[str | None, onnx.ModelProto, int]] = []
                block = self._next_block(res, role) if len(left) > 1 else None
                if block is not None:
                    moves.append((block, self.quantize(role, [*res.kept_fp32, block]), costs[block]))
                moves.append((None, self.fp32_model(role), sum(costs[b] for b in left)))
                for move, model, cost in moves:
                    trial = self.chain_error({r: (model if r == role else x.model) for r, x in results.items()})
                    trials.append(((chain - trial) / max(cost, 1), trial, role, move, model))
            if not trials:
                break
            improving = [t for t in trials if t[0] > 0]
            _, chain, role, block, model = (
                max(improving, key=lambda t: t[0]) if improving else min(trials, key=lambda t: t[1])
            )
            res = results[role]
            if block is None:
                self._fall_back(res, role)
            else:
                res.kept_fp32.append(block)
                res.model, res.rel_l2 = model, self.error(role, model)
                res.int8_share = self.int8_share(role, res.kept_fp32)
            self._record(results, chain, block or f"/{role} (whole graph)")
            self.echo(
                f"  int8 chain: keep {block or f'the whole {role}'} fp32 -> {chain:.4f} nats "
                f"(int8 share {self._share_text(results)})"
            )
        if all(res.fp32_fallback for res in results.values()) or chain > self.chain_budget:
            raise ParityError(
                f"int8: the budgets (chain log-mel L1 {self.chain_budget} nats, "
                + ", ".join(f"{r} rel-L2 {self.budgets[r]}" for r in ROLES)
                + ") cannot be met with any block quantized; export without int8 or raise a budget "
                "(--int8-budget NAME=VALUE)"
            )
        return results, chain

    def _record(self, results: dict[str, GraphQuantResult], chain: float, block: str | None) -> None:
        self.trajectory.append(
            {
                "kept_fp32": block,
                "fp32_stages": [r for r, x in results.items() if x.fp32_fallback],
                "chain_log_mel_l1": chain,
                "rel_l2": {r: x.rel_l2 for r, x in results.items()},
                "int8_share": {r: x.int8_share for r, x in results.items()},
            }
        )

    def _share_text(self, results: dict[str, GraphQuantResult]) -> str:
        return ", ".join(f"{r} {x.int8_share:.0%}" for r, x in results.items())

    def _next_block(self, res: GraphQuantResult, role: str) -> str | None:
        """The quantized block whose return to fp32 removes most of this graph's error per MAC.

        Sensitivities are measured once per graph (at the error they were measured from).
        """
        left = [b for b in self.candidates(role) if b not in res.kept_fp32]
        if not left:
            return None
        if not res.sensitivity:
            res.sensitivity = {b: self.error(role, self.quantize(role, [*res.kept_fp32, b])) for b in left}
            res.sensitivity_base = res.rel_l2
        return max(left, key=lambda b: self._benefit_per_mac(res, role, b))


def _session_input(role: str) -> str:
    return {ENCODER: "log_mel", DECODER: "latent", VOCODER: "log_mel"}[role]


def quantize_bundle(
    fp32_files: dict[str, Path],
    calibration_dir: Path | None,
    echo: Callable[[str], None],
    budgets: dict[str, float] | None = None,
    chain_budget: float = CHAIN_LOG_MEL_L1_BUDGET,
) -> tuple[dict[str, GraphQuantResult], float, list[dict[str, Any]]]:
    """int8 models for the three graphs within the budgets, the chain's measured error, and the search path."""
    with tempfile.TemporaryDirectory(prefix="recon-int8-") as work:
        quantizer = Int8Quantizer(
            fp32_files, Path(work), calibration_mels(calibration_dir), budgets, chain_budget, echo
        )
        results, chain = quantizer.run()
        return results, chain, quantizer.trajectory


def describe(results: dict[str, GraphQuantResult], chain: float) -> dict[str, str]:
    """Human-readable cost lines for `recon-run info`."""
    lines = {}
    for role, r in results.items():
        if r.fp32_fallback:
            lines[role] = f"runs the fp32 graph (int8 missed the budgets here); chain log-mel L1 {chain:.4f} nats"
        else:
            lines[role] = (
                f"int8 costs rel-L2 {r.rel_l2:.2%} vs fp32 (budget {r.budget:.0%}); chain log-mel L1 {chain:.4f} "
                f"nats; {r.int8_share:.0%} of MACs in int8, {len(r.kept_fp32)} block(s) kept fp32"
            )
    return lines
