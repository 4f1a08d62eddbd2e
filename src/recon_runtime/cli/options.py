"""The model options of every `recon-run` command that loads a model, defined once.

`model_options` adds the fields of `LoadOptions` (every setting of `Reconstructor.load` a user
chooses) as click options with its defaults and the runtime's choices; `model_args` takes them
back out of a command's keyword arguments as one `LoadOptions`. reconstruct, encode, decode,
vocode, serve and the dataset jobs all use these two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from ..contract import SAMPLE_RATE
from ..executors.base import LATENCY, PERFORMANCE_HINTS, THROUGHPUT
from ..executors.select import BACKEND_CHOICES, PRECISION_CHOICES, PROVIDER_CHOICES
from ..files.audio import FLOAT32, MIN_SAMPLE_RATE, SAMPLE_FORMATS
from ..options import LoadOptions
from ..reconstructor import CPU_MAX_BATCH, MAX_BATCH


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


def api_key_from_env(var: str | None) -> str | None:
    """The key from the environment variable `var` (never from a flag, so it stays out of `ps`)."""
    if not var:
        return None
    from ..serving.config import api_key_from

    try:
        return api_key_from(var)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


OUTPUT_RATE_OPTION = click.option(
    "--output-rate",
    type=click.IntRange(min=MIN_SAMPLE_RATE),
    default=None,
    help=f"Resample the output (default {SAMPLE_RATE}).",
)
"""reconstruct's --output-rate (files and dataset jobs)."""
FORMAT_OPTION = click.option(
    "--format", "sample_format", type=click.Choice(SAMPLE_FORMATS), default=FLOAT32, show_default=True
)
"""The written audio's --format (reconstruct, decode, vocode, dataset reconstruct)."""
