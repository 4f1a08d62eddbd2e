"""The older encoded-latents format: a .npy of scaled latents [8, T/4, 16] and its JSON sidecar.

`recon-run encode` wrote the pair (`save_latents`) before the encoded-audio file (`files.encoded`);
`decode` still reads it: `files.encoded.read_latents` takes the sidecar back with `read_sidecar`,
which refuses one of another bundle or of another .npy.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..errors import AudioInputError, BundleError
from .audio import atomic_path, write_array

SIDECAR_VERSION: Final = 2  # 2: bundle_fingerprint names the decoding weights (1 named the source and configs)
SIDECAR: Final = ".json"  # encode writes it beside each .npy
NPY_SHA256: Final = "npy_sha256"  # sidecar key: the SHA-256 of its .npy's bytes (older sidecars lack it)


def save_latents(
    dst: Path,
    latents: np.ndarray,
    src: Path,
    *,
    sample_rate: int,
    num_samples: int,
    input_sample_rate: int,
    gain: float,
    sample: bool,
    seed: int,
    fingerprint: str,
    scaling_factor: float,
) -> None:
    """Write latents (.npy) and their sidecar as a pair: both to temporary files, then both renamed.

    A failure while either is written (disk full, unwritable folder) leaves the old pair as it
    was, or nothing when there was none: never a new .npy beside an old sidecar, nor an old one
    removed. The two renames, in one folder, are the only window: a crash between them leaves a
    new sidecar beside the old .npy, which `read_sidecar` refuses (the sidecar holds the SHA-256
    of its .npy's bytes).
    """
    sidecar: dict[str, Any] = {
        "version": SIDECAR_VERSION,
        "source": str(src),
        "sample_rate": sample_rate,
        "num_samples": num_samples,
        "input_sample_rate": input_sample_rate,
        "gain": gain,
        "latent_shape": list(latents.shape),
        "sampled": sample,
        "seed": seed if sample else None,
        "bundle_fingerprint": fingerprint,
        "scaling_factor": scaling_factor,
    }
    with atomic_path(dst) as npy_tmp:
        write_array(npy_tmp, latents)
        sidecar[NPY_SHA256] = hashlib.sha256(npy_tmp.read_bytes()).hexdigest()
        # renamed when this inner block ends; if it fails, the outer block never renames the .npy
        with atomic_path(dst.with_suffix(SIDECAR)) as json_tmp:
            json_tmp.write_text(json.dumps(sidecar, indent=2) + "\n")


def read_sidecar(latents_path: Path, fingerprint: str) -> dict[str, Any]:
    """The sidecar of a .npy ({} when there is none, or when the .json beside it is no sidecar: a
    JSON object without a `version`), refused unless it is of this bundle and of this .npy.

    A sidecar belongs to its .npy when it records the .npy's SHA-256 (`npy_sha256`; sidecars
    written before it was recorded: at least its `latent_shape`): a sidecar beside another .npy
    (an encode --force interrupted between its two renames, a .npy replaced since) would restore
    another file's length and level.
    """
    path = latents_path.with_suffix(SIDECAR)
    if not path.is_file():
        return {}
    try:
        side = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AudioInputError(f"{path}: sidecar is not valid JSON ({e})") from None
    if not isinstance(side, dict) or "version" not in side:
        return {}  # a JSON of someone else's (a pipeline's prompt, say): every sidecar ever written has a version
    if isinstance(side, dict) and side.get("version") == 1:
        raise AudioInputError(
            f"{path}: sidecar version 1 (an older recon-run, whose fingerprint did not name the weights); "
            "encode the audio again, or delete the sidecar to decode without its length and level"
        )
    if not isinstance(side, dict) or side.get("version") != SIDECAR_VERSION:
        raise AudioInputError(f"{path}: unknown sidecar format (expected version {SIDECAR_VERSION})")
    if side.get("bundle_fingerprint") not in (None, fingerprint):
        raise BundleError(
            f"{latents_path}: latents come from another model (bundle {side['bundle_fingerprint']}, "
            f"this bundle {fingerprint}); decode them with the bundle that encoded them"
        )
    mismatch = _not_of(latents_path, side)
    if mismatch:
        raise AudioInputError(
            f"{path}: sidecar does not belong to this .npy; encode again ({mismatch}; or delete the sidecar to "
            "decode without its length and level)"
        )
    return side


def _not_of(latents_path: Path, side: dict[str, Any]) -> str | None:
    """Why `side` is not the sidecar of the .npy at `latents_path`, or None (an unreadable .npy: its own error)."""
    try:
        data = latents_path.read_bytes()
    except OSError:
        return None
    if NPY_SHA256 in side:
        if hashlib.sha256(data).hexdigest() != side[NPY_SHA256]:
            return f"its {NPY_SHA256} is not that of {latents_path}"
        return None
    try:  # an older sidecar: at least the shape (latents are small: [8, T/4, 16] float32, 128 KB per 10 s)
        shape = list(np.load(io.BytesIO(data), allow_pickle=False).shape)
    except (ValueError, OSError, EOFError):
        return None
    if "latent_shape" in side and side["latent_shape"] != shape:
        return f"it records latent_shape {side['latent_shape']}, {latents_path} holds {shape}"
    return None
