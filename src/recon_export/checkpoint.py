"""Load the `vae` and `vocoder` of a diffusers AudioLDM-family checkpoint, or build them with random weights."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from diffusers import AutoencoderKL
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from recon_runtime.contract import (
    HOP_LENGTH,
    LATENT_CHANNELS,
    LATENT_DOWNSAMPLE,
    N_MELS,
    SAMPLE_RATE,
    SOURCE_FAMILY,
    SOURCE_PIPELINE,
    SOURCE_SCALING_FACTOR,
    VOCODER_EXTRA_SAMPLES,
    Contract,
)

from .errors import CheckpointError
from .families import COMPONENT_CLASSES, PIPELINE_FAMILIES, PUBLISHED, TINY

_LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL: Final = "cvssp/audioldm2-music"
VAE_SUBFOLDER: Final = "vae"
VOCODER_SUBFOLDER: Final = "vocoder"
CONFIG_FILE: Final = "config.json"
MODEL_INDEX_FILE: Final = "model_index.json"
# where recon.json's scaling factor came from (source.scaling_factor_from)
FROM_CHECKPOINT: Final = f"{VAE_SUBFOLDER}/{CONFIG_FILE}"
FROM_CALIBRATION: Final = "calibrated on random weights"
# random weights: the rebuilt checkpoint's quoted factor, information only (never the one baked in)
SOURCE_PUBLISHED_SCALING_FACTOR: Final = "published_scaling_factor"
SOURCE_PUBLISHED_SCALING_FACTOR_FROM: Final = "published_scaling_factor_from"

_VAE_FULL: Final[dict[str, Any]] = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [128, 256, 512],
    "layers_per_block": 2,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "force_upcast": True,
}
_VOCODER_FULL: Final[dict[str, Any]] = {
    "model_in_dim": N_MELS,
    "sampling_rate": SAMPLE_RATE,
    "upsample_initial_channel": 1024,
    "upsample_rates": [5, 4, 2, 2, 2],
    "upsample_kernel_sizes": [16, 16, 8, 4, 4],
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5]] * 3,
    "leaky_relu_slope": 0.1,
    "normalize_before": False,
}
# same structure, few channels: for fast tests only
_VAE_TINY: Final[dict[str, Any]] = {
    **_VAE_FULL,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
_VOCODER_TINY: Final[dict[str, Any]] = {
    **_VOCODER_FULL,
    "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3], [1, 3]],
}
# Every published AudioLDM, MusicLDM and AudioLDM2 checkpoint has the same VAE and vocoder
# architecture (families.py, docs/pipelines.md); they differ in the scaling factor.
ARCHITECTURES: Final[dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    name: (_VAE_TINY, _VOCODER_TINY) if name == TINY else (_VAE_FULL, _VOCODER_FULL) for name in PUBLISHED
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """The two PyTorch modules and where they came from."""

    vae: AutoencoderKL
    vocoder: SpeechT5HifiGan
    source: dict[str, Any]
    calibrated: bool = True
    """False for random weights whose scaling factor still waits for `calibrate`."""

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


DECODING_VAE_PREFIXES = ("post_quant_conv.", "decoder.")


def decoding_weights_sha256(ckpt: Checkpoint) -> str:
    """SHA-256 of everything that turns latents into sound: the VAE's post_quant_conv and decoder,
    the vocoder, and the scaling factor. It names the weights, not the folder they were loaded from,
    so it is the bundle's fingerprint (latents decode only with a bundle of the same one)."""
    h = hashlib.sha256()
    h.update(f"scaling_factor={ckpt.scaling_factor!r}".encode())
    vae = {k: v for k, v in ckpt.vae.state_dict().items() if k.startswith(DECODING_VAE_PREFIXES)}
    vocoder = {f"vocoder.{k}": v for k, v in ckpt.vocoder.state_dict().items()}
    for name, tensor in sorted({**vae, **vocoder}.items()):
        array = tensor.detach().to(torch.float32).contiguous().numpy()
        h.update(f"{name}:{list(array.shape)}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _init_like_pytorch(module: torch.nn.Module) -> None:
    """Re-initialise conv and linear layers with PyTorch's defaults.

    transformers initialises the vocoder with N(0, 0.01), which makes it nearly silent; parity and
    fp16 checks on such weights mean nothing.
    """
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose1d, torch.nn.Linear)):
            m.reset_parameters()


def build_random(config: str = "audioldm2-music", seed: int = 0, tiny: bool = False) -> Checkpoint:
    """A published checkpoint's architecture with seeded, realistically scaled random weights.

    Its scaling factor waits for `calibrate` (which export and save call), which measures one on
    these weights as training did: a trained checkpoint's factor would not give them unit-scale
    latents. The checkpoint's quoted factor is recorded in `source` as information only. `tiny=True`
    keeps the checkpoint's family on the tiny architecture (fast tests of each family).
    """
    if config not in PUBLISHED:
        raise CheckpointError(f"unknown --config {config!r}; choose from {', '.join(PUBLISHED)}")
    spec = PUBLISHED[config]
    tiny = tiny or config == TINY
    vae_cfg, voc_cfg = ARCHITECTURES[TINY if tiny else config]
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_cfg, scaling_factor=1.0)  # until `calibrate`
    _init_like_pytorch(vae)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**voc_cfg))
    _init_like_pytorch(vocoder)
    source = {
        "model": f"random:{config}" + (" (tiny)" if tiny and config != TINY else ""),
        "revision": None,
        "weights": "random",
        "seed": seed,
        "config": config,
        "tiny": tiny,
        "format": "in-memory",
        SOURCE_FAMILY: spec.family,
        SOURCE_PIPELINE: spec.pipeline_class,
        SOURCE_SCALING_FACTOR: FROM_CALIBRATION,
        SOURCE_PUBLISHED_SCALING_FACTOR: spec.published_scaling_factor,
        SOURCE_PUBLISHED_SCALING_FACTOR_FROM: spec.scaling_factor_quoted_from,
    }
    return _ready(Checkpoint(vae, vocoder, source, calibrated=False))


def reference_checkpoint(contract: Contract) -> Checkpoint:
    """PyTorch modules to compare or time a bundle against, without the checkpoint it came from.

    A --random-weights bundle gets its own weights back (its source's config, seed and tiny flag)
    with the scaling factor it recorded; a bundle of trained weights gets seeded random weights of
    its architecture (tiny or full size, from its VAE config), which times the same but decodes
    nothing alike.
    """
    src = contract.source
    if contract.random_weights:
        ckpt = build_random(str(src.get("config")), int(src.get("seed") or 0), tiny=bool(src.get("tiny")))
    else:
        tiny = list(contract.vae_config.get("block_out_channels") or []) == _VAE_TINY["block_out_channels"]
        ckpt = build_random(seed=0, tiny=tiny)
    ckpt.vae.register_to_config(scaling_factor=contract.scaling_factor)
    ckpt.calibrated = True
    return ckpt


def calibrate(ckpt: Checkpoint) -> None:
    """Give random weights a scaling factor measured on them, as training did (latents of unit
    standard deviation on generated speech, music, noise and sweeps); once."""
    if ckpt.calibrated:
        return
    from .graphs import EncoderGraph
    from .validate import calibrate_scaling_factor

    ckpt.vae.register_to_config(scaling_factor=calibrate_scaling_factor(EncoderGraph(ckpt.vae)))
    ckpt.calibrated = True


def save_checkpoint(ckpt: Checkpoint, folder: Path) -> Path:
    """Write a diffusers-layout folder (`vae/`, `vocoder/`, safetensors) like the hub's."""
    calibrate(ckpt)  # a saved checkpoint carries its scaling factor, as a trained one does
    folder = Path(folder)
    ckpt.vae.save_pretrained(folder / VAE_SUBFOLDER, safe_serialization=True)
    ckpt.vocoder.save_pretrained(folder / VOCODER_SUBFOLDER, safe_serialization=True)
    return folder


def _ready(ckpt: Checkpoint) -> Checkpoint:
    ckpt.vae.eval().float()
    ckpt.vocoder.eval().float()
    for p in (*ckpt.vae.parameters(), *ckpt.vocoder.parameters()):
        p.requires_grad_(False)
    check_architecture(ckpt)
    return ckpt


# ------------------------------------------------------------------ the contract every family meets


def _vae_defaults() -> dict[str, Any]:
    """What diffusers' AutoencoderKL assumes for a field its config.json leaves out."""
    params = inspect.signature(AutoencoderKL.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, (list, tuple)) and all(_is_int(v) for v in value) and (length is None or len(value) == length)
    )


def vocoder_length_rule(rates: list[int], kernels: list[int]) -> tuple[int, int]:
    """(a, b) such that SpeechT5HifiGan turns T mel frames into a*T + b samples.

    Its upsamplers are ConvTranspose1d(kernel k, stride s, padding (k - s) // 2), each turning L
    samples into (L - 1) * s - 2 * padding + k; conv_pre, conv_post (kernel 7, padding 3) and the
    residual blocks (odd kernels, "same" padding) keep the length.
    """
    a, b = 1, 0
    for s, k in zip(rates, kernels, strict=True):
        a, b = a * s, b * s + k - s - 2 * ((k - s) // 2)
    return a, b


def contract_problems(vae: Mapping[str, Any], vocoder: Mapping[str, Any]) -> list[str]:
    """Every way a VAE / vocoder config misses the bundle's contract, as "FILE FIELD: expected X, found Y".

    The contract is what the graphs and the runtime's front end assume: one mel channel in and out,
    8 latent channels, time and frequency downsampled by 4, a learned scaling factor; a vocoder of
    64 mel bins at 16 kHz taking raw log-mel and giving 160 * T + 32 samples for T frames. `vae` and
    `vocoder` are complete configs (the loaded modules' or a config.json with the library's defaults
    filled in), of any JSON types: a field of the wrong type is a problem, never an exception.
    """
    vae_file, voc_file = f"{VAE_SUBFOLDER}/{CONFIG_FILE}", f"{VOCODER_SUBFOLDER}/{CONFIG_FILE}"
    problems = []

    def expect(file: str, field: str, expected: Any, found: Any) -> None:
        if type(found) is not type(expected) or found != expected:
            problems.append(f"{file} {field}: expected {expected!r}, found {found!r}")

    if vae.get("_class_name") is not None:
        expect(vae_file, "_class_name", "AutoencoderKL", vae.get("_class_name"))
    expect(vae_file, "in_channels", 1, vae.get("in_channels"))
    expect(vae_file, "out_channels", 1, vae.get("out_channels"))
    expect(vae_file, "latent_channels", LATENT_CHANNELS, vae.get("latent_channels"))
    levels = int(math.log2(LATENT_DOWNSAMPLE)) + 1
    blocks = vae.get("block_out_channels")
    if not _is_int_list(blocks):
        problems.append(f"{vae_file} block_out_channels: expected a list of {levels} ints, found {blocks!r}")
    elif len(blocks) != levels:
        problems.append(
            f"{vae_file} block_out_channels: expected {levels} levels (downsampling by {LATENT_DOWNSAMPLE}), "
            f"found {len(blocks)} {list(blocks)} (downsampling by {2 ** max(len(blocks) - 1, 0)})"
        )
    for field in ("down_block_types", "up_block_types"):
        types = vae.get(field)
        if not (isinstance(types, (list, tuple)) and len(types) == levels and all(isinstance(t, str) for t in types)):
            problems.append(f"{vae_file} {field}: expected a list of {levels} block names, found {types!r}")
    factor = vae.get("scaling_factor")
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor) and factor > 0):
        problems.append(f"{vae_file} scaling_factor: expected the checkpoint's learned value > 0, found {factor!r}")

    expect(voc_file, "model_in_dim", N_MELS, vocoder.get("model_in_dim"))
    expect(voc_file, "sampling_rate", SAMPLE_RATE, vocoder.get("sampling_rate"))
    rates, kernels = vocoder.get("upsample_rates"), vocoder.get("upsample_kernel_sizes")
    if not (_is_int_list(rates) and rates and all(r > 0 for r in rates)):
        problems.append(
            f"{voc_file} upsample_rates: expected a list of ints with a product of {HOP_LENGTH} (hop {HOP_LENGTH}), "
            f"found {rates!r}"
        )
    elif math.prod(rates) != HOP_LENGTH:
        problems.append(
            f"{voc_file} upsample_rates: expected a product of {HOP_LENGTH} (hop {HOP_LENGTH}), "
            f"found {list(rates)} (hop {math.prod(rates)})"
        )
    elif not (_is_int_list(kernels, len(rates)) and all(k >= r for k, r in zip(kernels, rates))):
        problems.append(
            f"{voc_file} upsample_kernel_sizes: expected a list of {len(rates)} ints, one per upsample rate and "
            f"each at least its rate {list(rates)}, found {kernels!r}"
        )
    elif vocoder_length_rule(rates, kernels) != (HOP_LENGTH, VOCODER_EXTRA_SAMPLES):
        a, b = vocoder_length_rule(rates, kernels)
        problems.append(
            f"{voc_file} upsample_kernel_sizes: expected kernels that give {HOP_LENGTH}*T + {VOCODER_EXTRA_SAMPLES} "
            f"samples for T frames with upsample_rates {list(rates)}, found {list(kernels)} ({a}*T + {b})"
        )
    resblocks = vocoder.get("resblock_kernel_sizes")
    if not (_is_int_list(resblocks) and resblocks and all(k > 0 and k % 2 == 1 for k in resblocks)):
        problems.append(
            f"{voc_file} resblock_kernel_sizes: expected a list of odd ints (an even kernel changes the length), "
            f"found {resblocks!r}"
        )
    dilations = vocoder.get("resblock_dilation_sizes")
    n_resblocks = len(resblocks) if isinstance(resblocks, (list, tuple)) else None
    if not (
        isinstance(dilations, (list, tuple))
        and len(dilations) == n_resblocks
        and all(_is_int_list(d) and d and all(x > 0 for x in d) for d in dilations)
    ):
        problems.append(
            f"{voc_file} resblock_dilation_sizes: expected a list of lists of ints > 0, one per resblock kernel, "
            f"found {dilations!r}"
        )
    expect(voc_file, "normalize_before", False, vocoder.get("normalize_before"))
    return problems


def _refuse(where: str, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(f"{where}: not an AudioLDM-family VAE/vocoder: " + "; ".join(problems))


def check_architecture(ckpt: Checkpoint) -> None:
    """Refuse loaded modules whose interface misses the contract (channels, mel bins, hop, rate)."""
    _refuse(str(ckpt.source.get("model")), contract_problems(ckpt.vae.config, ckpt.vocoder.config.to_dict()))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable {what} ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a {what} (expected a JSON object)")
    return data


def read_model_index(folder: Path, where: str) -> tuple[str | None, str | None]:
    """(family, pipeline class) from `model_index.json`, or (None, None) where the folder has none.

    Refuses a pipeline that is not of the AudioLDM family, and a model index whose vae or vocoder
    is another class than the ones the export loads.
    """
    path = Path(folder) / MODEL_INDEX_FILE
    if not path.is_file():
        return None, None
    index = _read_json(path, MODEL_INDEX_FILE)
    cls = index.get("_class_name")
    if not isinstance(cls, str) or cls not in PIPELINE_FAMILIES:
        raise CheckpointError(
            f"{where}: {MODEL_INDEX_FILE} _class_name: expected one of {', '.join(sorted(PIPELINE_FAMILIES))}, "
            f"found {cls!r}; recon-export takes AudioLDM, MusicLDM and AudioLDM2 checkpoints"
        )
    for component, expected in COMPONENT_CLASSES.items():
        found = index.get(component)  # [library, class]; any other JSON is refused, never an exception
        if found is not None and found != expected:
            raise CheckpointError(f"{where}: {MODEL_INDEX_FILE} {component}: expected {expected}, found {found}")
    return PIPELINE_FAMILIES[cls], cls


def check_folder(folder: Path, where: str) -> dict[str, Any]:
    """Check a checkpoint folder's model index and configs against the contract, before any weights load.

    Returns the source fields it establishes (family, pipeline class, where the scaling factor is from).
    """
    family, pipeline = read_model_index(folder, where)
    configs = {}
    for sub in (VAE_SUBFOLDER, VOCODER_SUBFOLDER):
        path = folder / sub / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{where}: no {sub}/ folder with a {CONFIG_FILE}; expected the diffusers layout of an "
                f"AudioLDM-family checkpoint ({VAE_SUBFOLDER}/ and {VOCODER_SUBFOLDER}/)"
            )
        configs[sub] = _read_json(path, f"{sub} {CONFIG_FILE}")
    vae = {**_vae_defaults(), **configs[VAE_SUBFOLDER]}
    if "scaling_factor" not in configs[VAE_SUBFOLDER]:
        vae["scaling_factor"] = None  # diffusers would silently use Stable Diffusion's 0.18215
    vocoder = {**SpeechT5HifiGanConfig().to_dict(), **configs[VOCODER_SUBFOLDER]}
    _refuse(where, contract_problems(vae, vocoder))
    try:  # what the contract does not read, transformers validates (types of every field)
        SpeechT5HifiGanConfig.from_dict(configs[VOCODER_SUBFOLDER])
    except Exception as e:  # noqa: BLE001 - any failure to read a user's config is that file's problem
        raise CheckpointError(
            f"{where}: {VOCODER_SUBFOLDER}/{CONFIG_FILE}: not a SpeechT5HifiGan config ({_one_line(e)})"
        ) from None
    return {SOURCE_FAMILY: family, SOURCE_PIPELINE: pipeline, SOURCE_SCALING_FACTOR: FROM_CHECKPOINT}


def _local_folder(folder: Path, allow_pickle: bool, source: dict[str, Any]) -> Checkpoint:
    """Load the two modules of a folder that `check_folder` accepted."""
    use_safetensors = None if allow_pickle else True
    try:
        vae, vae_info = AutoencoderKL.from_pretrained(
            folder, subfolder=VAE_SUBFOLDER, use_safetensors=use_safetensors, output_loading_info=True
        )
    except Exception as e:  # noqa: BLE001 - a model that cannot be built from the user's files is one line
        raise CheckpointError(_load_message(folder / VAE_SUBFOLDER, e, allow_pickle)) from None
    _check_loading(folder / VAE_SUBFOLDER, vae_info)
    try:
        vocoder, vocoder_info = SpeechT5HifiGan.from_pretrained(
            folder / VOCODER_SUBFOLDER, use_safetensors=use_safetensors, output_loading_info=True
        )
    except Exception as e:  # noqa: BLE001 - a model that cannot be built from the user's files is one line
        raise CheckpointError(_load_message(folder / VOCODER_SUBFOLDER, e, allow_pickle)) from None
    # `mean` and `scale` are used only with normalize_before, which check_architecture refuses
    _check_loading(folder / VOCODER_SUBFOLDER, vocoder_info, unused=VOCODER_UNUSED_BUFFERS)
    return _ready(Checkpoint(vae, vocoder, source))


VOCODER_UNUSED_BUFFERS: Final = frozenset({"mean", "scale"})


def _check_loading(where: Path, info: dict[str, Any], unused: frozenset[str] = frozenset()) -> None:
    """Refuse weights that do not fit their config: diffusers and transformers initialise missing or
    mis-shaped weights at random with only a warning, and parity would then pass on those random
    weights (ONNX and PyTorch share them). Keys the weights hold but the config does not use are logged."""
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in unused)
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys", ()))
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights the config needs are missing ({', '.join(missing[:3])}, ...)")
    if mismatched:
        problems.append(
            f"{len(mismatched)} weights have another shape than the config's ({', '.join(mismatched[:3])}, ...)"
        )
    if problems:
        raise CheckpointError(f"{where}: the weights do not fit config.json: {'; '.join(problems)}")
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        _LOGGER.warning(
            "%s: %d weights the config does not use are ignored (%s, ...)",
            where,
            len(unexpected),
            ", ".join(unexpected[:3]),
        )


def _one_line(e: BaseException, limit: int = 300) -> str:
    return " ".join(str(e).split())[:limit]


def _load_message(where: Path, e: BaseException, allow_pickle: bool) -> str:
    text = _one_line(e, 10_000)
    if not allow_pickle and "safetensors" in text.lower():
        return f"{where}: no safetensors weights; pass --allow-pickle to load .bin weights you trust ({text[:200]})"
    return f"{where}: cannot load ({text[:300]})"


def load_checkpoint(model: str = DEFAULT_MODEL, revision: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """Load only `vae/` and `vocoder/` from a local folder or a hub id (optionally at a revision).

    `model_index.json` (where present) and both configs are checked against the contract first: a
    checkpoint that does not fit is refused before its weights are read (or, from the hub, fetched).
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file; --model takes a checkpoint folder or a hub id")
        source = {
            "model": str(path.resolve()),
            "revision": revision,
            "weights": "trained",
            "seed": None,
            "format": "local folder",
            **check_folder(path, str(path)),
        }
        return _local_folder(path, allow_pickle, source)
    if not _HUB_ID.match(model):
        raise CheckpointError(f"{model}: no such folder, and not a hub id of the form owner/name")
    folder = _download(
        model, revision, [MODEL_INDEX_FILE, *(f"{s}/*.json" for s in (VAE_SUBFOLDER, VOCODER_SUBFOLDER))]
    )
    checked = check_folder(folder, model)
    if not (folder / MODEL_INDEX_FILE).is_file():
        _LOGGER.warning(_no_model_index_message(model))
    resolved = folder.name  # snapshots/<commit hash>: the weights come from the same commit
    weights = [f"{s}/*.safetensors" for s in (VAE_SUBFOLDER, VOCODER_SUBFOLDER)]
    if allow_pickle:
        weights += [f"{s}/*.bin" for s in (VAE_SUBFOLDER, VOCODER_SUBFOLDER)]
    folder = _download(model, resolved, weights)
    source = {
        "model": model,
        "revision": resolved,
        "requested_revision": revision,
        "weights": "trained",
        "seed": None,
        "format": "hub",
        **checked,
    }
    return _local_folder(folder, allow_pickle, source)


def _no_model_index_message(repo_id: str) -> str:
    """Why a hub checkpoint's family is not recorded: every published AudioLDM-family repository has a
    model_index.json, but a cache filled by an earlier download may lack it, and offline that cannot be told apart."""
    from huggingface_hub import constants

    where = (
        "local cache (HF_HUB_OFFLINE: the repository may have one the cache lacks)"
        if constants.HF_HUB_OFFLINE
        else "snapshot (the repository has none, or the hub was not reached and the cache lacks it)"
    )
    return f"{repo_id}: no {MODEL_INDEX_FILE} in the {where}; family and pipeline not recorded"


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """The snapshot folder of `repo_id` at `revision` holding the files that match `patterns`."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: revision {revision!r} not found on the hub") from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError):
        raise CheckpointError(
            f"{repo_id}: repository not found on the hub (or private/gated without a token)"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: the hub is unreachable (offline) and the model is not in the local cache; "
            "pass a local folder with --model DIR, or use --random-weights"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"{repo_id}: download failed ({' '.join(str(e).split())[:200]}); pass a local folder with "
            "--model DIR, or use --random-weights"
        ) from None


def config_dict(module: torch.nn.Module) -> dict[str, Any]:
    """A JSON-ready copy of a model's config."""
    cfg = module.config
    data = dict(cfg) if not hasattr(cfg, "to_dict") else cfg.to_dict()
    return {k: v for k, v in data.items() if not k.startswith("_") and _jsonable(v)}


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, tuple, dict))
