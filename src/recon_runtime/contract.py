"""The bundle contract: what `recon-export` writes and `recon-run` refuses to run without.

A bundle is a folder holding ONNX graphs and `recon.json`. This module defines the contract once;
the export package imports it to write bundles, the runtime uses it to check them. It is one file
past 500 lines on purpose: the constants of the front end and the latent layout, the graph specs,
the dataclasses of recon.json and the checks that read them back are one definition, and splitting
it would let the writer and the reader of a field drift apart.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from .errors import BundleError

# 2: the fingerprint is a hash of the decoding weights (1 hashed names and configs)
SCHEMA_VERSION: Final = 2
SUPPORTED_SCHEMA_VERSIONS: Final = (2,)
CONTRACT_FILE: Final = "recon.json"
MODEL_FAMILY: Final = "audioldm2-vae-hifigan"  # the graph contract, shared by AudioLDM, MusicLDM and AudioLDM2
# Keys of recon.json's `source` that name the checkpoint's family ("audioldm", "musicldm", "audioldm2"),
# its diffusers pipeline class and where the scaling factor came from. They live in `source`, which
# every recon-run keeps and hashes whole, so adding them needed no schema bump: bundles without them
# still read (the values are then unknown) and older runtimes compute the same digest for new bundles.
SOURCE_FAMILY: Final = "family"
SOURCE_PIPELINE: Final = "pipeline_class"
SOURCE_SCALING_FACTOR: Final = "scaling_factor_from"
RANDOM_WEIGHTS_WARNING: Final = "%s holds RANDOM weights: output is not meaningful audio"  # %s: the bundle

# ---------------------------------------------------------------- mel front end (docs/front-end.md)
SAMPLE_RATE: Final = 16000
N_FFT: Final = 1024
WIN_LENGTH: Final = 1024
HOP_LENGTH: Final = 160
N_MELS: Final = 64
F_MIN: Final = 0.0
F_MAX: Final = 8000.0
MEL_FLOOR: Final = 1e-5
SILENCE_LOG_MEL: Final = math.log(MEL_FLOOR)  # ln(1e-5) = -11.5129: the value of silence
PEAK_LEVEL: Final = 0.5  # AudioLDM2 normalises the waveform peak to 0.5
PEAK_EPS: Final = 1e-8
FRAMING_INFERENCE: Final = "inference"  # reflect-pad n_fft/2 each side: T = 1 + N // hop
FRAMING_TRAINING: Final = "training"  # reflect-pad (n_fft - hop)/2 each side, no centre: T = N // hop
FRAMING_PADS: Final = {FRAMING_INFERENCE: N_FFT // 2, FRAMING_TRAINING: (N_FFT - HOP_LENGTH) // 2}

# ---------------------------------------------------------------- latent and vocoder layout
LATENT_CHANNELS: Final = 8
LATENT_DOWNSAMPLE: Final = 4  # the VAE halves time and frequency twice
SAMPLES_PER_LATENT_FRAME: Final = HOP_LENGTH * LATENT_DOWNSAMPLE  # 640 output samples per latent frame
LATENT_FREQ_BINS: Final = N_MELS // LATENT_DOWNSAMPLE

VOCODER_EXTRA_SAMPLES: Final = 32  # HiFi-GAN returns 160*T + 32 samples
TRAINING_WINDOW_FRAMES: Final = 1024  # 10.24 s, the length the VAE was trained on

# ---------------------------------------------------------------- graph roles and tolerances
ENCODER: Final = "encoder"
DECODER: Final = "decoder"
VOCODER: Final = "vocoder"
ROLES: Final = (ENCODER, DECODER, VOCODER)
FP32: Final = "fp32"
FP16: Final = "fp16"
INT8: Final = "int8"
PRECISIONS: Final = (FP16, FP32, INT8)
REL_L2_THRESHOLDS: Final = {FP32: 1e-4, FP16: 5e-3}
# Default int8 error budgets vs the fp32 graphs (rel-L2 of each graph's main output) and for the whole
# chain (log-mel L1 of the output waveform vs the fp32 chain's, in nats); the export refuses int8
# graphs that miss them. Overridable per export (recon-export --int8-budget NAME=VALUE).
INT8_BUDGETS: Final = {ENCODER: 0.05, DECODER: 0.03, VOCODER: 0.01}
CHAIN_BUDGET_KEY: Final = "chain"
CHAIN_LOG_MEL_L1_BUDGET: Final = 0.02
DEFAULT_OPSET: Final = 17
# fp16 arithmetic measured at export (fp16 storage emulated in PyTorch, one full training window) against
# fp32: `auto` picks fp16 on CUDA only for a bundle whose every graph stays finite and within this
# rel-L2 (full architecture, random weights: encoder 0.15 %, decoder 0.41 %, vocoder 0.12 %; peaks finite).
FP16_ARITHMETIC_KEY: Final = "fp16_arithmetic"
FP16_ARITHMETIC_BUDGET: Final = 2e-2
# bf16: not a graph precision of the bundle but an OpenVINO inference precision (CPU with AVX512-BF16
# or AMX) applied to the fp32 graphs. The plan names the stages that stay f32; chosen by measurement
# on the full architecture (docs/openvino.md, benchmarks/openvino_variants.py): with every stage in
# bf16 the encoder's latents are 1.1 % (rel-L2) and the vocoder on real mels 0.012 nats (log-mel L1)
# from fp32, inside the budgets below, and keeping any stage f32 cut the estimated 10.24 s chain
# speed-up (a sum of per-stage medians, one run on a noisy shared machine) from 3.2x to 2.3x or less,
# so nothing stays f32. Finer than a stage: string rt_info ("precise_0", "disable_fp16_compression_0")
# set from Python on the in-memory model left bf16 results bit-identical in 2026.4; the same marks on
# every node, saved with ov.save_model and read back, halved the bf16 vocoder's output rel-L2 in a
# review's check (0.00223 -> 0.00113): that route is not yet evaluated for speed, so the stage is the unit.
BF16: Final = "bf16"
BF16_F32_STAGES: Final[tuple[str, ...]] = ()
BF16_KEY: Final = "bf16_openvino"  # recon.json validation entry written by recon-export
BF16_ENCODER_REL_L2_BUDGET: Final = 0.03  # encoder latents vs fp32
BF16_VOCODER_LOG_MEL_L1_BUDGET: Final = 0.05  # vocoder on real mels: output log-mel L1 vs fp32, nats
FINGERPRINT_LENGTH: Final = 16  # hex digits shown and compared


def latent_shape_problem(shape: Sequence[int], batched: bool = False) -> str | None:
    """Why `shape` is not that of scaled latents [8, frames >= 1, 16] (with `batched`, also
    [batch, 8, frames, 16]), or None: the one check of every decoder's input (library, CLI, server)."""
    one = f"[{LATENT_CHANNELS}, frames, {LATENT_FREQ_BINS}]"
    s = list(shape)
    if len(s) == 3 and s[0] == LATENT_CHANNELS and s[2] == LATENT_FREQ_BINS and s[1] >= 1:
        return None
    if batched and len(s) == 4 and s[1] == LATENT_CHANNELS and s[3] == LATENT_FREQ_BINS and s[2] >= 1:
        return None
    expected = f"{one} or [batch, {one[1:]}" if batched else one
    return f"latents must be {expected}, got {s}"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name and its axes (ints are fixed, strings are dynamic)."""

    name: str
    axes: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.axes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=str(d["name"]), axes=tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    """The I/O declaration of one exported graph (one per role, like an optimum OnnxConfig)."""

    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Axis index -> symbolic name for every dynamic axis, in the form torch.onnx wants."""
        return {
            t.name: {i: a for i, a in enumerate(t.axes) if isinstance(a, str)} for t in (*self.inputs, *self.outputs)
        }

    def file_name(self, precision: str) -> str:
        return f"{self.role}.{precision}.onnx"


GRAPH_SPECS: Final[dict[str, GraphSpec]] = {
    ENCODER: GraphSpec(
        ENCODER,
        inputs=(TensorSpec("log_mel", ("batch", 1, "frames", N_MELS)),),
        outputs=(
            TensorSpec("latent", ("batch", LATENT_CHANNELS, "latent_frames", LATENT_FREQ_BINS)),
            TensorSpec("latent_std", ("batch", LATENT_CHANNELS, "latent_frames", LATENT_FREQ_BINS)),
        ),
        description="log-mel -> scaled posterior mean and scaled standard deviation",
    ),
    DECODER: GraphSpec(
        DECODER,
        inputs=(TensorSpec("latent", ("batch", LATENT_CHANNELS, "latent_frames", LATENT_FREQ_BINS)),),
        outputs=(TensorSpec("log_mel", ("batch", 1, "frames", N_MELS)),),
        description="scaled latent -> log-mel (divides by the scaling factor inside)",
    ),
    VOCODER: GraphSpec(
        VOCODER,
        inputs=(TensorSpec("log_mel", ("batch", "frames", N_MELS)),),
        outputs=(TensorSpec("waveform", ("batch", "samples")),),
        description=f"log-mel -> 16 kHz waveform of {HOP_LENGTH}*frames + {VOCODER_EXTRA_SAMPLES} samples",
    ),
}


@dataclass(frozen=True)
class MelSpec:
    """The log-mel front end AudioLDM2 was trained with (see docs/front-end.md)."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    win_length: int = WIN_LENGTH
    hop_length: int = HOP_LENGTH
    n_mels: int = N_MELS
    f_min: float = F_MIN
    f_max: float = F_MAX
    window: str = "hann_periodic"
    framing: str = FRAMING_INFERENCE
    pad_mode: str = "reflect"
    spectrum: str = "magnitude"
    mel_scale: str = "slaney"
    mel_norm: str = "slaney"
    compression: str = "natural_log"
    mel_floor: float = MEL_FLOOR
    peak_level: float = PEAK_LEVEL
    orientation: str = "time_first"

    @property
    def pad(self) -> int:
        """Reflect padding on each side of the waveform, in samples."""
        return FRAMING_PADS[self.framing]

    @property
    def silence(self) -> float:
        """The log-mel value of silence, ln(mel_floor)."""
        return math.log(self.mel_floor)

    def num_frames(self, num_samples: int) -> int:
        """Mel frames for a waveform of `num_samples` samples under this framing."""
        return (num_samples + 2 * self.pad - self.n_fft) // self.hop_length + 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pad": self.pad, "silence_log_mel": self.silence}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MelSpec":
        names = cls.__dataclass_fields__.keys()
        spec = cls(**{k: d[k] for k in names if k in d})
        if spec.framing not in FRAMING_PADS:
            raise BundleError(f"unknown mel framing {spec.framing!r}; supported: {sorted(FRAMING_PADS)}")
        return spec


EXPECTED_MEL: Final = MelSpec()
MEL_FIELDS_THAT_MUST_MATCH: Final = (
    "sample_rate",
    "n_fft",
    "win_length",
    "hop_length",
    "n_mels",
    "f_min",
    "f_max",
    "window",
    "spectrum",
    "mel_scale",
    "mel_norm",
    "compression",
    "mel_floor",
    "orientation",
)


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX file of the bundle."""

    role: str
    precision: str
    file: str
    sha256: str
    size_bytes: int
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    rel_l2: float | None = None
    """Measured error vs the PyTorch reference at export (None for graphs not validated)."""
    threshold: float | None = None
    notes: Mapping[str, Any] = field(default_factory=dict)
    """Precision-specific facts: ops kept in fp32, quantisation settings."""
    file_precision: str | None = None
    """Set when the file belongs to another precision: an int8 set whose graph could not meet its
    error budget with any block quantized reuses the fp32 file for that stage."""

    @property
    def graph_precision(self) -> str:
        """The precision stamped in the file itself."""
        return self.file_precision or self.precision

    def to_dict(self) -> dict[str, Any]:
        extra = {"file_precision": self.file_precision} if self.file_precision else {}
        return {
            "role": self.role,
            "precision": self.precision,
            "file": self.file,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "rel_l2": self.rel_l2,
            "threshold": self.threshold,
            "notes": dict(self.notes),
            **extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GraphEntry":
        return cls(
            role=d["role"],
            precision=d["precision"],
            file=d["file"],
            sha256=d["sha256"],
            size_bytes=int(d["size_bytes"]),
            opset=int(d["opset"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            rel_l2=d.get("rel_l2"),
            threshold=d.get("threshold"),
            notes=d.get("notes", {}),
            file_precision=d.get("file_precision"),
        )


@dataclass(frozen=True)
class Contract:
    """Everything `recon.json` holds: source, configs, front end, layout, graphs, validation."""

    source: Mapping[str, Any]
    """model (hub id or path), revision (resolved), weights ('trained' or 'random'), seed; family,
    pipeline_class and scaling_factor_from where known (SOURCE_FAMILY, SOURCE_PIPELINE, SOURCE_SCALING_FACTOR)."""
    vae_config: Mapping[str, Any]
    vocoder_config: Mapping[str, Any]
    mel: MelSpec
    scaling_factor: float
    graphs: tuple[GraphEntry, ...]
    validation: Mapping[str, Any]
    tools: Mapping[str, str]
    created: str
    weights_sha256: str = ""
    """SHA-256 of what decodes latents: the VAE's post_quant_conv and decoder weights, the vocoder
    weights and the scaling factor (export.checkpoint.decoding_weights_sha256)."""
    schema_version: int = SCHEMA_VERSION
    model_family: str = MODEL_FAMILY

    @property
    def random_weights(self) -> bool:
        return self.source.get("weights") == "random"

    @property
    def family(self) -> str | None:
        """The checkpoint's family (audioldm, musicldm, audioldm2), from its model_index.json or the
        --config it was built from; None where the checkpoint did not say (not `model_family`, which
        names the graph contract all of them share)."""
        return self.source.get(SOURCE_FAMILY)

    @property
    def pipeline_class(self) -> str | None:
        """The diffusers pipeline class whose latents this bundle decodes (e.g. "AudioLDM2Pipeline"), or None."""
        return self.source.get(SOURCE_PIPELINE)

    def graph(self, role: str, precision: str) -> GraphEntry | None:
        for g in self.graphs:
            if g.role == role and g.precision == precision:
                return g
        return None

    @property
    def fingerprint(self) -> str:
        """Identifies the decoding weights, not where they came from nor the precision of the graphs.

        Latents made with one bundle decode only with a bundle of the same fingerprint: the same
        weights exported from two folders agree, different weights from one folder do not.
        """
        return self.weights_sha256[:FINGERPRINT_LENGTH]

    @property
    def digest(self) -> str:
        """Identifies this exact bundle: a hash of everything recon.json says, graph SHA-256s included.

        Each graph is checked against its SHA-256 when it is loaded, so a bundle whose graphs or
        contract were changed (even with recon.json edited to match) has another digest: pin the
        digest of a bundle you trust.
        """
        key = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:FINGERPRINT_LENGTH]

    @property
    def fp16_arithmetic_passed(self) -> bool:
        """True when the export measured fp16 arithmetic on every graph and it met its budget."""
        check = self.validation.get(FP16_ARITHMETIC_KEY) or {}
        return bool(check.get("passed"))

    @property
    def precisions(self) -> tuple[str, ...]:
        """Precisions for which the bundle holds all three graphs."""
        return tuple(p for p in PRECISIONS if all(self.graph(r, p) for r in ROLES))

    def latent_layout(self) -> dict[str, Any]:
        return {
            "channels": LATENT_CHANNELS,
            "time_downsample": LATENT_DOWNSAMPLE,
            "freq_bins": LATENT_FREQ_BINS,
            "shape": "[B, 8, T/4, 16]",
            "scaled": True,
            "scaling_factor": self.scaling_factor,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model_family": self.model_family,
            "source": dict(self.source),
            "created": self.created,
            "weights_sha256": self.weights_sha256,
            "mel": self.mel.to_dict(),
            "scaling_factor": self.scaling_factor,
            "latent": self.latent_layout(),
            "vocoder_output": {
                "hop_length": self.mel.hop_length,
                "extra_samples": VOCODER_EXTRA_SAMPLES,
                "length_rule": f"samples = {self.mel.hop_length} * frames + {VOCODER_EXTRA_SAMPLES}",
            },
            "vae_config": dict(self.vae_config),
            "vocoder_config": dict(self.vocoder_config),
            "graphs": [g.to_dict() for g in self.graphs],
            "validation": dict(self.validation),
            "tools": dict(self.tools),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Contract":
        version = d.get("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise BundleError(
                f"unsupported bundle schema_version {version!r}; this recon-run reads "
                f"{list(SUPPORTED_SCHEMA_VERSIONS)}: re-export the bundle with a matching recon-export"
            )
        if d.get("model_family") != MODEL_FAMILY:
            raise BundleError(f"bundle is for model family {d.get('model_family')!r}, expected {MODEL_FAMILY!r}")
        try:
            return cls(
                source=d["source"],
                vae_config=d["vae_config"],
                vocoder_config=d["vocoder_config"],
                mel=MelSpec.from_dict(d["mel"]),
                scaling_factor=float(d["scaling_factor"]),
                graphs=tuple(GraphEntry.from_dict(g) for g in d["graphs"]),
                validation=d.get("validation", {}),
                tools=d.get("tools", {}),
                created=d.get("created", ""),
                weights_sha256=_sha256_field(d.get("weights_sha256")),
                schema_version=int(version),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"malformed {CONTRACT_FILE}: missing or bad field ({e})") from None

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CONTRACT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    def metadata_props(self, entry: GraphEntry) -> dict[str, str]:
        """Key facts stamped into each ONNX file (a flat string map, as sherpa-onnx does)."""
        m = self.mel
        return {
            "recon.schema_version": str(self.schema_version),
            "recon.model_family": self.model_family,
            "recon.role": entry.role,
            "recon.precision": entry.graph_precision,
            "recon.source_model": str(self.source.get("model")),
            "recon.source_revision": str(self.source.get("revision")),
            "recon.weights": str(self.source.get("weights")),
            "recon.sample_rate": str(m.sample_rate),
            "recon.n_fft": str(m.n_fft),
            "recon.hop_length": str(m.hop_length),
            "recon.n_mels": str(m.n_mels),
            "recon.f_max": str(m.f_max),
            "recon.framing": m.framing,
            "recon.mel_floor": repr(m.mel_floor),
            "recon.scaling_factor": repr(self.scaling_factor),
            "recon.latent_shape": "[B, 8, T/4, 16]",
            "recon.inputs": json.dumps([t.to_dict() for t in entry.inputs]),
            "recon.outputs": json.dumps([t.to_dict() for t in entry.outputs]),
            "recon.vae_config": json.dumps(dict(self.vae_config), sort_keys=True),
            "recon.vocoder_config": json.dumps(dict(self.vocoder_config), sort_keys=True),
        }


def _sha256_field(value: Any) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise BundleError(f"malformed {CONTRACT_FILE}: weights_sha256 must be 64 lowercase hex digits, got {value!r}")
    return value


# metadata keys checked against recon.json at load (others are informative)
METADATA_KEYS_CHECKED: Final = (
    "recon.schema_version",
    "recon.model_family",
    "recon.role",
    "recon.precision",
    "recon.sample_rate",
    "recon.hop_length",
    "recon.n_mels",
    "recon.framing",
    "recon.scaling_factor",
    "recon.latent_shape",
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_contract(bundle_dir: Path) -> Contract:
    """Read and parse `recon.json` from a bundle folder (no graph file checks: `verify_graph_file` does
    one, when a backend loads it; `recon-run info --verify` does all)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(
            f"{bundle_dir}: no such bundle folder; export one with "
            f"`recon-export --out {bundle_dir}` (or --random-weights for a test bundle)"
        )
    path = bundle_dir / CONTRACT_FILE
    if not path.is_file():
        raise BundleError(f"{path}: missing; {bundle_dir} is not a recon bundle (export it with recon-export)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return Contract.from_dict(data)


def check_mel(contract: Contract, where: str) -> None:
    """Refuse a bundle whose front end is not AudioLDM2's: it would reconstruct garbage."""
    for name in MEL_FIELDS_THAT_MUST_MATCH:
        got, want = getattr(contract.mel, name), getattr(EXPECTED_MEL, name)
        if got != want:
            raise BundleError(
                f"{where}: mel parameter {name} is {got!r}, AudioLDM2 needs {want!r}; this bundle is from another model"
            )


def verify_graph_file(bundle_dir: Path, entry: GraphEntry) -> Path:
    """Check that a graph file is present and has the recorded size and SHA-256."""
    path = Path(bundle_dir) / entry.file
    if not path.is_file():
        raise BundleError(f"{path}: missing from the bundle (recon.json lists it); re-export the bundle")
    size = path.stat().st_size
    if size != entry.size_bytes:
        raise BundleError(f"{path}: size {size} bytes, recon.json says {entry.size_bytes}: truncated or replaced file")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise BundleError(
            f"{path}: sha256 {digest[:12]}... does not match recon.json ({entry.sha256[:12]}...): "
            "the file was modified; re-export the bundle"
        )
    return path


def check_metadata(path: Path, contract: Contract, entry: GraphEntry, meta: Mapping[str, str]) -> None:
    """Compare the metadata stamped in an ONNX file with recon.json; name any key that differs."""
    expected = contract.metadata_props(entry)
    for key in METADATA_KEYS_CHECKED:
        if key not in meta:
            raise BundleError(f"{path}: ONNX metadata lacks {key}; not a recon graph")
        if meta[key] != expected[key]:
            raise BundleError(f"{path}: ONNX metadata {key}={meta[key]!r} but recon.json implies {expected[key]!r}")
