"""The text of `--version` for `recon-run` and `recon-export`: this package, its engines, and a bundle's identity.

Versions come from the installed distributions' metadata (importlib.metadata), never by importing
the engines: on a 2-core machine `import openvino` takes 0.33 s and `import onnxruntime` 0.2 s,
reading both versions from metadata 0.06 s (docs/files.md).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Final

DISTRIBUTION: Final = "audioldm2-recon"
RUNTIME_ENGINES: Final = ("onnxruntime", "onnxruntime-gpu", "openvino")
"""What `recon-run --version` reports (onnxruntime's CPU and GPU wheels are two distributions)."""
EXPORT_LIBRARIES: Final = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu")
"""What `recon-export --version` reports."""
NOT_INSTALLED: Final = "not installed"
ONNXRUNTIME_PAIR: Final = ("onnxruntime", "onnxruntime-gpu")
"""One import name, two wheels: exactly one should be installed."""


def distribution_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_text(prog: str, libraries: Sequence[str] = RUNTIME_ENGINES, model: Path | None = None) -> str:
    """Lines for `prog --version`: the package and Python, each of `libraries` (installed or not; of
    the two onnxruntime wheels only the one installed, or `onnxruntime not installed`), and with
    `model` the bundle's digest and fingerprint.

    Raises:
        BundleError: `model` is not a readable bundle (the one-line error of loading it).
    """
    lines = [
        f"{prog} {distribution_version(DISTRIBUTION) or 'unknown'} ({DISTRIBUTION}, Python {platform.python_version()})"
    ]
    versions = {name: distribution_version(name) for name in libraries}
    for name, other in ONNXRUNTIME_PAIR, ONNXRUNTIME_PAIR[::-1]:
        # one line for the onnxruntime wheel that is there (or for onnxruntime when neither is)
        if versions.get(name) is None and other in versions and (versions[other] or name == ONNXRUNTIME_PAIR[1]):
            versions.pop(name, None)
    lines += [f"{name} {version or NOT_INSTALLED}" for name, version in versions.items()]
    if all(versions.get(n) for n in ONNXRUNTIME_PAIR):
        lines.append(
            "warning: both onnxruntime wheels are installed; they overwrite each other's files (README, Install)"
        )
    if model is not None:
        from .contract import read_contract

        contract = read_contract(Path(model))
        lines.append(f"bundle {model}: digest {contract.digest}, fingerprint {contract.fingerprint}")
    return "\n".join(lines)
