"""Where the default bundle lives: `$RECON_MODEL`, today's `models/audioldm2-music`, the per-user data folder.

Without `--model`, the commands look in this order and take the first that is a bundle
(a folder with recon.json):

1. `$RECON_MODEL` when set: the user's explicit choice, so a missing bundle there is an error (it
   never falls through to another place);
2. `models/audioldm2-music` under the current folder, where `recon-export` wrote before it wrote
   to the per-user folder: a checkout that has one keeps using it, as before;
3. the per-user data folder (XDG on Linux: `$XDG_DATA_HOME/audioldm2-recon/models/audioldm2-music`,
   by default `~/.local/share/...`; the platform's data folder elsewhere, from platformdirs), where
   `recon-export` writes by default, so a bundle made once is found from any folder.

When nothing is found the error lists each place and why it did not count, and how to make a bundle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .contract import CONTRACT_FILE
from .errors import BundleError

APP_NAME: Final = "audioldm2-recon"
MODEL_ENV: Final = "RECON_MODEL"
BUNDLE_NAME: Final = "audioldm2-music"
"""The default bundle's folder name (the default checkpoint's name, cvssp/audioldm2-music)."""
LOCAL_MODEL: Final = Path("models") / BUNDLE_NAME
"""The default of earlier versions, relative to the current folder."""
ENV: Final = "env"
LOCAL: Final = "local"
USER: Final = "user"
EXPLICIT: Final = "--model"


def user_models_dir() -> Path:
    """The per-user folder that holds bundles (platformdirs' user data folder; honours $XDG_DATA_HOME)."""
    from platformdirs import user_data_path

    return user_data_path(APP_NAME, appauthor=False) / "models"


def default_export_dir() -> Path:
    """Where `recon-export` writes when no --out is given: the per-user default bundle."""
    return user_models_dir() / BUNDLE_NAME


def is_bundle(path: Path) -> bool:
    return (Path(path) / CONTRACT_FILE).is_file()


@dataclass(frozen=True)
class ModelLocation:
    """The bundle a command uses and why."""

    path: Path
    origin: str
    """EXPLICIT, ENV, LOCAL or USER."""
    shadowed: tuple[Path, ...] = ()
    """Bundles further down the order that were found but not used (worth a line in the log)."""

    def describe(self) -> str:
        why = {EXPLICIT: "--model", ENV: f"${MODEL_ENV}", LOCAL: "the current folder", USER: "the per-user folder"}
        text = f"bundle {self.path} (from {why[self.origin]})"
        if self.shadowed:
            text += f"; also found, not used: {', '.join(map(str, self.shadowed))}"
        return text


def resolve_model(
    explicit: Path | str | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> ModelLocation:
    """The bundle to load: `explicit` (--model) when given, else the first bundle in the order above.

    Args:
        explicit: --model as given; used as it is (its errors come from loading it).
        env: the environment (default os.environ).
        cwd: the current folder (default Path.cwd()).
    Raises:
        BundleError: $RECON_MODEL names no bundle, or no place holds one (the message lists them).
    """
    if explicit is not None:
        return ModelLocation(Path(explicit), EXPLICIT)
    env = os.environ if env is None else env
    chosen = env.get(MODEL_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not is_bundle(path):
            state = "has no recon.json" if path.is_dir() else "is a file" if path.exists() else "does not exist"
            raise BundleError(
                f"{path}: ${MODEL_ENV} names this bundle folder, which {state}; export one with "
                f"`recon-export --out {path}`, or unset {MODEL_ENV} to use the default places"
            )
        return ModelLocation(path, ENV)
    candidates = [((cwd or Path.cwd()) / LOCAL_MODEL, LOCAL), (default_export_dir(), USER)]
    found = [(path, origin) for path, origin in candidates if is_bundle(path)]
    if found:
        (path, origin), *rest = found
        return ModelLocation(path, origin, tuple(p for p, _ in rest))
    looked = [f"${MODEL_ENV} (not set)"]
    looked += [f"{path} ({'no recon.json' if path.is_dir() else 'absent'})" for path, _ in candidates]
    raise BundleError(
        f"no bundle found; looked in: {'; '.join(looked)}. Make one with `recon-export` (it writes "
        f"{default_export_dir()}; --random-weights for a test bundle), or pass --model DIR, or set {MODEL_ENV}"
    )
