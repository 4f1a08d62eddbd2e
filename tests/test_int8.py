"""The int8 CPU path: export with measured mixed precision, budget failures, runtime without torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recon_runtime.contract import INT8, read_contract

from .conftest import tone, torch_missing

pytestmark = torch_missing

# The tiny test model's narrow layers quantize badly, so these budgets are loose to keep the test
# quick; the defaults (INT8_BUDGETS) are exercised on the full architecture below.
LOOSE = {"encoder": 0.5, "decoder": 0.5, "vocoder": 0.5, "chain": 5.0}


@pytest.fixture(scope="module")
def int8_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("int8") / "b"
    export_bundle(load_checkpoint(str(tiny_checkpoint)), out, precisions=["int8"], int8_budgets=LOOSE)
    return out


def test_int8_bundle_records_measured_errors(int8_bundle: Path) -> None:
    import onnx

    contract = read_contract(int8_bundle)
    assert set(contract.precisions) == {"fp32", "int8"}  # int8 brings the fp32 graphs it came from
    report = json.loads((int8_bundle / "recon.json").read_text())["validation"]["int8"]
    assert report["chain_log_mel_l1"] <= LOOSE["chain"]
    for role in ("encoder", "decoder", "vocoder"):
        entry = contract.graph(role, INT8)
        assert entry.rel_l2 is not None and entry.rel_l2 <= LOOSE[role]
        assert "int8 costs rel-L2" in entry.notes["cost"]
        model = onnx.load(str(int8_bundle / entry.file))
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        if role == "vocoder":  # ConvTranspose has no int8 CPU kernel; first and last conv stay fp32
            assert "ConvTranspose" in ops
            kept = {n.name for n in model.graph.node if n.op_type == "Conv" and "conv_pre" in n.name}
            assert kept


def test_runtime_runs_int8_and_info_shows_its_cost(int8_bundle: Path) -> None:
    from recon_runtime import Reconstructor

    rec = Reconstructor.load(int8_bundle, provider="cpu", precision="int8")
    out = rec.reconstruct(tone(1.0, 16000), 16000)
    assert out.shape == (16000,) and np.isfinite(out).all()
    assert Reconstructor.load(int8_bundle, provider="cpu").precision == "fp32"  # auto never picks int8
    from .conftest import run_cli

    r = run_cli("recon-run", "info", "--model", str(int8_bundle))
    assert r.returncode == 0 and "int8 costs rel-L2" in r.stdout


def test_int8_runs_with_torch_unimportable(int8_bundle: Path, tmp_path: Path) -> None:
    from .test_no_torch import _python

    r = _python(f"""
        import sys, numpy as np
        from recon_runtime import Reconstructor
        rec = Reconstructor.load({str(int8_bundle)!r}, provider="cpu", precision="int8")
        out = rec.reconstruct(np.sin(np.arange(16000) / 10).astype(np.float32), 16000)
        print("ok", out.shape, [m for m in ("torch", "diffusers", "transformers") if m in sys.modules])
    """)
    assert "ok (16000,) []" in r.stdout, r.stdout + r.stderr


def test_unmeetable_budget_fails_the_export(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import load_checkpoint
    from recon_export.errors import ParityError

    with pytest.raises(ParityError, match="int8 vocoder: error budget rel-L2 0.0 cannot be met"):
        export_bundle(
            load_checkpoint(str(tiny_checkpoint)),
            tmp_path / "b",
            precisions=["int8"],
            int8_budgets={**LOOSE, "vocoder": 0.0},
        )
    assert not (tmp_path / "b").exists()
