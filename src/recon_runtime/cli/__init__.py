"""`recon-run`: the click group and its commands (reconstruct, encode, decode, vocode, info, serve, dataset).

Each command lives in a module of this package; this one only builds the group. fastapi, uvicorn,
httpx and Ray are imported only inside the commands that use them.
"""

from __future__ import annotations

import logging
import sys

import click

from . import dataset, files, serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
