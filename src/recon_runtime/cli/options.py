"""The model options of every `recon-run` command that loads a model, defined once.

`model_options` adds the fields of `LoadOptions` (every setting of `Reconstructor.load` a user
chooses) as click options with its defaults and the runtime's choices; `model_args` takes them
back out of a command's keyword arguments as one `LoadOptions`. reconstruct, encode, decode,
vocode, serve and the dataset jobs all use these two; `model_option` is `--model` alone (`info`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from ..contract import SAMPLE_RATE
from ..devices import DEVICE_HELP, parse_device
from ..errors import ReconError
from ..executors.base import LATENCY, PERFORMANCE_HINTS, THROUGHPUT
from ..executors.select import BACKEND_CHOICES, PRECISION_CHOICES, PROVIDER_CHOICES
from ..files.audio import FLOAT32, MIN_SAMPLE_RATE, SAMPLE_FORMATS
from ..files.encoded import file_seed
from ..locations import LOCAL_MODEL, MODEL_ENV
from ..options import LoadOptions
from ..reconstructor import CPU_MAX_BATCH, MAX_BATCH


class CommandError(click.ClickException):
    """A command's one-line refusal, said as every other `recon-run` error is: `error: ...`, exit 1
    (click's own `Error: ...` stays for usage errors, which click explains with the usage line)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


MODEL_HELP = (
    f"Bundle folder written by recon-export. Default: ${MODEL_ENV} when set, else ./{LOCAL_MODEL} if it "
    "holds a bundle, else the per-user folder recon-export writes to (recon-run --version shows which)."
)


def model_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--model DIR` (None: the default bundle, `locations.resolve_model`)."""
    return click.option(
        "--model", "model", type=click.Path(path_type=Path), default=LoadOptions().model, help=MODEL_HELP
    )(f)


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        parse_device(value)
    except ReconError as e:
        raise click.BadParameter(str(e).removeprefix(f"--device {value!r}: ")) from None
    return value


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of `LoadOptions` (every setting of `Reconstructor.load` a user chooses), with its
    defaults and the runtime's choices: one definition for the file commands, dataset jobs and serve."""
    d = LoadOptions()
    for option in reversed(
        [
            model_option,
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
                "--device",
                default=d.device,
                metavar="N|cuda:N|cpu",
                callback=_check_device,
                help=f"Where the graphs run: {DEVICE_HELP}. A GPU makes --provider auto mean cuda "
                "(an error, not the CPU, when CUDA does not start); the openvino backend runs on the CPU only.",
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
                "--window-frames",
                type=click.IntRange(min=4),
                default=d.window_frames,
                show_default=True,
                metavar="N",
                help="Long inputs run in windows of N log-mel frames (100 a second; a multiple of 4; 1024, "
                "10.24 s, is what the VAE was trained on).",
            ),
            click.option(
                "--overlap-frames",
                type=click.IntRange(min=0),
                default=d.overlap_frames,
                show_default=True,
                metavar="N",
                help="Log-mel frames neighbouring windows share and cross-fade (a multiple of 4, less than the window).",
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
    """The model options among a command's keyword arguments, removed from them; a combination
    `LoadOptions` refuses (e.g. --overlap-frames past the window) is a usage error."""
    try:
        return LoadOptions(**{f.name: kwargs.pop(f.name) for f in fields(LoadOptions)})
    except (ReconError, ValueError) as e:
        message = str(e)
        for f in fields(LoadOptions):  # the fields' names as the flags the user typed
            if "_" in f.name:
                message = message.replace(f.name, "--" + f.name.replace("_", "-"))
        raise click.UsageError(message) from None


def api_key_from_env(var: str | None) -> str | None:
    """The key from the environment variable `var` (never from a flag, so it stays out of `ps`)."""
    if not var:
        return None
    from ..serving.config import api_key_from

    try:
        return api_key_from(var)
    except ValueError as e:
        raise CommandError(str(e)) from None


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
"""dataset reconstruct's --format: the sample format of the WAV files a job writes (the file commands'
--format also takes wav, flac and ogg, `files._audio_out_options`)."""


def sample_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """encode's --sample and --seed (files and dataset jobs): one definition, one seed rule
    (`files.encoded.file_seed`: each file draws with the seed and its absolute path)."""
    f = click.option(
        "--seed",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Seed for --sample: each file draws with a seed made of this and its absolute path.",
    )(f)
    return click.option("--sample", is_flag=True, help="Draw from the posterior instead of taking its mean.")(f)


def draw_seed(seed: int, path: Path | None) -> int:
    """The seed of one input's posterior draw: `file_seed(--seed, absolute path)`, the rule of
    `dataset encode`, so a file draws the same noise from every command (locally or with --server),
    files of one length do not share noise, and a rerun draws the same; standard input (None) takes
    --seed as it is."""
    return seed if path is None else file_seed(seed, os.path.abspath(path))


def refuse_seed_without_sample(ctx: click.Context, sample: bool) -> None:
    """--seed N without --sample would be recorded nowhere and change nothing: a usage error."""
    if not sample and ctx.get_parameter_source("seed") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--seed seeds the posterior draw of --sample; add --sample, or drop --seed")
