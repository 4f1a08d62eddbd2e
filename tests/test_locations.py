"""Where the default bundle is: $RECON_MODEL, the current folder's models/audioldm2-music, the per-user folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from recon_runtime.errors import BundleError
from recon_runtime.locations import (
    ENV,
    EXPLICIT,
    LOCAL,
    MODEL_ENV,
    USER,
    default_export_dir,
    resolve_model,
    user_models_dir,
)


def make_bundle(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "recon.json").write_text("{}")
    return folder


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An empty current folder and an empty per-user data folder ($XDG_DATA_HOME)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    cwd = tmp_path / "work"
    cwd.mkdir()
    return cwd, tmp_path / "data" / "audioldm2-recon" / "models" / "audioldm2-music"


def test_the_per_user_folder_follows_xdg_and_is_where_export_writes(places: tuple[Path, Path]) -> None:
    _, user = places
    assert default_export_dir() == user and user_models_dir() == user.parent


def test_the_order_is_env_then_the_current_folder_then_the_per_user_folder(places: tuple[Path, Path]) -> None:
    cwd, user = places
    make_bundle(user)
    found = resolve_model(env={}, cwd=cwd)
    assert (found.path, found.origin, found.shadowed) == (user, USER, ())
    local = make_bundle(cwd / "models" / "audioldm2-music")
    found = resolve_model(env={}, cwd=cwd)
    assert (found.path, found.origin, found.shadowed) == (local, LOCAL, (user,))
    assert "also found, not used" in found.describe() and str(user) in found.describe()
    chosen = make_bundle(cwd / "mine")
    found = resolve_model(env={MODEL_ENV: str(chosen)}, cwd=cwd)
    assert (found.path, found.origin) == (chosen, ENV)
    found = resolve_model("elsewhere", env={MODEL_ENV: str(chosen)}, cwd=cwd)
    assert (found.path, found.origin) == (Path("elsewhere"), EXPLICIT)  # --model wins, as given


def test_an_env_bundle_that_is_not_there_is_an_error_not_a_fall_through(places: tuple[Path, Path]) -> None:
    cwd, user = places
    make_bundle(user)
    (cwd / "a-file").write_text("not a bundle")
    for target, state in (
        (cwd / "missing", "does not exist"),
        (cwd, "has no recon.json"),
        (cwd / "a-file", "is a file"),
    ):
        with pytest.raises(BundleError) as e:
            resolve_model(env={MODEL_ENV: str(target)}, cwd=cwd)
        text = str(e.value)
        assert "\n" not in text and str(target) in text and state in text, text
        assert f"recon-export --out {target}" in text and "unset RECON_MODEL" in text, text
    assert resolve_model(env={MODEL_ENV: ""}, cwd=cwd).origin == USER  # set but empty: not set


def test_nothing_found_lists_every_place_and_how_to_make_a_bundle(places: tuple[Path, Path]) -> None:
    cwd, user = places
    (cwd / "models" / "audioldm2-music").mkdir(parents=True)  # a folder, but no bundle
    with pytest.raises(BundleError) as e:
        resolve_model(env={}, cwd=cwd)
    text = str(e.value)
    assert "\n" not in text
    assert "$RECON_MODEL (not set)" in text
    assert f"{cwd / 'models' / 'audioldm2-music'} (no recon.json)" in text and f"{user} (absent)" in text
    assert "`recon-export`" in text and f"writes {user}" in text and "--model DIR" in text, text


def test_the_default_place_is_found_from_another_folder_through_the_real_environment(
    places: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, user = places
    make_bundle(user)
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.chdir(cwd)
    assert resolve_model().path == user
