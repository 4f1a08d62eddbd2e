"""`recon-run reconstruct|encode|decode|vocode|info`: the file commands, local or with --server URL.

Each command is the same shape (plan the outputs, load the stages it needs, run one function per
file through `batch.JobRunner`) and they share their option sets. Where outputs go follows
`files.outputs`: one input and `-o out.flac` writes that file in that
format, several inputs or a folder write into a folder (`--format`), `-` reads stdin or writes
stdout. Everything that can be refused is refused before the model loads (`JobRunner.prepare`),
and Ctrl-C stops a command at once, keeping only complete files (`guard_files`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from ..channels import CHANNEL_MODES, DEFAULT_CHANNEL_MODE, MIX, encode_audio, is_mixed, per_channel, stack_channels
from ..contract import (
    BF16_KEY,
    DECODER,
    ENCODER,
    FP16,
    FP16_ARITHMETIC_KEY,
    ROLES,
    SOURCE_SCALING_FACTOR,
    VOCODER,
    Contract,
)
from ..errors import AudioInputError, OutputError
from ..files.audio import (
    check_writable,
    is_audio_file,
    load_array,
    read_array_bytes,
    read_audio,
    read_audio_data,
    write_json,
)
from ..files.encoded import (
    ENCODED_SUFFIX,
    LEGACY_SUFFIX,
    EncodedAudio,
    clip_count,
    read_latents,
    read_latents_data,
)
from ..files.outputs import (
    FILE,
    FORMAT_CHOICES,
    SAMPLE_FORMATS,
    STDIO,
    Target,
    audio_bytes,
    audio_target,
    check_sample_format,
    encoded_target,
    output_path,
    raw_bytes,
    read_stdin,
    resolve_format,
    write_audio_file,
    write_stdout,
)
from ..files.plot import MAX_ROWS, require_matplotlib
from ..locations import resolve_model
from ..serving.protocol import DEFAULT_CONCURRENCY
from .batch import STDIN, Job, JobRunner, batches, check_exclusive, guard, guard_files, path_key, plan_jobs, progress
from .options import (
    OUTPUT_RATE_OPTION,
    draw_seed,
    model_args,
    model_option,
    model_options,
    refuse_seed_without_sample,
    sample_options,
)


def _io_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "-o",
                "--out",
                "out",
                required=True,
                metavar="PATH",
                help="Where outputs go: a file for one input (its extension picks the format), a folder (several "
                "inputs or a folder, the tree mirrored; end a new one's name with / when it has a dot), or - for stdout.",
            ),
            click.option("--force", is_flag=True, help="Overwrite existing outputs."),
            click.option(
                "--skip-existing",
                is_flag=True,
                help="Skip inputs whose output exists (resume an interrupted folder run).",
            ),
        ]
    ):
        f = option(f)
    return f


def _audio_out_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The format of audio outputs (reconstruct, decode, vocode)."""
    for option in reversed(
        [
            click.option(
                "--format",
                "fmt",
                type=click.Choice(FORMAT_CHOICES),
                default=None,
                help="Audio files written into a folder or to stdout: wav (the default), flac or ogg (Vorbis, lossy); "
                "a file named by -o takes its extension's. float32 and pcm16 are sample formats, as --sample-format.",
            ),
            click.option(
                "--sample-format",
                type=click.Choice(SAMPLE_FORMATS),
                default=None,
                help="float32 (the default; FLAC then holds 24-bit integers) or pcm16 (clipped to [-1, 1]).",
            ),
            click.option(
                "--output-raw",
                is_flag=True,
                help="With -o -: raw little-endian float32 samples (channels interleaved) instead of a WAV.",
            ),
        ]
    ):
        f = option(f)
    return f


def _channels_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--channels",
        type=click.Choice(CHANNEL_MODES),
        default=DEFAULT_CHANNEL_MODE,
        show_default=True,
        help="mix: multi-channel inputs to mono, as AudioLDM2's front end does (the summary counts them); "
        "each: every channel on its own, the output keeps the channel count.",
    )(f)


def _inputs_argument(name: str) -> Callable[..., Any]:
    return click.argument(name, nargs=-1, required=True, type=click.Path(allow_dash=True))


def _server_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--server",
                metavar="URL",
                default=None,
                help="Run the job on a recon-run serve server instead of local sessions (model options then unused, "
                "but --expect-digest is compared with the server's /v1/info before any file runs).",
            ),
            click.option(
                "--api-key-env",
                metavar="VAR",
                default=None,
                help="With --server: send the API key held in the environment variable VAR.",
            ),
            click.option(
                "--concurrency",
                type=click.IntRange(min=1),
                default=DEFAULT_CONCURRENCY,
                show_default=True,
                metavar="N",
                help="With --server: files in flight at once, so the server can batch them. A busy server's "
                "503 is tried again after its Retry-After, within bounds (docs/files.md); only a file past "
                "them fails.",
            ),
        ]
    ):
        f = option(f)
    return f


def _refuse_stdio_with_server(server: str | None, inputs: Sequence[str], out: str, channels: str = MIX) -> None:
    if server and (STDIO in inputs or out == STDIO):
        raise click.UsageError("--server sends files; - (stdin or stdout) runs locally only")
    if server and channels != MIX:
        raise click.UsageError("--channels each runs locally only (the server mixes every input to mono)")


def _audio_target(inputs: Sequence[str], out: str, fmt: str | None, sample_format: str | None, raw: bool):
    """The audio target and sample format of --format, --sample-format and --output-raw.

    `--format float32|pcm16` is a sample format (its meaning before containers): the container is then
    the one -o names, or WAV.
    """
    container, sample = resolve_format(fmt, sample_format)
    if fmt in SAMPLE_FORMATS:
        container = None
    target = audio_target(inputs, out, container, raw)
    check_sample_format(target, sample, given=sample_format is not None or fmt in SAMPLE_FORMATS)
    return target, sample


def _emit_audio(target: Target, path: Path | None, wave: np.ndarray, rate: int, sample_format: str) -> None:
    """Write audio to its file (the format its extension names) or to stdout (the target's format, or raw)."""
    if path is not None:
        write_audio_file(path, wave, rate, sample_format=sample_format)
    elif target.raw:
        write_stdout(raw_bytes(wave))
    else:
        write_stdout(audio_bytes(wave, rate, target.suffix.lstrip("."), sample_format))


def _read_input(job: Job) -> tuple[np.ndarray, int]:
    """A job's audio, channels kept: [samples] or [samples, channels], and its rate."""
    return read_audio_data(read_stdin(), STDIO) if job.stdin else read_audio(job.src)


def _check_report_file(path: Path | None, option: str, force: bool, skip_existing: bool, keep: str) -> bool:
    """--metrics/--plot FILE, checked before the model loads: True when it exists and --skip-existing keeps it.

    An existing file is replaced only with --force; without either flag the command refuses it. A
    file that could not be written (its folder unwritable) is refused now, not after the run.
    """
    if path is None:
        return False
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; {option} names a file")
    if path.exists() and not force:
        if skip_existing:
            return True
        raise OutputError(f"{path}: exists; pass --force to overwrite it or --skip-existing to {keep}")
    try:
        check_writable(path)
    except OutputError as e:
        raise OutputError(f"{option} {e}") from None
    return False


def _refuse_report_clash(jobs: list[Job], reports: dict[str, Path | None]) -> None:
    """--metrics/--plot FILE is neither an input, nor an output, nor the other one's file.

    Checked before the model loads and whatever --force says: --force replaces earlier outputs,
    never this run's own inputs or outputs.
    """
    named = {option: path for option, path in reports.items() if path is not None}
    sources = {path_key(j.src) for j in jobs if not j.stdin and j.src.is_file()}
    outputs = {path_key(p): j for j in jobs if j.src.is_file() or j.error is None for p in j.outputs}
    seen: dict[str, str] = {}
    for option, path in named.items():
        key = path_key(path)
        if key in sources:
            raise OutputError(f"{path}: {option} names an input of this run; choose another {option} file")
        if key in outputs:
            raise OutputError(f"{path}: {option} names the output of {outputs[key].src}; choose another {option} file")
        if key in seen:
            raise OutputError(f"{path}: {seen[key]} and {option} name the same file; choose two files")
        seen[key] = option


def _refuse_bundle_clash(bundle: Path, reports: dict[str, Path | None]) -> None:
    """--metrics/--plot FILE is not inside the bundle's folder, whatever --force says: replacing its
    recon.json or a graph would break the bundle this run loads (and every later one)."""
    folder = Path(bundle).resolve()
    for option, path in reports.items():
        if path is not None and Path(path).resolve().is_relative_to(folder):
            raise OutputError(f"{path}: {option} names a file inside the bundle {bundle}; choose a file outside it")


def _metrics_key(path: Path | None) -> str:
    """An input's (or output's) name in the metrics file: its resolved path, one spelling whatever the
    command line said; `-` for stdin or stdout."""
    return STDIO if path is None or path == STDIN else str(path.resolve())


def _earlier_metrics(path: Path, bundle: Path) -> dict[str, Any]:
    """The files of a metrics JSON that --skip-existing adds to; refused if it is not one of this bundle."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: cannot be read as a metrics file ({e}); pass --force to replace it") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise OutputError(f"{path}: not a metrics file of recon-run reconstruct; pass --force to replace it")
    if not all(os.path.isabs(str(p)) or p == STDIO for p in [data.get("bundle"), *data["files"]]):
        raise OutputError(
            f"{path}: names its bundle or files by relative paths (an older recon-run), relative to a folder "
            "not recorded; pass --force to replace it or name another --metrics file"
        )
    if Path(str(data.get("bundle"))).resolve() != bundle.resolve():
        raise OutputError(
            f"{path}: holds metrics of bundle {data.get('bundle')}, this run uses {bundle}; "
            "pass --force to replace it or name another --metrics file"
        )
    return data


def _scores(feats: Sequence[Any], waves: Sequence[np.ndarray]) -> dict[str, Any]:
    """Metrics of one file: of its one channel, or (--channels each) the mean over its channels and each one's."""
    from ..files.metrics import compare, mean_over_channels

    each = [compare(f.waveform, w) for f, w in zip(feats, waves)]
    if len(each) == 1:
        return each[0]
    return {**mean_over_channels(each), "channels": each}


@click.command()
@_inputs_argument("inputs")
@_io_options
@model_options
@_channels_option
@OUTPUT_RATE_OPTION
@_audio_out_options
@click.option(
    "--metrics", "metrics_path", type=click.Path(path_type=Path), default=None, help="Write metrics JSON here."
)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a log-mel PNG here.")
@_server_options
@click.pass_context
def reconstruct(
    ctx: click.Context,
    inputs: tuple[str, ...],
    out: str,
    force: bool,
    skip_existing: bool,
    channels: str,
    output_rate: int | None,
    fmt: str | None,
    sample_format: str | None,
    output_raw: bool,
    metrics_path: Path | None,
    plot_path: Path | None,
    server: str | None,
    api_key_env: str | None,
    concurrency: int,
    **model_kwargs: Any,
) -> None:
    """Audio -> VAE -> HiFi-GAN -> audio, for files, folders (the tree is mirrored) or - (stdin)."""
    margs = model_args(model_kwargs)
    check_exclusive(force, skip_existing)
    _refuse_stdio_with_server(server, inputs, out, channels)

    def run() -> int:
        if server and (metrics_path or plot_path):
            raise click.UsageError("--metrics and --plot need the model loaded locally; drop --server for them")
        target, sample = _audio_target(inputs, out, fmt, sample_format, output_raw)
        jobs = plan_jobs(inputs, target, is_audio_file)
        _refuse_report_clash(jobs, {"--metrics": metrics_path, "--plot": plot_path})
        merge = _check_report_file(metrics_path, "--metrics", force, skip_existing, "add this run's files to it")
        keep_plot = _check_report_file(plot_path, "--plot", force, skip_existing, "keep it")
        if plot_path and not keep_plot:
            require_matplotlib(plot_path)
        runner = JobRunner("reconstruct", force, skip_existing, ctx.obj["debug"])
        if server:
            from .remote import remote_client, remote_reconstruct

            with remote_client(server, api_key_env, margs.expect_digest, concurrency) as remote:
                work = remote_reconstruct(remote.client, output_rate, sample)
                return remote.run(runner, runner.prepare(jobs), work)
        options = margs.resolved()
        _refuse_bundle_clash(options.model, {"--metrics": metrics_path, "--plot": plot_path})
        earlier = _earlier_metrics(metrics_path, options.model) if merge and metrics_path else None
        ready = runner.prepare(jobs)
        if ready:
            if earlier is not None:  # --skip-existing: earlier entries stay, but not of files this run tried
                tried = {_metrics_key(j.src) for j in jobs if j.src not in runner.skipped}
                earlier["files"] = {k: v for k, v in earlier["files"].items() if k not in tried}
            _reconstruct(
                runner,
                ready,
                options,
                target,
                channels,
                output_rate,
                sample,
                metrics_path,
                earlier,
                plot_path,
                keep_plot,
            )
        elif earlier is not None:
            _note_unrecorded(metrics_path, runner, earlier["files"])
        return runner.close()

    guard_files(ctx, run, "reconstruct")


def _reconstruct(
    runner: JobRunner,
    jobs: list[Job],
    options: Any,
    target: Target,
    channels: str,
    output_rate: int | None,
    sample_format: str,
    metrics_path: Path | None,
    earlier: dict[str, Any] | None,
    plot_path: Path | None,
    keep_plot: bool,
) -> None:
    """The local reconstruct loop: files read and prepared a batch at a time, their equal-shape windows
    run together, each written as soon as its audio is back; then the metrics and the plot."""
    rec = options.load(ROLES)
    if earlier is not None:
        other = [
            f"{k} {earlier.get(k)!r} there, {v!r} now"
            for k, v in (("precision", rec.precision), ("provider", rec.provider))
            if earlier.get(k) != v
        ]
        if other:
            raise OutputError(
                f"{metrics_path}: holds metrics made with other settings ({'; '.join(other)}); "
                "pass --force to replace it or name another --metrics file"
            )
    rate16 = rec.contract.mel.sample_rate
    rate = output_rate or rate16
    metrics: dict[str, Any] = {}
    plots: list[Any] = []  # only the rows drawn (plot.MAX_ROWS): two mels each
    if keep_plot:
        click.echo(f"{plot_path}: exists, kept (--skip-existing); pass --force to draw it again", err=True)
    bar = progress(jobs, "reconstruct")
    for group in batches(jobs, rec.max_batch):
        ready = []  # files read and prepared (one Features per channel run); their windows run as one batch
        for job in group:
            try:
                audio, sr = _read_input(job)
                ready.append((job, audio, per_channel(audio, channels, lambda x, sr=sr: rec.features(x, sr))))
            except Exception as e:  # noqa: BLE001 - every per-file failure becomes one line
                runner.fail(job, e)
        try:
            waves: list[Any] = rec.reconstruct_features([f for _, _, feats in ready for f in feats])
        except Exception:  # noqa: BLE001 - one bad batch member must not sink the others: retry one by one
            waves = [None] * sum(len(feats) for _, _, feats in ready)
        start = 0
        for job, audio, feats in ready:
            mine, start = waves[start : start + len(feats)], start + len(feats)

            def work(job: Job = job, audio: Any = audio, feats: Any = feats, mine: Any = mine) -> float:
                outs = [w if w is not None else rec.reconstruct_features([f])[0] for f, w in zip(feats, mine)]
                scores = None
                if metrics_path:  # before the write: a file on disk is a file counted as done
                    scores = {"output": _metrics_key(job.dst), **_scores(feats, outs)}
                wave = stack_channels([rec.finish(f, w, rate) for f, w in zip(feats, outs)])
                _emit_audio(target, job.dst, wave, rate, sample_format)
                if scores is not None:
                    metrics[_metrics_key(job.src)] = scores
                if plot_path and not keep_plot:
                    from ..frontend import log_mel

                    for c, (f, w) in enumerate(zip(feats, outs)):
                        if len(plots) < MAX_ROWS:
                            title = str(job.src) + (f" (channel {c + 1})" if len(feats) > 1 else "")
                            plots.append((title, f.log_mel, log_mel(w, rec.contract.mel)))
                runner.summary.mixed += is_mixed(audio, channels)
                return feats[0].num_samples / rate16

            runner.attempt(job, work)
        bar.update(len(group))
    bar.close()
    if metrics_path:
        if earlier is not None:  # the entries of the files this run did not try (see reconstruct)
            metrics = {**earlier["files"], **metrics}
        _note_unrecorded(metrics_path, runner, metrics)
        write_json(
            metrics_path,
            {
                "bundle": str(Path(options.model).resolve()),
                "backend": rec.backend,
                "precision": rec.precision,
                "provider": rec.provider,
                "files": metrics,
            },
        )
    if plot_path and plots:
        from ..files.plot import plot_mels

        plot_mels(plots, plot_path)


def _note_unrecorded(metrics_path: Path, runner: JobRunner, metrics: dict[str, Any]) -> None:
    """One line for the files --skip-existing skipped that have no entry in the metrics file."""
    missing = sum(1 for src in runner.skipped if _metrics_key(src) not in metrics)
    if missing:
        click.echo(
            f"{metrics_path}: {missing} skipped file(s) have no entry (their outputs existed, with no "
            "metrics recorded for them); delete those outputs or pass --force to compute them",
            err=True,
        )


@click.command()
@_inputs_argument("inputs")
@_io_options
@model_options
@_channels_option
@sample_options
@_server_options
@click.pass_context
def encode(
    ctx: click.Context,
    inputs: tuple[str, ...],
    out: str,
    force: bool,
    skip_existing: bool,
    channels: str,
    sample: bool,
    seed: int,
    server: str | None,
    api_key_env: str | None,
    concurrency: int,
    **model_kwargs: Any,
) -> None:
    """Audio -> one .safetensors file per clip: scaled latents [channels, 8, T/4, 16], length, level (docs/files.md)."""
    refuse_seed_without_sample(ctx, sample)
    margs = model_args(model_kwargs)
    check_exclusive(force, skip_existing)
    _refuse_stdio_with_server(server, inputs, out, channels)

    def run() -> int:
        jobs = plan_jobs(inputs, encoded_target(inputs, out), is_audio_file)
        runner = JobRunner("encode", force, skip_existing, ctx.obj["debug"])
        if server:
            from .remote import remote_client, remote_encode

            with remote_client(server, api_key_env, margs.expect_digest, concurrency) as remote:
                work = remote_encode(remote.client, sample, seed)
                return remote.run(runner, runner.prepare(jobs), work)
        options = margs.resolved()
        ready = runner.prepare(jobs)
        if not ready:
            return runner.close()
        rec = options.load((ENCODER,))

        def one(job: Job) -> float:
            audio, sr = _read_input(job)
            draw = draw_seed(seed, None if job.stdin else job.src) if sample else None
            clip = encode_audio(rec, audio, sr, channels, sample, draw, source=None if job.stdin else str(job.src))
            if job.dst is None:
                write_stdout(clip.to_bytes())
            else:
                clip.save(job.dst)
            runner.summary.mixed += is_mixed(audio, channels)
            return clip.seconds

        return runner.run(ready, one)

    guard_files(ctx, run, "encode")


def _is_latents(path: Path) -> bool:
    return path.suffix.lower() in (ENCODED_SUFFIX, LEGACY_SUFFIX)


@click.command()
@_inputs_argument("latents")
@_io_options
@model_options
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Bare latents (a pipeline's .npy): decode to this length (int(S * 16000) samples, as the pipelines trim).",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Bare latents: decode to N samples. Without either, the whole latent length (640 samples a frame).",
)
@_audio_out_options
@_server_options
@click.pass_context
def decode(
    ctx: click.Context,
    latents: tuple[str, ...],
    out: str,
    force: bool,
    skip_existing: bool,
    seconds: float | None,
    num_samples: int | None,
    fmt: str | None,
    sample_format: str | None,
    output_raw: bool,
    server: str | None,
    api_key_env: str | None,
    concurrency: int,
    **model_kwargs: Any,
) -> None:
    """Latents -> audio: encode's .safetensors (length, level and channels restored), older .npy + sidecar
    pairs, or a pipeline's bare .npy ([8, T, 16], or [B, 8, T, 16]: B files, -0, -1, ...)."""
    margs = model_args(model_kwargs)
    check_exclusive(force, skip_existing)
    _refuse_stdio_with_server(server, latents, out)
    if seconds is not None and num_samples is not None:
        raise click.UsageError("give the length once: --seconds or --num-samples, not both")

    def run() -> int:
        target, sample = _audio_target(latents, out, fmt, sample_format, output_raw)
        jobs = plan_jobs(latents, target, _is_latents, count=clip_count)
        runner = JobRunner("decode", force, skip_existing, ctx.obj["debug"])
        if server:
            from .remote import remote_client, remote_decode

            with remote_client(server, api_key_env, margs.expect_digest, concurrency) as remote:
                work = remote_decode(remote.client, sample, seconds, num_samples)
                return remote.run(runner, runner.prepare(jobs), work)
        options = margs.resolved()
        ready = runner.prepare(jobs)
        if not ready:
            return runner.close()
        rec = options.load((DECODER, VOCODER))
        fingerprint, rate = rec.contract.fingerprint, rec.contract.mel.sample_rate

        def one(job: Job) -> float:
            length = {"seconds": seconds, "num_samples": num_samples, "sample_rate": rate}
            if job.stdin:
                clips = read_latents_data(read_stdin(), fingerprint, STDIO, **length)
            else:
                clips = read_latents(job.src, fingerprint, **length)
            paths = _clip_outputs(runner, job, len(clips))
            # a batch is all or nothing: every clip decoded before the first is written, and a
            # write that fails removes this batch's files written before it (this run's own)
            waves = [_decoded(rec, clip, job) for clip in clips]
            done: list[Path] = []
            try:
                for wave, path in zip(waves, paths):
                    _emit_audio(target, path, wave, rate, sample)
                    done += [path] if path is not None else []
            except BaseException:
                for path in done:
                    path.unlink(missing_ok=True)
                raise
            runner.booked(done)
            return sum(clip.seconds for clip in clips)

        return runner.run(ready, one)

    guard_files(ctx, run, "decode")


def _clip_outputs(runner: JobRunner, job: Job, count: int) -> list[Path | None]:
    """One output per clip: the planned ones, or (stdin, or a file that changed since planning) named
    now by the same rule and checked like the planned ones."""
    if len(job.outputs) == count or (not job.outputs and count == 1):
        return list(job.outputs) or [None]
    if not job.outputs:
        raise OutputError(f"{job.src}: holds {count} clips; -o - writes one, so name a file or folder")
    if len(job.outputs) != 1:
        raise AudioInputError(f"{job.src}: holds {count} clips now, {len(job.outputs)} when the run began")
    planned = Target(FILE, job.outputs[0], job.outputs[0].suffix)  # x.wav -> x-0.wav, x-1.wav, ...
    paths = [p for i in range(count) if (p := output_path(planned, Path(), i, count)) is not None]
    for path in paths:
        runner.check(path)
        check_writable(path)
    return list(paths)


def _decoded(rec: Any, clip: EncodedAudio, job: Job) -> np.ndarray:
    from ..channels import decode_audio

    try:
        return decode_audio(rec, clip)
    except AudioInputError as e:
        raise AudioInputError(f"{job.src}: {e}") from None


def _is_npy(path: Path) -> bool:
    return path.suffix.lower() == LEGACY_SUFFIX


@click.command()
@_inputs_argument("mels")
@_io_options
@model_options
@_audio_out_options
@click.pass_context
def vocode(
    ctx: click.Context,
    mels: tuple[str, ...],
    out: str,
    force: bool,
    skip_existing: bool,
    fmt: str | None,
    sample_format: str | None,
    output_raw: bool,
    **model_kwargs: Any,
) -> None:
    """AudioLDM2 log-mel [frames, 64] (.npy, time first, natural log) -> 16 kHz audio, vocoder only."""
    margs = model_args(model_kwargs)
    check_exclusive(force, skip_existing)

    def run() -> int:
        from ..frontend import log_mel_range_problem

        target, sample = _audio_target(mels, out, fmt, sample_format, output_raw)
        jobs = plan_jobs(mels, target, _is_npy)
        runner = JobRunner("vocode", force, skip_existing, ctx.obj["debug"])
        options = margs.resolved()
        ready = runner.prepare(jobs)
        if not ready:
            return runner.close()
        rec = options.load((VOCODER,))
        rate = rec.contract.mel.sample_rate

        def one(job: Job) -> float:
            mel = read_array_bytes(read_stdin(), STDIO) if job.stdin else load_array(job.src)
            if mel.ndim != 2:
                raise AudioInputError(
                    f"{job.src}: log-mel must be one [frames, 64] array per file, got {list(mel.shape)}"
                )
            try:
                wave = rec.vocode(mel)
            except AudioInputError as e:
                raise AudioInputError(f"{job.src}: {e}") from None
            problem = log_mel_range_problem(mel, rec.contract.mel)
            if problem:
                click.echo(f"warning: {job.src}: {problem}", err=True)
            _emit_audio(target, job.dst, wave, rate, sample)
            return wave.size / rate

        return runner.run(ready, one)

    guard_files(ctx, run, "vocode")


def _bf16_line(check: Any) -> str:
    """The bf16 (openvino) errors recorded at export, on one line."""
    if not check:
        return "not recorded at export (re-export with openvino installed on a CPU with AVX512-BF16 or AMX)"
    if not check.get("measured"):
        return f"not measured on the exporting CPU: {check.get('reason', 'no reason recorded')}"
    r = check["results"]
    verdict = "within budget" if check["passed"] else "OVER BUDGET"
    return (
        f"{verdict} (openvino, f32 stages: {', '.join(check['f32_stages']) or 'none'}): encoder latents "
        f"rel-L2 {r['encoder_rel_l2']:.2%} (budget {check['budgets']['encoder_rel_l2']:.0%}), vocoder on real "
        f"mels log-mel L1 {r['vocoder_log_mel_l1']:.4f} nats (budget {check['budgets']['vocoder_log_mel_l1']:g}); "
        f"decoder mel rel-L2 {r['decoder_rel_l2']:.2%}, chain log-mel L1 {r['chain_log_mel_l1']:.3f} nats (not budgeted)"
    )


def _scaling_factor_origin(c: Contract) -> str:
    """Where a bundle's scaling factor came from (bundles of older exports did not record it: a
    random-weights export then always calibrated it)."""
    recorded = c.source.get(SOURCE_SCALING_FACTOR)
    return recorded or ("calibrated on random weights" if c.random_weights else "from the checkpoint")


@click.command()
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print recon.json as JSON.")
@click.option("--verify", is_flag=True, help="Also check every graph's size and SHA-256.")
@click.pass_context
def info(ctx: click.Context, model: Path | None, as_json: bool, verify: bool) -> None:
    """Show a bundle's contract: source, front end, graphs and their measured errors."""
    from ..contract import check_mel, read_contract, verify_graph_file

    def run() -> int:
        bundle = resolve_model(model).path
        c = read_contract(bundle)
        check_mel(c, str(bundle / "recon.json"))
        if verify:
            for g in c.graphs:
                verify_graph_file(bundle, g)
        if as_json:
            click.echo(json.dumps(c.to_dict(), indent=2))
            return 0
        src, m = c.source, c.mel
        lines = [
            f"bundle       {bundle}",
            f"source       {src.get('model')} @ {src.get('revision') or '-'}"
            + ("   ** RANDOM WEIGHTS: not for real audio **" if c.random_weights else ""),
            "checkpoint   "
            + (
                f"family {c.family}, pipeline {c.pipeline_class or '-'}"
                if c.family
                else "family and pipeline not recorded ("
                + (
                    "exported before families were recorded"
                    if "family" not in src  # the SOURCE_FAMILY key
                    else "test architecture"
                    if c.random_weights  # every --config but the tiny test one has a family
                    else "no model_index.json at export"
                )
                + ")"
            ),
            f"created      {c.created} (schema {c.schema_version})",
            f"identity     fingerprint {c.fingerprint} (decoding weights: latents decode only with a bundle "
            f"of the same one), digest {c.digest} (this exact bundle: pin it with --expect-digest)",
            f"front end    {m.sample_rate} Hz, n_fft {m.n_fft}, hop {m.hop_length}, {m.n_mels} mels "
            f"{m.f_min:g}-{m.f_max:g} Hz ({m.mel_norm}), {m.spectrum}, ln(max(mel, {m.mel_floor:g})), "
            f"{m.framing} framing (pad {m.pad})",
            f"latent       [B, 8, T/4, 16], scaling factor {c.scaling_factor!r} "
            f"({_scaling_factor_origin(c)}; baked into the graphs)",
            f"precisions   {', '.join(c.precisions) or 'none'}",
            "graphs:",
        ]
        fp16 = c.validation.get(FP16_ARITHMETIC_KEY)
        if fp16:
            errors = ", ".join(
                f"{r} {v['rel_l2']:.2%}" if v["finite"] else f"{r} not finite" for r, v in fp16["results"].items()
            )
            verdict = "passed" if fp16["passed"] else "FAILED (auto keeps fp32 on CUDA)"
            lines.insert(
                -1, f"fp16 check   {verdict}: rel-L2 {errors} in fp16 arithmetic (budget {fp16['budget']:.0%})"
            )
        elif FP16 in c.precisions:
            lines.insert(-1, "fp16 check   not run at export (auto keeps fp32 on CUDA)")
        lines.insert(-1, "bf16 check   " + _bf16_line(c.validation.get(BF16_KEY)))
        for g in c.graphs:
            err = f"rel-L2 {g.rel_l2:.2e} (limit {g.threshold:.0e})" if g.rel_l2 is not None else "not validated"
            lines.append(f"  {g.file:<22} {g.size_bytes / 1e6:7.1f} MB  {err}")
            if g.notes.get("cost"):
                lines.append(f"  {'':<22} {g.notes['cost']}")
        if verify:
            lines.append("all graph files match their SHA-256")
        click.echo("\n".join(lines))
        return 0

    guard(ctx, run)
