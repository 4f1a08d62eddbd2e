"""Input and reconstructed log-mel side by side, as a PNG (needs the `plot` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..contract import SILENCE_LOG_MEL
from ..errors import OutputError, install_hint
from .audio import atomic_path

MAX_ROWS = 8  # files shown in one figure


def require_matplotlib(path: Path) -> None:
    """Refuse --plot `path` in one line naming the `plot` extra where matplotlib cannot be imported
    (the CLI calls it before the model loads, not after every file was reconstructed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OutputError(f"{path}: --plot needs matplotlib: {install_hint('plot')}") from None


def plot_mels(rows: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """One row per file (title, input [T, 64], reconstruction [T, 64]); time on x, mel bin on y."""
    require_matplotlib(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)[:MAX_ROWS]
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 2.6 * len(rows)), squeeze=False)
    for (title, a, b), (ax_in, ax_out) in zip(rows, axes):
        vmax = float(max(a.max(), b.max()))
        for ax, mel, label in ((ax_in, a, "input"), (ax_out, b, "reconstruction")):
            im = ax.imshow(
                mel.T,
                origin="lower",
                aspect="auto",
                vmin=SILENCE_LOG_MEL,
                vmax=vmax,
                cmap="magma",
                extent=(0, mel.shape[0] / 100, 0, mel.shape[1]),
            )
            ax.set_title(f"{Path(title).name}: {label}", fontsize=9)
            ax.set_xlabel("seconds")
            ax.set_ylabel("mel bin")
        fig.colorbar(im, ax=[ax_in, ax_out], label="ln(mel)")
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
