"""The three exported graphs: PyTorch wrappers, ONNX export, fp16 conversion and stamping."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import onnx
import torch
from diffusers import AutoencoderKL
from transformers import SpeechT5HifiGan

from recon_runtime.contract import DECODER, ENCODER, GRAPH_SPECS, LATENT_DOWNSAMPLE, VOCODER, GraphSpec

from .errors import ExportError

_LOGGER = logging.getLogger(__name__)

# Ops kept in float32 inside fp16 graphs: GroupNorm statistics (exported as InstanceNormalization)
# overflow or lose precision in fp16 over thousands of positions, and so does the attention softmax.
FP16_KEEP_FP32_OPS: Final = ("InstanceNormalization", "GroupNormalization", "Softmax")
LOGVAR_RANGE: Final = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
EXAMPLE_FRAMES: Final = 64  # trace length; every length works (dynamic axes)


class EncoderGraph(torch.nn.Module):
    """log-mel [B, 1, T, 64] -> (scaled mean, scaled std) [B, 8, T/4, 16]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, log_mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.vae.encoder(log_mel)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, *LOGVAR_RANGE))
        return mean * self.scaling_factor, std * self.scaling_factor


class DecoderGraph(torch.nn.Module):
    """scaled latent [B, 8, T/4, 16] -> log-mel [B, 1, T, 64]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scaling_factor).sample


class VocoderGraph(torch.nn.Module):
    """log-mel [B, T, 64] -> waveform [B, 160*T + 32]."""

    def __init__(self, vocoder: SpeechT5HifiGan):
        super().__init__()
        self.vocoder = vocoder

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        return self.vocoder(log_mel)


def wrappers(vae: AutoencoderKL, vocoder: SpeechT5HifiGan) -> dict[str, torch.nn.Module]:
    return {ENCODER: EncoderGraph(vae).eval(), DECODER: DecoderGraph(vae).eval(), VOCODER: VocoderGraph(vocoder).eval()}


def example_input(spec: GraphSpec, frames: int = EXAMPLE_FRAMES, batch: int = 1) -> torch.Tensor:
    """A tensor matching a graph's input spec (only the shape matters for tracing)."""
    sizes = {"batch": batch, "frames": frames, "latent_frames": frames // LATENT_DOWNSAMPLE}
    shape = [sizes[a] if isinstance(a, str) else a for a in spec.inputs[0].axes]
    return torch.randn(*shape) if spec.role != ENCODER else torch.randn(*shape) - 5.0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's deprecation and tracer chatter; errors still propagate."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_fp32(module: torch.nn.Module, role: str, opset: int) -> onnx.ModelProto:
    """Trace one wrapper to an fp32 ONNX model with the spec's names and dynamic axes."""
    spec = GRAPH_SPECS[role]
    buffer = io.BytesIO()
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                module,
                (example_input(spec),),
                buffer,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; report one line
        raise ExportError(f"{role}: ONNX export failed at opset {opset} ({' '.join(str(e).split())[:300]})") from None
    model = onnx.load_from_string(buffer.getvalue())
    _name_dims(model, spec)
    return model


def _name_dims(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give every graph input/output the symbolic axis names of its spec."""
    declared = {t.name: t.axes for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        axes = declared.get(value.name)
        if axes is None:
            continue
        for dim, axis in zip(value.type.tensor_type.shape.dim, axes):
            if isinstance(axis, str):
                dim.dim_param = axis
            else:
                dim.dim_value = axis


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, float32 inputs/outputs, the fragile ops kept in float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet():
        converted = convert_float_to_float16(
            model,
            keep_io_types=True,
            disable_shape_infer=False,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS)),
        )
        wrapped = OnnxModel(converted)
        wrapped.topological_sort()  # the converter appends the input casts after their users
    return wrapped.model


def stamp(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Write the contract's key facts into the model's metadata_props."""
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "recon-export"


def save(model: onnx.ModelProto, path: Path) -> None:
    """Save one self-contained .onnx file and run onnx's checker on it."""
    onnx.save_model(model, str(path))  # OSError (disk full, permissions) is reported by the caller
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: onnx.checker rejected the graph ({' '.join(str(e).split())[:300]})") from None
