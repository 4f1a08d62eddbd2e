"""Load the `vae` and `vocoder` of a diffusers AudioLDM2 checkpoint, or build them with random weights."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from diffusers import AutoencoderKL
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from recon_runtime.contract import HOP_LENGTH, LATENT_CHANNELS, LATENT_DOWNSAMPLE, N_MELS, SAMPLE_RATE

from .errors import CheckpointError

_LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL: Final = "cvssp/audioldm2-music"
VAE_SUBFOLDER: Final = "vae"
VOCODER_SUBFOLDER: Final = "vocoder"
# cvssp/audioldm2's published value; -music and -large computed theirs at training time, so a
# loaded checkpoint always uses its own config and random weights get one measured like training did.
AUDIOLDM2_SCALING_FACTOR: Final = 0.4110932946205139

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
    "scaling_factor": AUDIOLDM2_SCALING_FACTOR,
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
# The three public checkpoints share one VAE and one vocoder architecture (docs/bundle.md).
ARCHITECTURES: Final[dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "audioldm2": (_VAE_FULL, _VOCODER_FULL),
    "audioldm2-music": (_VAE_FULL, _VOCODER_FULL),
    "audioldm2-large": (_VAE_FULL, _VOCODER_FULL),
    # same structure, few channels: for fast tests only
    "tiny": (
        {**_VAE_FULL, "block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
        {
            **_VOCODER_FULL,
            "upsample_initial_channel": 32,
            "resblock_kernel_sizes": [3, 5],
            "resblock_dilation_sizes": [[1, 3], [1, 3]],
        },
    ),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """The two PyTorch modules and where they came from."""

    vae: AutoencoderKL
    vocoder: SpeechT5HifiGan
    source: dict[str, Any]

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


def build_random(config: str = "audioldm2-music", seed: int = 0) -> Checkpoint:
    """Exact architecture of a named checkpoint with seeded, realistically scaled random weights.

    The scaling factor is set afterwards by `calibrate_scaling_factor`, as training did.
    """
    if config not in ARCHITECTURES:
        raise CheckpointError(f"unknown --config {config!r}; choose from {', '.join(ARCHITECTURES)}")
    vae_cfg, voc_cfg = ARCHITECTURES[config]
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_cfg)
    _init_like_pytorch(vae)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**voc_cfg))
    _init_like_pytorch(vocoder)
    source = {
        "model": f"random:{config}",
        "revision": None,
        "weights": "random",
        "seed": seed,
        "config": config,
        "format": "in-memory",
    }
    return _ready(Checkpoint(vae, vocoder, source))


def save_checkpoint(ckpt: Checkpoint, folder: Path) -> Path:
    """Write a diffusers-layout folder (`vae/`, `vocoder/`, safetensors) like the hub's."""
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


def check_architecture(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint whose interface is not AudioLDM2's (channels, mel bins, hop, rate)."""
    v, g = ckpt.vae.config, ckpt.vocoder.config
    where = ckpt.source.get("model")
    problems = []
    if v.in_channels != 1 or v.out_channels != 1:
        problems.append(f"VAE in/out channels {v.in_channels}/{v.out_channels}, expected 1/1")
    if v.latent_channels != LATENT_CHANNELS:
        problems.append(f"VAE latent_channels {v.latent_channels}, expected {LATENT_CHANNELS}")
    downsample = 2 ** (len(v.block_out_channels) - 1)
    if downsample != LATENT_DOWNSAMPLE:
        problems.append(f"VAE downsamples by {downsample}, expected {LATENT_DOWNSAMPLE}")
    if g.model_in_dim != N_MELS:
        problems.append(f"vocoder model_in_dim {g.model_in_dim}, expected {N_MELS} mel bins")
    if math.prod(g.upsample_rates) != HOP_LENGTH:
        problems.append(f"vocoder hop {math.prod(g.upsample_rates)}, expected {HOP_LENGTH}")
    if g.sampling_rate != SAMPLE_RATE:
        problems.append(f"vocoder sampling_rate {g.sampling_rate}, expected {SAMPLE_RATE}")
    if g.normalize_before:
        problems.append("vocoder normalize_before is true; AudioLDM2's vocoder takes raw log-mel")
    if problems:
        raise CheckpointError(f"{where}: not an AudioLDM2 VAE/vocoder: " + "; ".join(problems))


def _local_folder(folder: Path, allow_pickle: bool, source: dict[str, Any]) -> Checkpoint:
    for sub in (VAE_SUBFOLDER, VOCODER_SUBFOLDER):
        if not (folder / sub / "config.json").is_file():
            raise CheckpointError(
                f"{folder}: no {sub}/ folder with a config.json; expected the diffusers AudioLDM2 "
                f"layout ({VAE_SUBFOLDER}/ and {VOCODER_SUBFOLDER}/)"
            )
    use_safetensors = None if allow_pickle else True
    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder=VAE_SUBFOLDER, use_safetensors=use_safetensors)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(_load_message(folder / VAE_SUBFOLDER, e, allow_pickle)) from None
    try:
        vocoder = SpeechT5HifiGan.from_pretrained(folder / VOCODER_SUBFOLDER, use_safetensors=use_safetensors)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(_load_message(folder / VOCODER_SUBFOLDER, e, allow_pickle)) from None
    return _ready(Checkpoint(vae, vocoder, source))


def _load_message(where: Path, e: BaseException, allow_pickle: bool) -> str:
    text = " ".join(str(e).split())
    if not allow_pickle and "safetensors" in text.lower():
        return f"{where}: no safetensors weights; pass --allow-pickle to load .bin weights you trust ({text[:200]})"
    return f"{where}: cannot load ({text[:300]})"


def load_checkpoint(model: str = DEFAULT_MODEL, revision: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """Load only `vae/` and `vocoder/` from a local folder or a hub id (optionally at a revision)."""
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
        }
        return _local_folder(path, allow_pickle, source)
    if not _HUB_ID.match(model):
        raise CheckpointError(f"{model}: no such folder, and not a hub id of the form owner/name")
    folder, resolved = _download(model, revision, allow_pickle)
    source = {
        "model": model,
        "revision": resolved,
        "requested_revision": revision,
        "weights": "trained",
        "seed": None,
        "format": "hub",
    }
    return _local_folder(folder, allow_pickle, source)


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str]:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    patterns = [f"{s}/*.json" for s in (VAE_SUBFOLDER, VOCODER_SUBFOLDER)]
    patterns += [f"{s}/*.safetensors" for s in (VAE_SUBFOLDER, VOCODER_SUBFOLDER)]
    if allow_pickle:
        patterns += [f"{s}/*.bin" for s in (VAE_SUBFOLDER, VOCODER_SUBFOLDER)]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
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
    return folder, folder.name  # snapshots/<commit hash>


def config_dict(module: torch.nn.Module) -> dict[str, Any]:
    """A JSON-ready copy of a model's config."""
    cfg = module.config
    data = dict(cfg) if not hasattr(cfg, "to_dict") else cfg.to_dict()
    return {k: v for k, v in data.items() if not k.startswith("_") and _jsonable(v)}


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, tuple, dict))
