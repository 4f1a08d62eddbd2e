"""`recon-run`: the click group and its commands (reconstruct, encode, decode, vocode, info, serve, dataset).

Each command lives in a module of this package; this one only builds the group. fastapi, uvicorn,
httpx and Ray are imported only inside the commands that use them.
"""

from __future__ import annotations

import logging
import sys

import click

from ..errors import BundleError
from . import dataset, files, serve


def version_lines() -> str:
    """`recon-run --version`: the package, its engines, and the bundle the commands use by default."""
    from ..locations import resolve_model
    from ..version import version_text

    try:
        location = resolve_model()
    except BundleError as e:  # none found (or $RECON_MODEL names none): the versions, and why
        return f"{version_text('recon-run')}\nno default bundle: {e}"
    try:
        return f"{version_text('recon-run', model=location.path)} ({location.describe().split(' (', 1)[1]}"
    except BundleError as e:
        return f"{version_text('recon-run')}\n{location.describe()}: {e}"


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_lines())
        ctx.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the versions (this package, onnxruntime, OpenVINO) and the default bundle's digest, and exit.",
)
@click.option("--debug", is_flag=True, help="Debug logging and tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run AudioLDM2's audio autoencoder (VAE + HiFi-GAN) on ONNX Runtime (CPU or CUDA) or OpenVINO (CPU).

    --backend auto (the default) picks the engine per run and prints which; each command's --help
    gives the rule.
    """
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    # httpx logs every request at INFO ("HTTP Request: POST ..."): the client's detail, shown with --debug only
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)
    ctx.obj = {"debug": debug}


# the commands are added by module (`from . import`): binding `serve` or `dataset` here would hide the module of that name
for _command in (files.reconstruct, files.encode, files.decode, files.vocode, files.info, serve.serve, dataset.dataset):
    main.add_command(_command)
