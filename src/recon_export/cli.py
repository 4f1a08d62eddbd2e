"""`recon-export`: write a validated bundle from a diffusers AudioLDM, MusicLDM or AudioLDM2 checkpoint."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from recon_runtime.contract import (
    CHAIN_BUDGET_KEY,
    CHAIN_LOG_MEL_L1_BUDGET,
    DEFAULT_OPSET,
    INT8_BUDGETS,
    SOURCE_FAMILY,
    SOURCE_PIPELINE,
)
from recon_runtime.errors import ReconError
from recon_runtime.locations import default_export_dir

from .checkpoint import ARCHITECTURES, DEFAULT_MODEL
from .errors import ExportError


def _echo(message: str) -> None:
    click.echo(message, err=True)


def _default_budgets() -> str:
    return ", ".join([*(f"{k}={v}" for k, v in INT8_BUDGETS.items()), f"chain={CHAIN_LOG_MEL_L1_BUDGET}"])


def parse_budgets(items: tuple[str, ...]) -> dict[str, float]:
    """NAME=VALUE pairs from --int8-budget; a bad name or value is a one-line error."""
    names = (*INT8_BUDGETS, CHAIN_BUDGET_KEY)
    budgets = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if name.strip() not in names or not number > 0:
            raise ExportError(
                f"--int8-budget {item!r}: expected NAME=VALUE with NAME one of {', '.join(names)} and VALUE > 0"
            )
        budgets[name.strip()] = number
    return budgets


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Hub id or local folder of an AudioLDM, MusicLDM or AudioLDM2 checkpoint (vae/ and vocoder/ are loaded).",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Bundle folder to write (default: the per-user folder recon-run looks in without --model, "
    "$XDG_DATA_HOME/audioldm2-recon/models/audioldm2-music, by default under ~/.local/share).",
)
@click.option(
    "--precision", default="fp16,fp32", show_default=True, help="Comma-separated: fp16, fp32, int8 (int8 adds fp32)."
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Folder of your own audio to calibrate int8 (default: a built-in generated set).",
)
@click.option(
    "--int8-budget",
    "int8_budget",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override an int8 error budget: encoder/decoder/vocoder (rel-L2 vs fp32, e.g. decoder=0.05) "
    f"or chain (log-mel L1 in nats, e.g. chain=0.1). Defaults: {_default_budgets()}.",
)
@click.option("--random-weights", is_flag=True, help="Exact architecture with seeded random weights (offline, tests).")
@click.option(
    "--config",
    "config_name",
    type=click.Choice(list(ARCHITECTURES)),
    default="audioldm2-music",
    show_default=True,
    help="Published checkpoint whose architecture --random-weights builds, with a scaling factor calibrated on "
    "the random weights ('tiny' is for tests).",
)
@click.option("--seed", default=0, show_default=True, help="Seed for --random-weights.")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Check parity against PyTorch.")
@click.option("--allow-pickle", is_flag=True, help="Also load .bin (pickle) weights; only for files you trust.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def main(
    model: str,
    revision: str | None,
    out: Path | None,
    precision: str,
    calibration: Path | None,
    int8_budget: tuple[str, ...],
    random_weights: bool,
    config_name: str,
    seed: int,
    opset: int,
    validate: bool,
    allow_pickle: bool,
    force: bool,
    debug: bool,
) -> None:
    """Export the VAE encoder, decoder and HiFi-GAN vocoder of an AudioLDM-family checkpoint to an ONNX bundle."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    t0 = time.perf_counter()
    if out is None:
        out = default_export_dir()
        _echo(f"bundle folder {out} (the per-user default; --out DIR writes elsewhere)")
    try:
        from .bundle import Progress, export_bundle
        from .checkpoint import build_random, load_checkpoint

        precisions = [p.strip() for p in precision.split(",") if p.strip()]
        budgets = parse_budgets(int8_budget)
        progress = Progress(echo=_echo)
        with progress.step("load " + (f"random weights ({config_name}, seed {seed})" if random_weights else model)):
            ckpt = build_random(config_name, seed) if random_weights else load_checkpoint(model, revision, allow_pickle)
        family, pipeline = ckpt.source.get(SOURCE_FAMILY), ckpt.source.get(SOURCE_PIPELINE)
        reason = "test architecture" if random_weights else "no model_index.json"  # every other --config has one
        _echo(f"  family {family} ({pipeline})" if family else f"  family not recorded ({reason})")
        if random_weights:
            _echo("  WARNING: RANDOM WEIGHTS - this bundle is for tests and benchmarks, not for real audio")
        contract = export_bundle(
            ckpt, out, precisions, opset, validate, force, progress, calibration, int8_budgets=budgets or None
        )
    except ReconError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("error: interrupted; no bundle written", err=True)
        sys.exit(130)
    files = {g.file: g.size_bytes for g in contract.graphs}  # an int8 stage may reuse the fp32 file
    size = sum(files.values()) / 1e6
    _echo(f"wrote {out} ({len(files)} graph files, {size:.0f} MB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
