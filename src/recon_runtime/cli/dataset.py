"""`recon-run dataset encode|reconstruct|evaluate`: whole datasets on Ray Data (see `recon_runtime.jobs`).

ray and pyarrow are imported only when a command runs, so `recon-run` and `import recon_runtime`
stay lean without the `ray` extra.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from ..files.audio import FLOAT32
from ..jobs.config import DEFAULT_MAX_SECONDS, ENCODE, EVALUATE, RECONSTRUCT, JobConfig
from ..jobs.job import INTERRUPTED_EXIT, JobInterrupted
from .batch import fail, guard
from .options import (
    FORMAT_OPTION,
    OUTPUT_RATE_OPTION,
    model_args,
    model_options,
    refuse_seed_without_sample,
    sample_options,
)


@click.group()
def dataset() -> None:
    """Encode, reconstruct or evaluate a whole dataset on Ray (local, or a cluster with --ray-address)."""


def _job_options(f: Any) -> Any:
    options = [
        click.argument("inputs", nargs=-1, required=True),
        click.option(
            "-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Output folder of the job."
        ),
        click.option(
            "--ray-address",
            default=None,
            metavar="ADDR",
            help="Run on this Ray cluster (e.g. 10.0.0.1:6379 or auto); default: a local Ray in this process.",
        ),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Graph workers."),
        click.option(
            "--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True, help="GPUs per worker."
        ),
        click.option(
            "--cpus-per-worker",
            type=click.FloatRange(min=0),
            default=1.0,
            show_default=True,
            help="Ray CPUs per worker (also its intra-op threads unless --threads is given).",
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Files per batch."),
        click.option(
            "--resume/--no-resume",
            default=True,
            show_default=True,
            help="Skip files already done (same path, size, mtime); --no-resume first deletes what the job wrote "
            "(nothing else).",
        ),
        click.option("--retry-errors", is_flag=True, help="Run files that failed in an earlier run again."),
        click.option(
            "--max-seconds",
            type=click.FloatRange(min=0, min_open=True),
            default=DEFAULT_MAX_SECONDS,
            show_default=True,
            help="Longer files fail (an error row) instead of running.",
        ),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        f = option(f)
    return model_options(f)


def _run(ctx: click.Context, mode: str, inputs: tuple[str, ...], out: Path, kwargs: dict[str, Any]) -> None:
    margs = model_args(kwargs)

    def run() -> int:
        from ..jobs.job import interrupted_message, run_job

        cfg = JobConfig(
            mode=mode,
            inputs=inputs,
            out=out.absolute(),
            model=margs.resolved(),  # here: workers may run in another folder, or on another node
            ray_address=kwargs["ray_address"],
            workers=kwargs["workers"],
            gpus_per_worker=kwargs["gpus_per_worker"],
            cpus_per_worker=kwargs["cpus_per_worker"],
            batch_size=kwargs["batch_size"],
            resume=kwargs["resume"],
            retry_errors=kwargs["retry_errors"],
            max_seconds=kwargs["max_seconds"],
            output_rate=kwargs.get("output_rate"),
            sample_format=kwargs.get("sample_format", FLOAT32),
            sample=kwargs.get("sample", False),
            seed=kwargs.get("seed", 0),
            progress=not kwargs["no_progress"],
        )
        try:
            result = run_job(cfg, echo=lambda s: click.echo(s, err=True))
        except JobInterrupted as e:
            fail(str(e))
            if not e.ray_stopped:  # exit now: Ray's own exit hook would wait on the shutdown that hung
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(INTERRUPTED_EXIT)
            return INTERRUPTED_EXIT
        except KeyboardInterrupt:  # before run_job could say more (importing Ray takes seconds)
            fail(interrupted_message(mode, out))
            return INTERRUPTED_EXIT
        if not result.ok and not result.skipped and not result.failed:
            fail("no input files found")
            return 1
        # non-zero while any file of this job has an error row, from this run or an earlier one
        return 1 if result.failed or result.errors_outstanding else 0

    guard(ctx, run)


@dataset.command("encode")
@_job_options
@sample_options
@click.pass_context
def encode(ctx: click.Context, inputs: tuple[str, ...], out: Path, **kwargs: Any) -> None:
    """Audio -> latents: Parquet shards in OUT/latents (one row per file, its columns the encoded-audio
    fields), failures in OUT/errors."""
    refuse_seed_without_sample(ctx, kwargs["sample"])
    _run(ctx, ENCODE, inputs, out, kwargs)


@dataset.command("reconstruct")
@_job_options
@OUTPUT_RATE_OPTION
@FORMAT_OPTION
@click.pass_context
def reconstruct(ctx: click.Context, inputs: tuple[str, ...], out: Path, **kwargs: Any) -> None:
    """Audio -> VAE -> HiFi-GAN -> audio under OUT/audio (the input tree mirrored), as `recon-run reconstruct`."""
    _run(ctx, RECONSTRUCT, inputs, out, kwargs)


@dataset.command("evaluate")
@_job_options
@click.pass_context
def evaluate(ctx: click.Context, inputs: tuple[str, ...], out: Path, **kwargs: Any) -> None:
    """Per-file reconstruction metrics in OUT/metrics (Parquet) and their summary (mean, median, p95)."""
    _run(ctx, EVALUATE, inputs, out, kwargs)
