"""`recon-run reconstruct|encode|decode|vocode|info`: the file commands, local or with --server URL.

Each command is the same shape (plan the outputs, load the stages it needs, run one function per
file through `batch.JobRunner`) and they share their option sets; reconstruct's --metrics and
--plot files and `info`'s report make the file a little over 500 lines, one thing still: the
commands a user runs on files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

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
from ..files.audio import is_audio_file, load_array, read_audio, write_audio, write_json
from ..files.latents import SIDECAR, read_latents, save_latents
from ..files.plot import MAX_ROWS, require_matplotlib
from ..options import DEFAULT_MODEL
from ..serving.protocol import DEFAULT_CONCURRENCY
from .batch import Job, JobRunner, batches, check_exclusive, guard, path_key, plan_jobs, progress
from .options import FORMAT_OPTION, OUTPUT_RATE_OPTION, model_args, model_options


def _io_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "-o",
                "--out",
                "out",
                type=click.Path(path_type=Path),
                required=True,
                help="Output folder (or a file name when there is exactly one input file).",
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


def _check_report_file(path: Path | None, option: str, force: bool, skip_existing: bool, keep: str) -> bool:
    """--metrics/--plot FILE, checked before the model loads: True when it exists and --skip-existing keeps it.

    An existing file is replaced only with --force; without either flag the command refuses it.
    """
    if path is None:
        return False
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; {option} names a file")
    if not path.exists() or force:
        return False
    if skip_existing:
        return True
    raise OutputError(f"{path}: exists; pass --force to overwrite it or --skip-existing to {keep}")


def _refuse_report_clash(jobs: list[Job], reports: dict[str, Path | None]) -> None:
    """--metrics/--plot FILE is neither an input, nor an output, nor the other one's file.

    Checked before the model loads and whatever --force says: --force replaces earlier outputs,
    never this run's own inputs or outputs.
    """
    named = {option: path for option, path in reports.items() if path is not None}
    sources = {path_key(j.src) for j in jobs if j.src.is_file()}
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


def _metrics_key(src: Path) -> str:
    """An input's entry in the metrics file: its resolved path, one spelling whatever the command line said."""
    return str(src.resolve())


def _earlier_metrics(path: Path, bundle: Path) -> dict[str, Any]:
    """The files of a metrics JSON that --skip-existing adds to; refused if it is not one of this bundle."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: cannot be read as a metrics file ({e}); pass --force to replace it") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise OutputError(f"{path}: not a metrics file of recon-run reconstruct; pass --force to replace it")
    if not all(os.path.isabs(str(p)) for p in [data.get("bundle"), *data["files"]]):
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


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@_io_options
@model_options
@OUTPUT_RATE_OPTION
@FORMAT_OPTION
@click.option(
    "--metrics", "metrics_path", type=click.Path(path_type=Path), default=None, help="Write metrics JSON here."
)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a log-mel PNG here.")
@_server_options
@click.pass_context
def reconstruct(
    ctx: click.Context,
    inputs: tuple[Path, ...],
    out: Path,
    force: bool,
    skip_existing: bool,
    output_rate: int | None,
    sample_format: str,
    metrics_path: Path | None,
    plot_path: Path | None,
    server: str | None,
    api_key_env: str | None,
    concurrency: int,
    **model_kwargs: Any,
) -> None:
    """Audio -> VAE -> HiFi-GAN -> audio, for files or folders (the tree is mirrored)."""
    margs = model_args(model_kwargs)
    check_exclusive(force, skip_existing)

    def run() -> int:
        if server and (metrics_path or plot_path):
            raise click.UsageError("--metrics and --plot need the model loaded locally; drop --server for them")
        jobs = plan_jobs(inputs, out, ".wav", is_audio_file)
        _refuse_report_clash(jobs, {"--metrics": metrics_path, "--plot": plot_path})
        merge = _check_report_file(metrics_path, "--metrics", force, skip_existing, "add this run's files to it")
        keep_plot = _check_report_file(plot_path, "--plot", force, skip_existing, "keep it")
        if plot_path and not keep_plot:
            require_matplotlib(plot_path)
        earlier = _earlier_metrics(metrics_path, margs.model) if merge and metrics_path else None
        if server:
            from .remote import remote_client, remote_reconstruct

            with remote_client(server, api_key_env, margs.expect_digest, concurrency) as remote:
                runner = JobRunner("reconstruct", force, skip_existing, ctx.obj["debug"])
                return remote.run(runner, jobs, remote_reconstruct(remote.client, output_rate, sample_format))
        rec = margs.load(ROLES)
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
        rate = output_rate or rec.contract.mel.sample_rate
        runner = JobRunner("reconstruct", force, skip_existing, ctx.obj["debug"])
        metrics: dict[str, Any] = {}
        plots: list[Any] = []  # only the rows drawn (plot.MAX_ROWS): two mels each
        if keep_plot:
            click.echo(f"{plot_path}: exists, kept (--skip-existing); pass --force to draw it again", err=True)
        bar = progress(jobs, "reconstruct")
        for group in batches(jobs, rec.max_batch):
            ready = []  # files read and prepared; their equal-shape windows run as one batch
            for job in group:
                if runner.ready(job):
                    try:
                        ready.append((job, rec.features(*read_audio(job.src))))
                    except Exception as e:  # noqa: BLE001 - every per-file failure becomes one line
                        runner.fail(job, e)
            try:
                waves: list[Any] = rec.reconstruct_features([f for _, f in ready])
            except Exception:  # noqa: BLE001 - one bad batch member must not sink the others: retry one by one
                waves = [None] * len(ready)
            for (job, feats), wave in zip(ready, waves):

                def work(job: Job = job, feats: Any = feats, wave: Any = wave) -> float:
                    if wave is None:
                        wave = rec.reconstruct_features([feats])[0]
                    scores = None
                    if metrics_path:  # before the write: a file on disk is a file counted as done
                        from ..files.metrics import compare

                        scores = {"output": str(job.dst), **compare(feats.waveform, wave)}
                    write_audio(job.dst, rec.finish(feats, wave, rate), rate, sample_format)
                    if scores is not None:
                        metrics[_metrics_key(job.src)] = scores
                    if plot_path and not keep_plot and len(plots) < MAX_ROWS:
                        from ..frontend import log_mel

                        plots.append((str(job.src), feats.log_mel, log_mel(wave, rec.contract.mel)))
                    return feats.num_samples / rec.contract.mel.sample_rate

                runner.attempt(job, work)
            bar.update(len(group))
        bar.close()
        try:
            if metrics_path:
                if earlier is not None:  # --skip-existing: earlier entries stay, but not of files this run tried
                    tried = {_metrics_key(j.src) for j in jobs if j.src not in runner.skipped}
                    metrics = {**{k: v for k, v in earlier["files"].items() if k not in tried}, **metrics}
                missing = sum(1 for src in runner.skipped if _metrics_key(src) not in metrics)
                if missing:
                    click.echo(
                        f"{metrics_path}: {missing} skipped file(s) have no entry (their outputs existed, with no "
                        "metrics recorded for them); delete those outputs or pass --force to compute them",
                        err=True,
                    )
                write_json(
                    metrics_path,
                    {
                        "bundle": str(margs.model.resolve()),
                        "backend": rec.backend,
                        "precision": rec.precision,
                        "provider": rec.provider,
                        "files": metrics,
                    },
                )
            if plot_path and plots:
                from ..files.plot import plot_mels

                plot_mels(plots, plot_path)
        finally:  # the per-file summary is printed even when the metrics or plot file fails
            code = runner.close()
        return code

    guard(ctx, run)


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@_io_options
@model_options
@click.option("--sample", is_flag=True, help="Draw from the posterior instead of taking its mean.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --sample.")
@_server_options
@click.pass_context
def encode(
    ctx: click.Context,
    inputs: tuple[Path, ...],
    out: Path,
    force: bool,
    skip_existing: bool,
    sample: bool,
    seed: int,
    server: str | None,
    api_key_env: str | None,
    concurrency: int,
    **model_kwargs: Any,
) -> None:
    """Audio -> scaled latents [8, T/4, 16] as .npy, with a JSON sidecar for decode."""
    margs = model_args(model_kwargs)
    check_exclusive(force, skip_existing)

    def run() -> int:
        if server:
            from .remote import remote_client, remote_encode

            with remote_client(server, api_key_env, margs.expect_digest, concurrency) as remote:
                runner = JobRunner("encode", force, skip_existing, ctx.obj["debug"])
                jobs = plan_jobs(inputs, out, ".npy", is_audio_file, companions=(SIDECAR,))
                return remote.run(runner, jobs, remote_encode(remote.client, sample, seed))
        rec = margs.load((ENCODER,))

        def one(src: Path, dst: Path) -> float:
            audio, sr = read_audio(src)
            feats = rec.features(audio, sr)
            latents = rec.encode_features(feats, sample=sample, seed=seed)
            save_latents(
                dst,
                latents,
                src,
                sample_rate=rec.contract.mel.sample_rate,
                num_samples=feats.num_samples,
                input_sample_rate=sr,
                gain=feats.gain,
                sample=sample,
                seed=seed,
                fingerprint=rec.contract.fingerprint,
                scaling_factor=rec.contract.scaling_factor,
            )
            return feats.num_samples / rec.contract.mel.sample_rate

        runner = JobRunner("encode", force, skip_existing, ctx.obj["debug"])
        return runner.run(plan_jobs(inputs, out, ".npy", is_audio_file, companions=(SIDECAR,)), one)

    guard(ctx, run)


@click.command()
@click.argument("latents", nargs=-1, required=True, type=click.Path(path_type=Path))
@_io_options
@model_options
@FORMAT_OPTION
@_server_options
@click.pass_context
def decode(
    ctx: click.Context,
    latents: tuple[Path, ...],
    out: Path,
    force: bool,
    skip_existing: bool,
    sample_format: str,
    server: str | None,
    api_key_env: str | None,
    concurrency: int,
    **model_kwargs: Any,
) -> None:
    """Latents (.npy) -> audio; the sidecar, when present, restores length and level."""
    margs = model_args(model_kwargs)
    check_exclusive(force, skip_existing)

    def run() -> int:
        if server:
            from .remote import remote_client, remote_decode

            with remote_client(server, api_key_env, margs.expect_digest, concurrency) as remote:
                runner = JobRunner("decode", force, skip_existing, ctx.obj["debug"])
                work = remote_decode(remote.client, sample_format)
                return remote.run(runner, plan_jobs(latents, out, ".wav", _is_npy), work)
        rec = margs.load((DECODER, VOCODER))

        def one(src: Path, dst: Path) -> float:
            z, side = read_latents(src, rec.contract.fingerprint)
            try:
                wave = rec.decode(z, num_samples=side.get("num_samples"))
            except AudioInputError as e:
                raise AudioInputError(f"{src}: {e}") from None
            wave = wave * np.float32(side.get("gain", 1.0))
            write_audio(dst, wave, rec.contract.mel.sample_rate, sample_format)
            return wave.size / rec.contract.mel.sample_rate

        runner = JobRunner("decode", force, skip_existing, ctx.obj["debug"])
        return runner.run(plan_jobs(latents, out, ".wav", _is_npy), one)

    guard(ctx, run)


@click.command()
@click.argument("mels", nargs=-1, required=True, type=click.Path(path_type=Path))
@_io_options
@model_options
@FORMAT_OPTION
@click.pass_context
def vocode(
    ctx: click.Context,
    mels: tuple[Path, ...],
    out: Path,
    force: bool,
    skip_existing: bool,
    sample_format: str,
    **model_kwargs: Any,
) -> None:
    """AudioLDM2 log-mel [frames, 64] (.npy, time first, natural log) -> 16 kHz audio, vocoder only."""
    margs = model_args(model_kwargs)
    check_exclusive(force, skip_existing)

    def run() -> int:
        rec = margs.load((VOCODER,))

        def one(src: Path, dst: Path) -> float:
            mel = load_array(src)
            if mel.ndim != 2:
                raise AudioInputError(f"{src}: log-mel must be one [frames, 64] array per file, got {list(mel.shape)}")
            try:
                wave = rec.vocode(mel)
            except AudioInputError as e:
                raise AudioInputError(f"{src}: {e}") from None
            write_audio(dst, wave, rec.contract.mel.sample_rate, sample_format)
            return wave.size / rec.contract.mel.sample_rate

        runner = JobRunner("vocode", force, skip_existing, ctx.obj["debug"])
        return runner.run(plan_jobs(mels, out, ".wav", _is_npy), one)

    guard(ctx, run)


def _is_npy(path: Path) -> bool:
    return path.suffix.lower() == ".npy"


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
@click.option("--model", "model", type=click.Path(path_type=Path), default=DEFAULT_MODEL, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print recon.json as JSON.")
@click.option("--verify", is_flag=True, help="Also check every graph's size and SHA-256.")
@click.pass_context
def info(ctx: click.Context, model: Path, as_json: bool, verify: bool) -> None:
    """Show a bundle's contract: source, front end, graphs and their measured errors."""
    from ..contract import check_mel, read_contract, verify_graph_file

    def run() -> int:
        c = read_contract(model)
        check_mel(c, str(model / "recon.json"))
        if verify:
            for g in c.graphs:
                verify_graph_file(model, g)
        if as_json:
            click.echo(json.dumps(c.to_dict(), indent=2))
            return 0
        src, m = c.source, c.mel
        lines = [
            f"bundle       {model}",
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
