"""The OpenVINO backend: exact fp32, bf16 only where the CPU computes it, compiled-model cache, checks kept."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("openvino", reason="the OpenVINO backend needs the `openvino` extra (pip install '.[openvino]')")
pytest.importorskip("onnxruntime", reason="the comparisons run onnxruntime too (the `cpu` extra)")

from click.testing import CliRunner  # noqa: E402

from recon_runtime import Reconstructor  # noqa: E402
from recon_runtime import reconstructor as rec_module  # noqa: E402
from recon_runtime.cli import main  # noqa: E402
from recon_runtime.contract import (  # noqa: E402
    BF16_ENCODER_REL_L2_BUDGET,
    BF16_VOCODER_LOG_MEL_L1_BUDGET,
    FP32,
    METADATA_KEYS_CHECKED,
    ROLES,
)
from recon_runtime.errors import BundleError, ProviderError  # noqa: E402
from recon_runtime.executors import openvino as ov_exec  # noqa: E402

from .conftest import run_cli, tone, torch_missing  # noqa: E402

BF16_OK, BF16_REASON = ov_exec.probe_bf16()
needs_bf16 = pytest.mark.skipif(not BF16_OK, reason=f"this CPU does not compute bf16 in hardware: {BF16_REASON}")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _load(bundle: Path, cache: Path, **kw: object) -> Reconstructor:
    kw.setdefault("provider", "cpu")
    return Reconstructor.load(bundle, cache_dir=cache, **kw)  # type: ignore[arg-type]


def _audio() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (tone(2.0, 22050) + 0.05 * rng.standard_normal(44100)).astype(np.float32)


def test_fp32_matches_onnxruntime_through_the_api(tiny_bundle: Path, tmp_path: Path) -> None:
    ov_rec = _load(tiny_bundle, tmp_path / "cache", backend="openvino", precision="fp32")
    ort_rec = Reconstructor.load(tiny_bundle, provider="cpu", backend="onnxruntime", precision="fp32")
    assert (ov_rec.backend, ov_rec.precision, ov_rec.provider) == ("openvino", "fp32", "cpu")
    assert ort_rec.backend == "onnxruntime"
    audio = _audio()
    assert rel(ov_rec.reconstruct(audio, 22050), ort_rec.reconstruct(audio, 22050)) <= 1e-5
    z_ov, z_ort = ov_rec.encode(audio, 22050), ort_rec.encode(audio, 22050)
    assert rel(z_ov, z_ort) <= 1e-5
    assert rel(ov_rec.decode(z_ort), ort_rec.decode(z_ort)) <= 1e-5
    mel = ov_rec.features(audio, 22050).log_mel
    assert rel(ov_rec.vocode(mel), ort_rec.vocode(mel)) <= 1e-5
    assert all(s.inference_precision == "f32" for s in (ov_rec.executor.compiled(r) for r in ROLES))


def test_fp32_matches_onnxruntime_through_the_cli(tiny_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.wav"
    sf.write(str(src), _audio(), 22050)
    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    outs = {}
    for backend in ("openvino", "onnxruntime"):
        outs[backend] = tmp_path / f"{backend}.wav"
        r = run_cli(
            "recon-run", "reconstruct", str(src), "-o", str(outs[backend]), "--model", str(tiny_bundle),
            "--backend", backend, "--provider", "cpu", "--precision", "fp32", env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    a, _ = sf.read(str(outs["openvino"]), dtype="float32")
    b, _ = sf.read(str(outs["onnxruntime"]), dtype="float32")
    assert rel(a, b) <= 1e-5
    # the CLI's run used the default cache folder, per bundle digest, outside the bundle
    digest = Reconstructor.load(tiny_bundle, provider="cpu", backend="onnxruntime").contract.digest
    assert list((tmp_path / "xdg" / "audioldm2-recon" / "openvino" / digest).glob("*.blob"))
    assert not list(tiny_bundle.glob("*.blob"))


def test_auto_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec_module, "_onnxruntime_cuda", lambda: False)
    resolve = rec_module._resolve_backend
    assert resolve("auto", "cpu") == "openvino"
    assert resolve("auto", "auto") == "openvino"
    assert resolve("auto", "cuda") == "onnxruntime"
    assert resolve("auto", "cpu", "int8") == "onnxruntime"  # int8 graphs stay onnxruntime's
    assert resolve("auto", "cpu", "fp16") == "onnxruntime"
    assert resolve("auto", "cpu", "bf16") == "openvino"
    assert resolve("onnxruntime", "cpu") == "onnxruntime"
    monkeypatch.setattr(rec_module, "_onnxruntime_cuda", lambda: True)
    assert resolve("auto", "auto") == "onnxruntime"  # CUDA first
    monkeypatch.setattr(rec_module, "_onnxruntime_cuda", lambda: False)
    monkeypatch.setattr(rec_module, "_installed", lambda name: name != "openvino")
    assert resolve("auto", "cpu") == "onnxruntime"


def test_openvino_refuses_what_it_does_not_run(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="openvino backend runs on the CPU"):
        _load(tiny_bundle, tmp_path, backend="openvino", provider="cuda")
    with pytest.raises(ProviderError, match="not fp16"):
        _load(tiny_bundle, tmp_path, backend="openvino", precision="fp16")
    with pytest.raises(ProviderError, match="bf16 runs on the openvino backend only"):
        Reconstructor.load(tiny_bundle, provider="cpu", backend="onnxruntime", precision="bf16")


def test_bf16_refused_on_a_cpu_without_it(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def probe() -> tuple[bool, str]:
        asked.append(1)
        return False, "Test CPU: neither AVX512-BF16 nor AMX, so bf16 would be emulated (slower than fp32)"

    monkeypatch.setattr(ov_exec, "BF16_PROBE", probe)
    with pytest.raises(ProviderError) as e:
        _load(tiny_bundle, tmp_path, precision="bf16")
    assert "\n" not in str(e.value) and "bf16 refused: Test CPU" in str(e.value) and "--precision fp32" in str(e.value)
    assert asked
    assert _load(tiny_bundle, tmp_path, precision="fp32").precision == "fp32"  # fp32 never asks
    assert len(asked) == 1
    # the CLI: one line, non-zero exit, no traceback
    src = tmp_path / "in.wav"
    sf.write(str(src), tone(1.0), 16000)
    result = CliRunner().invoke(
        main,
        ["reconstruct", str(src), "-o", str(tmp_path / "o.wav"), "--model", str(tiny_bundle), "--precision", "bf16"],
    )
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if "bf16" in ln]
    assert lines and lines[0].startswith("error: bf16 refused: Test CPU"), result.output
    assert "Traceback" not in result.output


def test_probe_reads_openvino_and_the_cpu_flags(tmp_path: Path) -> None:
    ok, reason = ov_exec.probe_bf16()
    assert isinstance(ok, bool) and reason
    flags = ov_exec.cpu_flags()
    if flags is not None and not flags & {"avx512_bf16", "amx_bf16"}:
        assert not ok  # never emulated
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert ov_exec.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert ov_exec.cpu_flags(tmp_path / "missing") is None


@needs_bf16
def test_bf16_runs_the_plan_where_supported(tiny_bundle: Path, tmp_path: Path) -> None:
    rec = _load(tiny_bundle, tmp_path, precision="bf16")
    ref = _load(tiny_bundle, tmp_path, precision="fp32")
    assert (rec.backend, rec.precision) == ("openvino", "bf16")
    plan = ov_exec.stage_precisions("bf16")
    for role in ROLES:
        want = "bf16" if plan[role] == "bf16" else "f32"
        assert rec.executor.compiled(role).inference_precision == want
    audio = _audio()
    z, z32 = rec.encode(audio, 22050), ref.encode(audio, 22050)
    assert 0 < rel(z, z32) <= BF16_ENCODER_REL_L2_BUDGET  # really bf16, and close
    out = rec.reconstruct(audio, 22050)
    assert np.isfinite(out).all() and out.shape == ref.reconstruct(audio, 22050).shape


@pytest.mark.full
@torch_missing
@needs_bf16
def test_bf16_within_budget_on_the_full_architecture(full_bundle: Path) -> None:
    from recon_export.validate import bf16_errors
    from recon_runtime.contract import read_contract

    contract = read_contract(full_bundle)
    files = {r: full_bundle / contract.graph(r, FP32).file for r in ROLES}  # type: ignore[union-attr]
    errors = bf16_errors(files)
    assert errors["encoder_rel_l2"] <= BF16_ENCODER_REL_L2_BUDGET, errors
    assert errors["vocoder_log_mel_l1"] <= BF16_VOCODER_LOG_MEL_L1_BUDGET, errors
    check = contract.validation["bf16_openvino"]  # recorded by the export
    assert check["measured"] and check["passed"], check


def test_compiled_model_cache_is_reused(tiny_bundle: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _load(tiny_bundle, cache, stages=ROLES)
    assert first.executor.cache_hits == dict.fromkeys(ROLES, False)
    blobs = sorted(p.name for p in cache.glob("*.blob"))
    assert len(blobs) == len(ROLES)
    second = _load(tiny_bundle, cache, stages=ROLES)
    assert second.executor.cache_hits == dict.fromkeys(ROLES, True)
    assert sorted(p.name for p in cache.glob("*.blob")) == blobs
    audio = _audio()
    assert rel(second.reconstruct(audio, 22050), first.reconstruct(audio, 22050)) <= 1e-6
    off = Reconstructor.load(tiny_bundle, provider="cpu", compile_cache=False, stages=ROLES)
    assert off.executor.cache_dir is None and off.executor.cache_hits == dict.fromkeys(ROLES, False)


def test_default_cache_folder_is_per_bundle_digest(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    rec = Reconstructor.load(tiny_bundle, provider="cpu", stages=("vocoder",))
    assert rec.executor.cache_dir == tmp_path / "xdg" / "audioldm2-recon" / "openvino" / rec.contract.digest
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ov_exec.cache_root() == tmp_path / "home" / ".cache" / "audioldm2-recon" / "openvino"


def test_tampered_bundle_refused_with_a_warm_cache(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    cache = tmp_path / "cache"
    _load(bundle, cache, stages=ROLES)  # warm
    graph = bundle / "vocoder.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0xFF  # a weight byte
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        _load(bundle, cache, stages=ROLES)
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(BundleError, match="size"):
        _load(bundle, cache, stages=("vocoder",))


def test_metadata_read_with_openvino_alone(tiny_bundle: Path) -> None:
    from recon_runtime.contract import read_contract

    contract = read_contract(tiny_bundle)
    for role in ROLES:
        entry = contract.graph(role, FP32)
        meta = ov_exec.onnx_metadata(ov_exec.core().read_model(str(tiny_bundle / entry.file)))  # type: ignore[union-attr]
        expected = contract.metadata_props(entry)  # type: ignore[arg-type]
        assert {k: meta[k] for k in METADATA_KEYS_CHECKED} == {k: expected[k] for k in METADATA_KEYS_CHECKED}


def test_metadata_mismatch_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    # the decoder's file under the vocoder's name, with recon.json's hash and size updated to match
    import json

    from recon_runtime.contract import sha256_file

    shutil.copy(bundle / "decoder.fp32.onnx", bundle / "vocoder.fp32.onnx")
    data = json.loads((bundle / "recon.json").read_text())
    for g in data["graphs"]:
        if g["file"] == "vocoder.fp32.onnx":
            g["sha256"] = sha256_file(bundle / g["file"])
            g["size_bytes"] = (bundle / g["file"]).stat().st_size
    (bundle / "recon.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="recon.role"):
        _load(bundle, tmp_path / "cache", stages=("vocoder",))


@pytest.mark.parametrize("hint", ["latency", "throughput"])
def test_concurrent_calls_share_compiled_models(tiny_bundle: Path, tmp_path: Path, hint: str) -> None:
    rec = _load(tiny_bundle, tmp_path, performance_hint=hint)
    rng = np.random.default_rng(1)
    inputs = [(0.2 * rng.standard_normal(16000 + 1600 * i)).astype(np.float32) for i in range(6)]
    expected = [rec.reconstruct(a, 16000) for a in inputs]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = rec.reconstruct(inputs[i], 16000)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate(expected):
        assert rel(results[i], e) <= 1e-6


def test_unknown_performance_hint_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="performance hint"):
        _load(tiny_bundle, tmp_path, performance_hint="fastest", stages=("vocoder",))


def test_info_shows_the_bf16_measurement(tiny_bundle: Path) -> None:
    r = run_cli("recon-run", "info", "--model", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("bf16 check"))
    if BF16_OK:
        assert "encoder latents rel-L2" in line and "vocoder on real mels" in line
    else:
        assert "not measured on the exporting CPU" in line
