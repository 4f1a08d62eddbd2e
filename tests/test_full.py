"""The exact AudioLDM2 architecture (random weights) end to end, at short lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recon_runtime import Reconstructor
from recon_runtime.contract import FP16, FP32, REL_L2_THRESHOLDS, read_contract

from .conftest import tone, torch_missing
from .test_runtime import FP16_WAVE_REL_L2, FP32_WAVE_REL_L2, torch_reference

pytestmark = [pytest.mark.full, torch_missing]


def test_full_bundle_passes_its_validation(full_bundle: Path) -> None:
    contract = read_contract(full_bundle)
    assert contract.vae_config["block_out_channels"] == [128, 256, 512]
    assert contract.vocoder_config["upsample_initial_channel"] == 1024
    assert set(contract.precisions) == {FP16, FP32}
    for g in contract.graphs:
        assert g.rel_l2 is not None and g.rel_l2 <= REL_L2_THRESHOLDS[g.precision], g
    print({f"{g.role}.{g.precision}": f"{g.rel_l2:.2e}" for g in contract.graphs})


def test_full_runtime_matches_pytorch(full_checkpoint: Path, full_bundle: Path) -> None:
    from recon_export.signals import test_signal

    audio = test_signal("music", 2.55, seed=5)  # T = 256 mel frames
    ref = torch_reference(full_checkpoint, full_bundle, audio, 16000)
    errors = {}
    for precision in (FP32, FP16):
        out = Reconstructor.load(full_bundle, provider="cpu", precision=precision).reconstruct(audio, 16000)
        assert out.shape == ref.shape == audio.shape and np.isfinite(out).all()
        errors[precision] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    print(f"full architecture, waveform rel-L2 vs PyTorch: {errors}")
    assert errors[FP32] <= FP32_WAVE_REL_L2
    assert errors[FP16] <= FP16_WAVE_REL_L2


def test_full_windowed_path_keeps_length_and_level(full_bundle: Path) -> None:
    audio = tone(6.0, 16000, 440, 0.3)
    rec = Reconstructor.load(full_bundle, provider="cpu", window_frames=256, overlap_frames=64)
    out = rec.reconstruct(audio, 16000)
    assert out.shape == audio.shape and np.isfinite(out).all()
    one = Reconstructor.load(full_bundle, provider="cpu").reconstruct(audio, 16000)
    seam_err = float(np.sqrt(np.mean((out - one) ** 2)) / np.sqrt(np.mean(one**2)))
    print(f"full architecture, windowed vs one pass: RMS error {seam_err:.4f} of signal RMS")
    assert seam_err <= 0.25


def test_full_int8_export_and_runtime_at_a_short_length(
    full_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8 path on the real architecture: short calibration/validation clips, loose budgets
    (one quantization per graph; the default budgets' block search is measured by benchmarks)."""
    import recon_export.quantize as quantize
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import load_checkpoint

    from .test_int8 import LOOSE

    monkeypatch.setattr(quantize, "CALIBRATION_KINDS", ("speech", "music", "silence"))
    monkeypatch.setattr(quantize, "CALIBRATION_FRAMES", 64)
    monkeypatch.setattr(quantize, "CALIBRATION_SECONDS", (0.3, 0.6))
    monkeypatch.setattr(quantize, "VALIDATION_FRAMES", 64)
    out = tmp_path / "int8"
    contract = export_bundle(
        load_checkpoint(str(full_checkpoint)), out, precisions=["int8"], validate=False, int8_budgets=LOOSE
    )
    for role in ("encoder", "decoder", "vocoder"):
        entry = contract.graph(role, "int8")
        assert entry is not None and entry.rel_l2 is not None and entry.rel_l2 <= LOOSE[role]
    rec = Reconstructor.load(out, provider="cpu", precision="int8")
    wave = rec.reconstruct(tone(0.64, 16000), 16000)
    assert wave.shape == (10240,) and np.isfinite(wave).all()
