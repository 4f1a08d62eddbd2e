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

    impossible = {"encoder": 1e-9, "decoder": 1e-9, "vocoder": 1e-9, "chain": 1e-9}
    with pytest.raises(ParityError, match="cannot be met with any block quantized"):
        export_bundle(
            load_checkpoint(str(tiny_checkpoint)), tmp_path / "b", precisions=["int8"], int8_budgets=impossible
        )
    assert not (tmp_path / "b").exists()


def test_a_stage_that_misses_its_budget_reuses_the_fp32_graph(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import load_checkpoint
    from recon_runtime import Reconstructor

    out = tmp_path / "b"
    export_bundle(
        load_checkpoint(str(tiny_checkpoint)), out, precisions=["int8"], int8_budgets={**LOOSE, "vocoder": 1e-9}
    )
    contract = read_contract(out)
    vocoder = contract.graph("vocoder", INT8)
    assert vocoder.file == "vocoder.fp32.onnx" and vocoder.file_precision == "fp32"
    assert not (out / "vocoder.int8.onnx").exists()  # no duplicate of the fp32 file
    assert contract.graph("decoder", INT8).file == "decoder.int8.onnx"
    report = json.loads((out / "recon.json").read_text())["validation"]["int8"]
    assert report["graphs"]["vocoder"]["fp32_fallback"] and not report["graphs"]["decoder"]["fp32_fallback"]
    assert report["search"] and report["search"][0]["int8_share"]["decoder"] > 0
    rec = Reconstructor.load(out, provider="cpu", precision="int8")
    assert np.isfinite(rec.reconstruct(tone(0.5, 16000), 16000)).all()
    assert rec.executor.session("vocoder").path.name == "vocoder.fp32.onnx"
    from .conftest import run_cli

    r = run_cli("recon-run", "info", "--model", str(out))
    assert r.returncode == 0 and "runs the fp32 graph" in r.stdout, r.stdout


def test_node_macs_counts_conv_transpose_and_matmul() -> None:
    from onnx import TensorProto, helper, numpy_helper

    from recon_export.quantize import node_macs

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 3)).astype(np.float32), "w_conv"),  # Cout, Cin, k
        numpy_helper.from_array(rng.standard_normal((8, 2, 4)).astype(np.float32), "w_up"),  # Cin, Cout, k
        numpy_helper.from_array(rng.standard_normal((20, 5)).astype(np.float32), "w_mm"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_conv"], ["c"], name="/a/conv", pads=[1, 1]),
        helper.make_node("ConvTranspose", ["c", "w_up"], ["u"], name="/a/up", strides=[2], pads=[1, 1]),
        helper.make_node("MatMul", ["u", "w_mm"], ["y"], name="/b/mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    macs = node_macs(model, (1, 4, 10))
    assert macs["/a/conv"] == 8 * 10 * 4 * 3  # each of 8x10 outputs: 4 inputs x 3 taps
    assert macs["/a/up"] == 8 * 10 * 2 * 4  # each of 8x10 inputs feeds 2 outputs x 4 taps
    assert macs["/b/mm"] == 2 * 5 * 20  # u [1, 2, 20] @ [20, 5]: each of 2x5 outputs sums 20 products
