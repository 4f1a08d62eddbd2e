"""What every `recon-run` command shares: the model options (`LoadOptions`), one-line errors, the encode sidecar.

`cli`, `cli_serve` and `cli_dataset` import this module and never each other's internals, so
importing any of them first works (no import circle).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, Final

import click
import numpy as np

from .audio_io import atomic_path, write_array
from .choices import BACKEND_CHOICES, PRECISION_CHOICES, PROVIDER_CHOICES
from .errors import AudioInputError, BundleError, ReconError
from .executors.base import LATENCY, PERFORMANCE_HINTS, THROUGHPUT
from .options import LoadOptions
from .reconstructor import CPU_MAX_BATCH, MAX_BATCH

SIDECAR_VERSION: Final = 2  # 2: bundle_fingerprint names the decoding weights (1 named the source and configs)
SIDECAR: Final = ".json"  # encode writes it beside each .npy
NPY_SHA256: Final = "npy_sha256"  # sidecar key: the SHA-256 of its .npy's bytes (older sidecars lack it)
_LOGGER = logging.getLogger("recon_runtime")


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of `LoadOptions` (every setting of `Reconstructor.load` a user chooses), with its
    defaults and the runtime's choices: one definition for the file commands, dataset jobs and serve."""
    d = LoadOptions()
    for option in reversed(
        [
            click.option(
                "--model",
                "model",
                type=click.Path(path_type=Path),
                default=d.model,
                show_default=True,
                help="Bundle folder written by recon-export.",
            ),
            click.option(
                "--backend",
                type=click.Choice(BACKEND_CHOICES),
                default=d.backend,
                show_default=True,
                help="Inference engine. auto: openvino for bf16 (only it runs bf16), else onnxruntime (on the CPU at "
                "fp32 the leaner of the two for about the same speed; openvino where only it is installed).",
            ),
            click.option(
                "--provider",
                type=click.Choice(PROVIDER_CHOICES),
                default=d.provider,
                show_default=True,
                help="auto: CUDA when it starts, else CPU (with a warning); cuda: fail if CUDA does not start.",
            ),
            click.option(
                "--precision",
                type=click.Choice(PRECISION_CHOICES),
                default=d.precision,
                show_default=True,
                help="auto: fp16 on CUDA when the bundle's fp16 check passed, else fp32. "
                "bf16: openvino on a CPU with AVX512-BF16 or AMX (refused elsewhere).",
            ),
            click.option(
                "--threads",
                type=click.IntRange(min=1),
                default=d.threads,
                help="Intra-op CPU threads per stage (default: the engine's, every core).",
            ),
            click.option(
                "--max-batch",
                type=click.IntRange(min=1),
                default=d.max_batch,
                metavar="N",
                help=f"Windows of equal shape per graph run (default: {MAX_BATCH} on CUDA, {CPU_MAX_BATCH} on the CPU, "
                "where a batch is no faster and multiplies the memory).",
            ),
            click.option(
                "--performance-hint",
                type=click.Choice(PERFORMANCE_HINTS),
                default=d.performance_hint,
                help=f"openvino: {LATENCY} (the default: each run uses every core) or {THROUGHPUT} (streams, for "
                f"concurrent runs). --backend onnxruntime refuses {THROUGHPUT}.",
            ),
            click.option(
                "--compile-cache/--no-compile-cache",
                default=d.compile_cache,
                show_default=True,
                help="openvino: keep compiled graphs in the user's cache folder (per bundle digest) so that "
                "the next start skips compilation.",
            ),
            click.option(
                "--cuda-graph",
                is_flag=True,
                default=d.cuda_graph,
                help="CUDA: capture CUDA graphs for repeated input shapes (more GPU memory; not yet measured).",
            ),
            click.option(
                "--expect-digest",
                default=d.expect_digest,
                metavar="DIGEST",
                help="Refuse the bundle unless its digest (recon-run info) is DIGEST: pins a bundle you trust "
                "(with --server: the digest the server reports).",
            ),
        ]
    ):
        f = option(f)
    return f


def model_args(kwargs: dict[str, Any]) -> LoadOptions:
    """The model options among a command's keyword arguments, removed from them."""
    return LoadOptions(**{f.name: kwargs.pop(f.name) for f in fields(LoadOptions)})


def guard(ctx: click.Context, fn: Callable[[], int]) -> None:
    """Turn any error into one line and a non-zero exit (a traceback only with --debug)."""
    try:
        code = fn()
    except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - the user gets one line, the developer --debug
        if ctx.obj.get("debug"):
            raise
        if isinstance(e, ReconError):
            fail(str(e))
        elif isinstance(e, MemoryError):
            fail("out of memory")
        else:
            fail(f"{type(e).__name__}: {' '.join(str(e).split())} (run with --debug for the traceback)")
        code = 1
    ctx.exit(code)


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
    """The sidecar of a .npy ({} when there is none), refused unless it is of this bundle and of this .npy.

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


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
