"""Parity of exported graphs against the PyTorch modules, on log-mel of generated audio."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort
import torch

from recon_runtime.contract import (
    BF16,
    BF16_ENCODER_REL_L2_BUDGET,
    BF16_F32_STAGES,
    BF16_VOCODER_LOG_MEL_L1_BUDGET,
    DECODER,
    ENCODER,
    FP16_ARITHMETIC_BUDGET,
    FP32,
    PEAK_EPS,
    PEAK_LEVEL,
    REL_L2_THRESHOLDS,
    ROLES,
    TRAINING_WINDOW_FRAMES,
    VOCODER,
)
from recon_runtime.errors import ProviderError
from recon_runtime.frontend import log_mel

from .graphs import EncoderGraph
from .signals import test_signal

_LOGGER = logging.getLogger(__name__)

# (signal kinds in the batch, mel frames): batch 2 and batch 1, T a multiple of 4 for the VAE,
# and T not a multiple of 4 for the vocoder.
VAE_CASES: Final = ((("speech", "music"), 256), (("sweep",), 128))
VOCODER_CASES: Final = ((("speech", "music"), 256), (("noise",), 101))
CHAIN_CASE: Final = (("music", "speech"), 192)
CALIBRATION_KINDS: Final = ("speech", "music", "noise", "sweep")
CALIBRATION_FRAMES: Final = 256


def rel_l2(reference: np.ndarray, actual: np.ndarray) -> float:
    """||actual - reference|| / ||reference||; inf when the output is not finite."""
    if not np.isfinite(actual).all():
        return float("inf")
    return float(np.linalg.norm(actual - reference) / max(np.linalg.norm(reference), 1e-12))


def mel_batch(kinds: tuple[str, ...], frames: int, seed: int = 0) -> np.ndarray:
    """Log-mel [B, frames, 64] of generated signals, through the runtime's own front end."""
    samples = (frames - 1) * 160  # inference framing: T = 1 + N // 160
    return np.stack([log_mel(test_signal(k, samples / 16000, seed + i)) for i, k in enumerate(kinds)])


def calibrate_scaling_factor(encoder: EncoderGraph) -> float:
    """1 / std of the unscaled latent means, as AudioLDM2 training computed its scaling factor.

    The graph returns means already multiplied by its current factor, which is divided out here.
    """
    mel = mel_batch(CALIBRATION_KINDS, CALIBRATION_FRAMES, seed=100)
    with torch.no_grad():
        mean, _ = encoder(torch.from_numpy(mel)[:, None])
    return float(encoder.scaling_factor / mean.std())


@dataclass
class Reference:
    """PyTorch inputs and outputs for each graph, computed once and shared by all precisions."""

    cases: dict[str, list[tuple[np.ndarray, list[np.ndarray]]]]
    chain_input: np.ndarray
    chain_output: np.ndarray


def reference(modules: dict[str, torch.nn.Module]) -> Reference:
    """Run the PyTorch wrappers on the validation inputs."""

    def run(role: str, x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = modules[role](torch.from_numpy(x))
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    cases: dict[str, list[tuple[np.ndarray, list[np.ndarray]]]] = {r: [] for r in ROLES}
    for kinds, frames in VAE_CASES:
        mel = mel_batch(kinds, frames)[:, None]
        enc_out = run(ENCODER, mel)
        cases[ENCODER].append((mel, enc_out))
        cases[DECODER].append((enc_out[0], run(DECODER, enc_out[0])))
    for kinds, frames in VOCODER_CASES:
        mel = mel_batch(kinds, frames)
        cases[VOCODER].append((mel, run(VOCODER, mel)))
    chain_in = mel_batch(*CHAIN_CASE)
    z = run(ENCODER, chain_in[:, None])[0]
    chain_out = run(VOCODER, run(DECODER, z)[0][:, 0])[0]
    return Reference(cases, chain_in, chain_out)


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def validate_precision(
    files: dict[str, Path],
    precision: str,
    ref: Reference,
    threshold: float | None = None,
    on_graph: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run each graph of one precision and the whole chain in onnxruntime (CPU) against PyTorch.

    Returns a report {role: {...}, "chain": {...}} with rel_l2 (worst case over inputs and
    outputs), threshold and passed. It never raises on a failed comparison: the caller collects.
    """
    threshold = REL_L2_THRESHOLDS[precision] if threshold is None else threshold
    report: dict[str, Any] = {}
    sessions = {role: _session(files[role]) for role in ROLES}
    for role in ROLES:
        sess = sessions[role]
        worst, shapes = 0.0, []
        for x, expected in ref.cases[role]:
            got = sess.run(None, {sess.get_inputs()[0].name: x})
            for e, g in zip(expected, got):
                if e.shape != g.shape:
                    worst = float("inf")
                else:
                    worst = max(worst, rel_l2(e, g))
            shapes.append(list(x.shape))
        report[role] = {"rel_l2": worst, "threshold": threshold, "passed": worst <= threshold, "inputs": shapes}
        if on_graph:
            on_graph(role, report[role])
    z = sessions[ENCODER].run(None, {"log_mel": ref.chain_input[:, None]})[0]
    mel = sessions[DECODER].run(None, {"latent": z})[0]
    wave = sessions[VOCODER].run(None, {"log_mel": mel[:, 0]})[0]
    err = rel_l2(ref.chain_output, wave) if wave.shape == ref.chain_output.shape else float("inf")
    report["chain"] = {
        "rel_l2": err,
        "threshold": threshold,
        "passed": err <= threshold,
        "inputs": [list(ref.chain_input.shape)],
    }
    if on_graph:
        on_graph("chain", report["chain"])
    return report


FP16_CHECK_KIND: Final = "music"  # a dense spectrum: every mel band and the loud range are exercised


FP16_MAX: Final = 65504.0  # largest finite float16: beyond it a value overflows to inf


def _to_fp16(value: Any) -> Any:
    """Round tensors (inside tuples too) to float16 and back: fp16 storage, overflow to inf."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.half().float()
    if isinstance(value, tuple):
        return tuple(_to_fp16(v) for v in value)
    return value


def fp16_emulated(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` that stores everything in fp16 and accumulates in fp32.

    Weights and buffers are rounded to float16, and every layer's inputs and outputs too (a value
    past 65504 becomes inf, as in an fp16 graph); each layer computes in float32 in between, as
    GPU fp16 kernels accumulate (tensor cores and cuDNN accumulate fp16 products in fp32), and as
    the fp16 graphs keep GroupNorm and softmax in fp32.
    """
    copy_ = copy.deepcopy(module)
    with torch.no_grad():
        for tensor in (*copy_.parameters(), *copy_.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    for layer in copy_.modules():
        if next(layer.children(), None) is None:  # leaf layers: convolutions, norms, activations, ...
            layer.register_forward_pre_hook(lambda _m, args: _to_fp16(args))
            layer.register_forward_hook(lambda _m, _args, out: _to_fp16(out))
    return copy_


def fp16_arithmetic(modules: dict[str, torch.nn.Module], frames: int = TRAINING_WINDOW_FRAMES) -> dict[str, Any]:
    """fp16 error of each graph on one full training window, with fp16 storage and overflow.

    onnxruntime's CPU provider runs fp16 graphs in fp32 after optimisation, so the fp16 bundle's
    CPU parity says nothing about overflow or fp16 rounding. Here each module runs as
    `fp16_emulated` and in float32 on one 1024-frame window of a generated signal (the decoder on
    the fp32 encoder's latents, the vocoder on the real mel). PyTorch's own CPU float16 kernels
    would compute in half precision, but on CPUs without native fp16 (AVX2/AVX-512 without
    AVX512-FP16 or AMX-FP16) they took more than five minutes for the full-size encoder alone;
    the emulation costs one fp32 pass per graph.
    """
    mel = mel_batch((FP16_CHECK_KIND,), frames)
    inputs = {ENCODER: torch.from_numpy(mel)[:, None], VOCODER: torch.from_numpy(mel)}
    with torch.no_grad():
        inputs[DECODER] = modules[ENCODER](inputs[ENCODER])[0]
    results: dict[str, Any] = {}
    for role in ROLES:
        module = modules[role]
        with torch.no_grad():
            ref = module(inputs[role])
            half = fp16_emulated(module)
            got = half(inputs[role])
            del half
        ref_np = (ref[0] if isinstance(ref, tuple) else ref).float().numpy()
        got_np = (got[0] if isinstance(got, tuple) else got).float().numpy()
        finite = bool(np.isfinite(got_np).all())
        err = rel_l2(ref_np, got_np) if finite else None  # JSON has no NaN or inf: null when not finite
        results[role] = {
            "rel_l2": err,
            "finite": finite,
            "peak_abs": float(np.abs(got_np).max()) if finite else None,
            "passed": finite and err is not None and err <= FP16_ARITHMETIC_BUDGET,
        }
    return {
        "engine": (
            f"PyTorch {torch.__version__} CPU, fp16 storage emulated: weights and every layer's inputs and "
            "outputs rounded to float16 (overflow to inf), float32 accumulation"
        ),
        "reference": "the same modules in float32",
        "frames": frames,
        "signal": FP16_CHECK_KIND,
        "budget": FP16_ARITHMETIC_BUDGET,
        "results": results,
        "passed": all(r["passed"] for r in results.values()),
    }


def failures(report: dict[str, dict[str, Any]], precision: str) -> list[str]:
    """One line per graph over its threshold."""
    return [
        f"{precision} {name}: rel-L2 {r['rel_l2']:.3g} > {r['threshold']:.3g}"
        for name, r in report.items()
        if not r["passed"]
    ]


BF16_CHECK_KINDS: Final = ("speech", "music")
BF16_CHECK_FRAMES: Final = 256  # 2.56 s: short enough for an export, long enough for every layer's receptive field


def front_end_gain(wave: np.ndarray) -> np.ndarray:
    """Per-item gain [B, 1] that puts each waveform's peak at the front end's level (0.5)."""
    return (PEAK_LEVEL / (np.abs(wave).max(axis=-1, keepdims=True) + PEAK_EPS)).astype(np.float32)


def log_mel_l1(reference: np.ndarray, actual: np.ndarray) -> float:
    """Mean |log-mel(actual) - log-mel(reference)| in nats, both at the reference's front-end level.

    Random weights give waveforms far quieter than a trained vocoder's; the gain keeps the log-mel
    away from the floor where ln(max(mel, 1e-5)) would magnify noise (as the int8 chain check does).
    """
    if not np.isfinite(actual).all():
        return float("inf")
    gain = front_end_gain(reference)
    ref = np.stack([log_mel(w) for w in reference * gain])
    got = np.stack([log_mel(w) for w in actual * gain])
    return float(np.mean(np.abs(got - ref)))


def bf16_errors(files: dict[str, Path], frames: int = BF16_CHECK_FRAMES) -> dict[str, float]:
    """Errors of OpenVINO's bf16 plan vs OpenVINO f32 on the fp32 graphs, where they mean something.

    With random weights only some comparisons are meaningful: the encoder and the vocoder are fed
    real log-mels (of generated speech and music, through the runtime's front end); the decoder is
    fed the fp32 encoder's latents. The whole chain is reported too, but a random decoder's output
    is a mel unlike any real one, so its vocoder error says little (it is not budgeted).
    """
    from recon_runtime.executors import openvino as ov_exec  # optional: only where openvino is installed

    plan = ov_exec.stage_precisions(BF16)
    options = ov_exec.ExecutorOptions()
    compiled: dict[tuple[str, str], Any] = {}

    def run(role: str, precision: str, x: np.ndarray) -> np.ndarray:
        key = (role, precision)
        if key not in compiled:
            config = ov_exec.compile_config(precision, options, None)
            compiled[key] = ov_exec.core().compile_model(str(files[role]), ov_exec.DEVICE, config)
        request = compiled[key].create_infer_request()
        return np.stack([np.array(request.infer({0: item[None]})[0][0]) for item in x])

    mel = mel_batch(BF16_CHECK_KINDS, frames)
    z32 = run(ENCODER, FP32, mel[:, None])
    z16 = run(ENCODER, plan[ENCODER], mel[:, None])
    m32 = run(DECODER, FP32, z32)
    m16 = run(DECODER, plan[DECODER], z32)
    w32 = run(VOCODER, FP32, mel)
    w16 = run(VOCODER, plan[VOCODER], mel)
    c32 = run(VOCODER, FP32, m32[:, 0])
    c16 = run(VOCODER, plan[VOCODER], run(DECODER, plan[DECODER], z16)[:, 0])
    return {
        "encoder_rel_l2": rel_l2(z32, z16),
        "decoder_rel_l2": rel_l2(m32, m16),
        "vocoder_log_mel_l1": log_mel_l1(w32, w16),
        "vocoder_rel_l2": rel_l2(w32, w16),
        "chain_log_mel_l1": log_mel_l1(c32, c16),
    }


def bf16_check(files: dict[str, Path]) -> dict[str, Any]:
    """The bf16 plan's errors for recon.json, or why they could not be measured on this machine.

    The measurement is optional: whatever fails in it (OpenVINO missing or broken, a compile or run
    error) is recorded as {"measured": False, "reason": ...} with a warning, and the export goes on.
    """
    try:
        from recon_runtime.executors import openvino as ov_exec
    except ProviderError as e:
        return {"measured": False, "reason": str(e)}
    except Exception as e:  # openvino installed but failing to import: the measurement is optional
        return _bf16_not_measured("importing openvino", e)
    try:
        supported, reason = ov_exec.BF16_PROBE()
        if not supported:
            return {"measured": False, "reason": reason}
        budgets = {"encoder_rel_l2": BF16_ENCODER_REL_L2_BUDGET, "vocoder_log_mel_l1": BF16_VOCODER_LOG_MEL_L1_BUDGET}
        results = bf16_errors(files)
        engine = f"OpenVINO {ov_exec.ov.__version__} CPU ({reason})"
    except Exception as e:  # an OpenVINO failure here must not abort the export
        return _bf16_not_measured("measuring", e)
    return {
        "measured": True,
        "engine": engine,
        "reference": "OpenVINO f32 on the same fp32 graphs",
        "signals": list(BF16_CHECK_KINDS),
        "frames": BF16_CHECK_FRAMES,
        "f32_stages": list(BF16_F32_STAGES),
        "budgets": budgets,
        "results": results,
        "passed": all(results[k] <= v for k, v in budgets.items()),
    }


def _bf16_not_measured(step: str, error: Exception) -> dict[str, Any]:
    first = (str(error).strip().splitlines() or [""])[0][:300]
    reason = f"the optional bf16 measurement failed while {step}: {type(error).__name__}: {first}"
    _LOGGER.warning("%s; recorded as not measured, the export goes on", reason)
    return {"measured": False, "reason": reason}
