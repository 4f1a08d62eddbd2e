"""`recon-run`: reconstruct, encode and decode audio files with a recon bundle (click group)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click
import numpy as np

from .audio_io import atomic_path, discover, is_audio_file, load_array, read_audio, save_array, write_audio
from .errors import AudioInputError, BundleError, OutputError, ReconError

DEFAULT_MODEL: Final = Path("models/audioldm2-music")
SIDECAR_VERSION: Final = 1
_LOGGER = logging.getLogger("recon_runtime")


@dataclass
class Summary:
    """Counts for the closing line of a batch."""

    ok: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def line(self, what: str) -> str:
        wall = time.perf_counter() - self.started
        rtf = f"{wall / self.audio_seconds:.3f}" if self.audio_seconds else "-"
        return (
            f"{what}: {self.ok} ok, {self.failed} failed; {self.audio_seconds:.1f} s of audio in "
            f"{wall:.1f} s wall (real-time factor {rtf})"
        )


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)


def _model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--model",
                "model",
                type=click.Path(path_type=Path),
                default=DEFAULT_MODEL,
                show_default=True,
                help="Bundle folder written by recon-export.",
            ),
            click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True),
            click.option(
                "--precision",
                type=click.Choice(["auto", "fp16", "fp32", "int8"]),
                default="auto",
                show_default=True,
                help="auto: fp16 on CUDA, fp32 on CPU.",
            ),
            click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads per session."),
            click.option(
                "--cuda-graph",
                is_flag=True,
                help="CUDA: capture CUDA graphs for repeated input shapes (more GPU memory; not yet measured).",
            ),
        ]
    ):
        f = option(f)
    return f


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
        ]
    ):
        f = option(f)
    return f


def _load(model: Path, provider: str, precision: str, threads: int | None, cuda_graph: bool = False) -> Any:
    from .reconstructor import Reconstructor  # imports onnxruntime only when needed

    return Reconstructor.load(model, provider=provider, precision=precision, threads=threads, cuda_graph=cuda_graph)


Job = tuple[Path, Path, "ReconError | None"]


def _jobs(inputs: Iterable[Path], out: Path, suffix: str, accept: Callable[[Path], bool]) -> list[Job]:
    """(input file, output path, error) triples; folders are mirrored under `out`.

    A folder that cannot be read becomes one failed job, so the other inputs still run.
    """
    inputs = list(inputs)
    if len(inputs) == 1 and not inputs[0].is_dir() and out.suffix.lower() == suffix:
        return [(inputs[0], out, None)]
    jobs: list[Job] = []
    for root in inputs:
        try:
            jobs += [(path, out / rel.with_suffix(suffix), None) for path, rel in discover([root], accept)]
        except ReconError as e:
            jobs.append((root, out, e))
    return jobs


def _check_overwrite(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise OutputError(f"{target}: exists; pass --force to overwrite")
    if target.is_dir():
        raise OutputError(f"{target}: is a folder")


def _progress(items: list[Any], desc: str) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file", disable=len(items) < 2 or None, file=sys.stderr, leave=False)


def _report(src: Path, e: ReconError, summary: Summary) -> None:
    """One line per failed file, naming it; the batch goes on."""
    _fail(str(e) if str(src) in str(e) else f"{src}: {e}")
    summary.failed += 1


def _run_jobs(jobs: list[Job], what: str, force: bool, work: Callable[[Path, Path], float]) -> int:
    """Run `work(src, dst) -> audio seconds` per job; failures get one line each and the batch goes on.

    Returns the exit code: 1 if any job failed or none ran.
    """
    summary = Summary()
    for src, dst, error in _progress(jobs, what):
        try:
            if error:
                raise error
            _check_overwrite(dst, force)
            seconds = work(src, dst)
        except ReconError as e:
            _report(src, e, summary)
            continue
        summary.ok += 1
        summary.audio_seconds += seconds
    click.echo(summary.line(what), err=True)
    return 1 if summary.failed or not summary.ok else 0


def _batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for i in range(0, len(jobs), size):
        yield jobs[i : i + size]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Debug logging and tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run AudioLDM2's audio autoencoder (VAE + HiFi-GAN) with ONNX Runtime."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    ctx.obj = {"debug": debug}


def _guard(ctx: click.Context, fn: Callable[[], int]) -> None:
    """Turn library errors into one line and a non-zero exit (a traceback only with --debug)."""
    try:
        code = fn()
    except ReconError as e:
        if ctx.obj.get("debug"):
            raise
        _fail(str(e))
        code = 1
    ctx.exit(code)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@_io_options
@_model_options
@click.option("--output-rate", type=click.IntRange(min=1000), default=None, help="Resample the output (default 16000).")
@click.option(
    "--format", "sample_format", type=click.Choice(["float32", "pcm16"]), default="float32", show_default=True
)
@click.option(
    "--metrics", "metrics_path", type=click.Path(path_type=Path), default=None, help="Write metrics JSON here."
)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a log-mel PNG here.")
@click.pass_context
def reconstruct(
    ctx: click.Context,
    inputs: tuple[Path, ...],
    out: Path,
    force: bool,
    model: Path,
    provider: str,
    precision: str,
    threads: int | None,
    cuda_graph: bool,
    output_rate: int | None,
    sample_format: str,
    metrics_path: Path | None,
    plot_path: Path | None,
) -> None:
    """Audio -> VAE -> HiFi-GAN -> audio, for files or folders (the tree is mirrored)."""

    def run() -> int:
        from .reconstructor import MAX_BATCH

        rec = _load(model, provider, precision, threads, cuda_graph)
        rate = output_rate or rec.contract.mel.sample_rate
        summary, metrics, plots = Summary(), {}, []
        jobs = _jobs(inputs, out, ".wav", is_audio_file)
        from tqdm import tqdm

        bar = tqdm(
            total=len(jobs),
            desc="reconstruct",
            unit="file",
            disable=len(jobs) < 2 or None,
            file=sys.stderr,
            leave=False,
        )
        for group in _batches(jobs, MAX_BATCH):
            ready = []  # files read and prepared; equal lengths then run as one batch
            for src, dst, error in group:
                try:
                    if error:
                        raise error
                    _check_overwrite(dst, force)
                    ready.append((src, dst, rec.features(*read_audio(src))))
                except ReconError as e:
                    _report(src, e, summary)
            try:
                waves = rec.reconstruct_features([f for _, _, f in ready])
            except ReconError:  # one bad batch member must not sink the others: retry one by one
                waves = [None] * len(ready)
            for (src, dst, feats), wave in zip(ready, waves):
                try:
                    if wave is None:
                        wave = rec.reconstruct_features([feats])[0]
                    write_audio(dst, rec.finish(feats, wave, rate), rate, sample_format)
                except ReconError as e:
                    _report(src, e, summary)
                    continue
                summary.ok += 1
                summary.audio_seconds += feats.num_samples / rec.contract.mel.sample_rate
                if metrics_path:
                    from .metrics import compare

                    metrics[str(src)] = {"output": str(dst), **compare(feats.waveform, wave)}
                if plot_path:
                    from .frontend import log_mel

                    plots.append((str(src), feats.log_mel, log_mel(wave, rec.contract.mel)))
            bar.update(len(group))
        bar.close()
        if metrics_path:
            _write_json(
                metrics_path,
                {"bundle": str(model), "precision": rec.precision, "provider": rec.provider, "files": metrics},
            )
        if plot_path and plots:
            from .plot import plot_mels

            plot_mels(plots, plot_path)
        click.echo(summary.line("reconstruct"), err=True)
        return 1 if summary.failed or not summary.ok else 0

    _guard(ctx, run)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@_io_options
@_model_options
@click.option("--sample", is_flag=True, help="Draw from the posterior instead of taking its mean.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --sample.")
@click.pass_context
def encode(
    ctx: click.Context,
    inputs: tuple[Path, ...],
    out: Path,
    force: bool,
    model: Path,
    provider: str,
    precision: str,
    threads: int | None,
    cuda_graph: bool,
    sample: bool,
    seed: int,
) -> None:
    """Audio -> scaled latents [8, T/4, 16] as .npy, with a JSON sidecar for decode."""

    def run() -> int:
        rec = _load(model, provider, precision, threads, cuda_graph)

        def one(src: Path, dst: Path) -> float:
            audio, sr = read_audio(src)
            feats = rec.features(audio, sr)
            latents = rec.encode_features(feats, sample=sample, seed=seed)
            sidecar = {
                "version": SIDECAR_VERSION,
                "source": str(src),
                "sample_rate": rec.contract.mel.sample_rate,
                "num_samples": feats.num_samples,
                "input_sample_rate": sr,
                "gain": feats.gain,
                "latent_shape": list(latents.shape),
                "sampled": sample,
                "seed": seed if sample else None,
                "bundle_fingerprint": rec.contract.fingerprint,
                "scaling_factor": rec.contract.scaling_factor,
            }
            save_array(dst, latents)
            try:
                _write_json(dst.with_suffix(".json"), sidecar)
            except ReconError:
                dst.unlink(missing_ok=True)
                raise
            return feats.num_samples / rec.contract.mel.sample_rate

        return _run_jobs(_jobs(inputs, out, ".npy", is_audio_file), "encode", force, one)

    _guard(ctx, run)


@main.command()
@click.argument("latents", nargs=-1, required=True, type=click.Path(path_type=Path))
@_io_options
@_model_options
@click.option(
    "--format", "sample_format", type=click.Choice(["float32", "pcm16"]), default="float32", show_default=True
)
@click.pass_context
def decode(
    ctx: click.Context,
    latents: tuple[Path, ...],
    out: Path,
    force: bool,
    model: Path,
    provider: str,
    precision: str,
    threads: int | None,
    cuda_graph: bool,
    sample_format: str,
) -> None:
    """Latents (.npy) -> audio; the sidecar, when present, restores length and level."""

    def run() -> int:
        rec = _load(model, provider, precision, threads, cuda_graph)

        def one(src: Path, dst: Path) -> float:
            z = load_array(src)
            side = _read_sidecar(src, rec.contract.fingerprint)
            try:
                wave = rec.decode(z, num_samples=side.get("num_samples"))
            except AudioInputError as e:
                raise AudioInputError(f"{src}: {e}") from None
            if wave.ndim != 1:
                raise AudioInputError(f"{src}: holds a batch of latents {list(z.shape)}; save one per file")
            wave = wave * np.float32(side.get("gain", 1.0))
            write_audio(dst, wave, rec.contract.mel.sample_rate, sample_format)
            return wave.size / rec.contract.mel.sample_rate

        return _run_jobs(_jobs(latents, out, ".wav", lambda p: p.suffix.lower() == ".npy"), "decode", force, one)

    _guard(ctx, run)


def _read_sidecar(latents_path: Path, fingerprint: str) -> dict[str, Any]:
    path = latents_path.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        side = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AudioInputError(f"{path}: sidecar is not valid JSON ({e})") from None
    if not isinstance(side, dict) or side.get("version") != SIDECAR_VERSION:
        raise AudioInputError(f"{path}: unknown sidecar format (expected version {SIDECAR_VERSION})")
    if side.get("bundle_fingerprint") not in (None, fingerprint):
        raise BundleError(
            f"{latents_path}: latents come from another model (bundle {side['bundle_fingerprint']}, "
            f"this bundle {fingerprint}); decode them with the bundle that encoded them"
        )
    return side


def _write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


@main.command()
@click.option("--model", "model", type=click.Path(path_type=Path), default=DEFAULT_MODEL, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print recon.json as JSON.")
@click.option("--verify", is_flag=True, help="Also check every graph's size and SHA-256.")
@click.pass_context
def info(ctx: click.Context, model: Path, as_json: bool, verify: bool) -> None:
    """Show a bundle's contract: source, front end, graphs and their measured errors."""
    from .contract import check_mel, read_contract, verify_graph_file

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
            f"created      {c.created} (schema {c.schema_version}, fingerprint {c.fingerprint})",
            f"front end    {m.sample_rate} Hz, n_fft {m.n_fft}, hop {m.hop_length}, {m.n_mels} mels "
            f"{m.f_min:g}-{m.f_max:g} Hz ({m.mel_norm}), {m.spectrum}, ln(max(mel, {m.mel_floor:g})), "
            f"{m.framing} framing (pad {m.pad})",
            f"latent       [B, 8, T/4, 16], scaling factor {c.scaling_factor:.6g} (baked into the graphs)",
            f"precisions   {', '.join(c.precisions) or 'none'}",
            "graphs:",
        ]
        for g in c.graphs:
            err = f"rel-L2 {g.rel_l2:.2e} (limit {g.threshold:.0e})" if g.rel_l2 is not None else "not validated"
            lines.append(f"  {g.file:<22} {g.size_bytes / 1e6:7.1f} MB  {err}")
            if g.notes.get("cost"):
                lines.append(f"  {'':<22} {g.notes['cost']}")
        if verify:
            lines.append("all graph files match their SHA-256")
        click.echo("\n".join(lines))
        return 0

    _guard(ctx, run)


if __name__ == "__main__":
    main()
