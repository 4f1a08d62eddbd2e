"""The OpenVINO backend: exact fp32, bf16 only where the CPU computes it, compiled-model cache, checks kept."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("openvino", reason="the OpenVINO backend needs the `openvino` extra (pip install '.[openvino]')")
pytest.importorskip("onnxruntime", reason="the comparisons run onnxruntime too (the `cpu` extra)")

from click.testing import CliRunner  # noqa: E402

from recon_runtime import Reconstructor  # noqa: E402
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
from recon_runtime.executors import select  # noqa: E402

from .conftest import run_cli, tone, torch_missing  # noqa: E402

BF16_OK, BF16_REASON = ov_exec.probe_bf16()
needs_bf16 = pytest.mark.skipif(not BF16_OK, reason=f"this CPU does not compute bf16 in hardware: {BF16_REASON}")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _load(bundle: Path, cache: Path, **kw: object) -> Reconstructor:
    kw.setdefault("provider", "cpu")
    kw.setdefault("backend", "openvino")  # auto runs onnxruntime at fp32
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
    """auto: OpenVINO for bf16 only; fp32 on the CPU runs onnxruntime, the leaner engine for the same
    speed (docs/performance.md#memory), even with the openvino extra installed."""
    resolve = select.resolve_backend
    both = ("fp16", "fp32")
    assert select._installed("openvino") and select._installed("onnxruntime")
    assert resolve("auto", "cpu", "auto", both) == "onnxruntime"
    assert resolve("auto", "cpu", "fp32", both) == "onnxruntime"
    assert resolve("auto", "auto", "auto", both) == "onnxruntime"
    assert resolve("auto", "cuda", "auto", both) == "onnxruntime"
    assert resolve("auto", "cpu", "int8", both) == "onnxruntime"  # int8 graphs stay onnxruntime's
    assert resolve("auto", "cpu", "fp16", both) == "onnxruntime"
    assert resolve("auto", "cpu", "bf16", both) == "openvino"  # only OpenVINO runs bf16
    assert resolve("openvino", "cpu", "auto", both) == "openvino"  # asked for, it is used
    assert resolve("onnxruntime", "cpu", "auto", both) == "onnxruntime"
    # only the openvino extra installed: auto runs what OpenVINO can (fp32 graphs on the CPU) there
    monkeypatch.setattr(select, "_installed", lambda name: name != "onnxruntime")
    assert resolve("auto", "cpu", "auto", both) == "openvino"
    assert resolve("auto", "auto", "fp32", both) == "openvino"
    assert resolve("auto", "cpu", "auto", ("fp16",)) == "onnxruntime"  # onnxruntime then says to install it
    assert resolve("auto", "cuda", "auto", both) == "onnxruntime"


def test_auto_loads_onnxruntime_at_fp32_and_openvino_for_bf16(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Reconstructor.load(tiny_bundle, provider="cpu")  # backend and precision auto, openvino installed
    assert (rec.backend, rec.provider, rec.precision) == ("onnxruntime", "cpu", "fp32")
    src = tmp_path / "in.wav"
    sf.write(str(src), tone(0.5), 16000)
    r = run_cli("recon-run", "reconstruct", str(src), "-o", str(tmp_path / "out.wav"), "--model", str(tiny_bundle))
    assert r.returncode == 0 and "(onnxruntime on CPU: fp32 graphs)" in r.stderr, r.stderr  # the CLI's default path
    monkeypatch.setattr(ov_exec, "BF16_PROBE", lambda: (True, "Test CPU: AVX512-BF16"))
    rec = _load(tiny_bundle, tmp_path / "cache", precision="bf16", stages=("vocoder",))
    assert (rec.backend, rec.precision) == ("openvino", "bf16")


def _bundle_copy(tiny_bundle: Path, dest: Path, edit: Any) -> Path:
    """A copy of the tiny bundle whose recon.json went through `edit(data)` (and whose dropped graphs are deleted)."""
    shutil.copytree(tiny_bundle, dest)
    data = json.loads((dest / "recon.json").read_text())
    edit(data)
    kept = {g["file"] for g in data["graphs"]}
    for graph in dest.glob("*.onnx"):
        if graph.name not in kept:
            graph.unlink()
    (dest / "recon.json").write_text(json.dumps(data))
    return dest


def test_auto_runs_a_bundle_without_fp32_graphs_on_onnxruntime(tiny_bundle: Path, tmp_path: Path) -> None:
    def drop_fp32(data: dict[str, Any]) -> None:
        data["graphs"] = [g for g in data["graphs"] if g["precision"] != "fp32"]

    bundle = _bundle_copy(tiny_bundle, tmp_path / "fp16-only", drop_fp32)
    assert not list(bundle.glob("*.fp32.onnx"))
    rec = Reconstructor.load(bundle, provider="cpu")  # backend auto, openvino installed
    assert (rec.backend, rec.precision) == ("onnxruntime", "fp16")
    out = rec.reconstruct(tone(0.5), 16000)
    assert np.isfinite(out).all() and out.shape == (8000,)
    with pytest.raises(BundleError, match="has none"):  # asked for explicitly, openvino still says why not
        _load(bundle, tmp_path / "cache", backend="openvino")


def _with_bf16_check(check: dict[str, Any] | None) -> Any:
    def edit(data: dict[str, Any]) -> None:
        if check is None:
            data["validation"].pop("bf16_openvino", None)
        else:
            data["validation"]["bf16_openvino"] = check

    return edit


OVER_BUDGET = {
    "measured": True,
    "budgets": {"encoder_rel_l2": 0.03, "vocoder_log_mel_l1": 0.05},
    "results": {"encoder_rel_l2": 0.011, "vocoder_log_mel_l1": 0.1312, "decoder_rel_l2": 0.02, "chain_log_mel_l1": 0.2},
    "f32_stages": [],
    "passed": False,
}


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        (
            OVER_BUDGET,
            ["check at export did not pass", "1.10% (budget 3.00%)", "0.1312 nats (budget 0.0500 nats, OVER)"],
        ),
        ({"measured": False, "reason": "Test CPU: no bf16"}, ["not measured at export (Test CPU: no bf16)", "0.05"]),
        (None, ["not measured at export (the bundle records no bf16 check)"]),
        ({**OVER_BUDGET, "passed": True}, None),
    ],
)
def test_bf16_load_warns_when_the_recorded_check_did_not_pass(
    tiny_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    check: dict[str, Any] | None,
    expected: list[str] | None,
) -> None:
    monkeypatch.setattr(ov_exec, "BF16_PROBE", lambda: (True, "Test CPU: AVX512-BF16"))
    bundle = _bundle_copy(tiny_bundle, tmp_path / "bundle", _with_bf16_check(check))
    caplog.set_level(logging.INFO, logger="recon_runtime")
    rec = _load(bundle, tmp_path / "cache", precision="bf16")  # nothing compiled: any CPU
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "bf16" in r.getMessage()]
    if expected is None:
        assert not warnings
    else:
        assert len(warnings) == 1 and "\n" not in warnings[0], warnings
        assert all(e in warnings[0] for e in expected), warnings[0]
    assert rec.executor.describe() == "openvino on CPU: fp32 graphs at bf16 inference precision"
    using = [r.getMessage() for r in caplog.records if r.getMessage().startswith("using ")]
    assert using and "using CPU with fp32 graphs" in using[-1] and "bf16 graphs" not in using[-1]
    assert "(openvino on CPU: fp32 graphs at bf16 inference precision)" in using[-1]


def test_load_log_names_backend_and_what_runs(
    tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="recon_runtime")
    _load(tiny_bundle, tmp_path, backend="openvino", precision="fp32")
    Reconstructor.load(tiny_bundle, provider="cpu", backend="onnxruntime", precision="fp16")
    using = [r.getMessage() for r in caplog.records if r.getMessage().startswith("using ")]
    assert "(openvino on CPU: fp32 graphs at f32 inference precision)" in using[0]
    assert using[1].startswith("using CPU with fp16 graphs") and using[1].endswith("(onnxruntime on CPU: fp16 graphs)")


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


def test_bf16_decision_from_capabilities_and_flags() -> None:
    decide = ov_exec.decide_bf16
    caps = ["BF16", "FP32", "INT8"]
    ok, why = decide(caps, {"avx2", "avx512f"}, "Test CPU")
    assert not ok and "neither AVX512-BF16 nor AMX" in why  # OpenVINO says BF16, the hardware does not
    ok, why = decide(caps, None, "Test CPU")
    assert not ok and "could not be read" in why  # unreadable flags: refused, whatever OpenVINO lists
    ok, why = decide(["FP32", "INT8"], {"avx512_bf16"}, "Test CPU")
    assert not ok and "OpenVINO lists no bf16" in why
    assert decide(["FP32"], None)[0] is False
    assert decide(caps, {"avx512f", "avx512_bf16"}, "Test CPU") == (True, "Test CPU: AVX512-BF16")
    assert decide(caps, {"avx512_bf16", "amx_bf16", "amx_tile"}, "Test CPU") == (True, "Test CPU: AMX")
    for _, reason in (decide(caps, None), decide(caps, set())):
        assert "\n" not in reason


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
    off = Reconstructor.load(tiny_bundle, provider="cpu", backend="openvino", compile_cache=False, stages=ROLES)
    assert off.executor.cache_dir is None and off.executor.cache_hits == dict.fromkeys(ROLES, False)


def test_default_cache_folder_is_per_bundle_digest(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    rec = Reconstructor.load(tiny_bundle, provider="cpu", backend="openvino", stages=("vocoder",))
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


class _CountingModel:
    """A compiled model that counts (and slows) request creation, so that concurrent calls overlap."""

    def __init__(self, compiled: Any):
        self._compiled = compiled
        self.created = 0

    def create_infer_request(self) -> Any:
        self.created += 1
        time.sleep(0.05)
        return self._compiled.create_infer_request()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)


@pytest.mark.parametrize("hint", ["latency", "throughput"])
def test_request_pool_is_bounded(tiny_bundle: Path, tmp_path: Path, hint: str) -> None:
    rec = _load(tiny_bundle, tmp_path, performance_hint=hint, stages=("vocoder",))
    stage = rec.executor.compiled("vocoder")
    bound = int(stage.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    assert stage.max_requests == max(1, bound)
    counting = _CountingModel(stage.compiled)
    stage.compiled = counting
    rng = np.random.default_rng(2)
    mels = [rng.standard_normal((1, 40 + 3 * i, 64)).astype(np.float32) - 4 for i in range(bound + 4)]
    expected = [stage.run(m)[0] for m in mels]  # serial
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(mels))

    def work(i: int) -> None:
        start.wait()
        results[i] = stage.run(mels[i])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(mels))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert 1 <= counting.created <= stage.max_requests < len(mels)
    for i, e in enumerate(expected):
        assert rel(results[i], e) <= 1e-6


def test_unknown_performance_hint_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="performance hint"):
        _load(tiny_bundle, tmp_path, performance_hint="fastest", stages=("vocoder",))
    # checked at load, before anything compiles, whatever the backend
    for backend in ("openvino", "onnxruntime", "auto"):
        with pytest.raises(ProviderError) as e:
            _load(tiny_bundle, tmp_path, backend=backend, performance_hint="fastest")
        assert str(e.value) == "unknown performance hint 'fastest'; use latency, throughput"


def test_onnxruntime_refuses_openvino_settings(
    tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ProviderError, match="throughput performance hint is an openvino setting") as e:
        Reconstructor.load(tiny_bundle, provider="cpu", backend="onnxruntime", performance_hint="throughput")
    assert "\n" not in str(e.value)
    with pytest.raises(ProviderError, match="cache folder is an openvino setting"):
        Reconstructor.load(tiny_bundle, provider="cpu", backend="onnxruntime", cache_dir=tmp_path)
    # the defaults are fine: latency is what onnxruntime does anyway, and it caches nothing
    rec = Reconstructor.load(
        tiny_bundle, provider="cpu", backend="onnxruntime", performance_hint="latency", compile_cache=False
    )
    assert rec.backend == "onnxruntime"
    # under auto the settings are openvino preferences: dropped, with a line, when auto picks onnxruntime
    caplog.set_level(logging.INFO, logger="recon_runtime")
    rec = Reconstructor.load(
        tiny_bundle, provider="cpu", precision="fp16", performance_hint="throughput", cache_dir=tmp_path
    )
    assert rec.backend == "onnxruntime"
    assert "auto picked onnxruntime, which has no performance hint nor cache folder: ignored" in caplog.text


def test_cli_performance_hint_and_compile_cache(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    seen: list[dict[str, Any]] = []
    real_load = Reconstructor.load.__func__  # type: ignore[attr-defined]

    def load(cls: type, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(Reconstructor, "load", classmethod(load))
    src = tmp_path / "in.wav"
    sf.write(str(src), tone(1.0), 16000)
    base = ["--model", str(tiny_bundle), "--provider", "cpu"]
    runner = CliRunner()
    r = runner.invoke(
        main,
        ["reconstruct", str(src), "-o", str(tmp_path / "t.wav"), *base, "--backend", "openvino",
         "--performance-hint", "throughput", "--no-compile-cache"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "t.wav").is_file()
    assert seen[-1]["performance_hint"] == "throughput" and seen[-1]["compile_cache"] is False
    assert not (tmp_path / "xdg").exists()  # no cache written
    r = runner.invoke(main, ["encode", str(src), "-o", str(tmp_path / "z"), *base, "--backend", "openvino"])
    assert r.exit_code == 0, r.output
    assert seen[-1]["performance_hint"] is None and seen[-1]["compile_cache"] is True  # the runtime's: latency
    assert list((tmp_path / "xdg").rglob("*.blob"))
    r = runner.invoke(
        main, ["reconstruct", str(src), "-o", str(tmp_path / "b.wav"), *base, "--performance-hint", "fast"]
    )
    assert r.exit_code == 2 and "Invalid value for '--performance-hint'" in r.output
    r = runner.invoke(
        main,
        ["reconstruct", str(src), "-o", str(tmp_path / "o.wav"), *base, "--backend", "onnxruntime",
         "--performance-hint", "throughput"],
    )  # fmt: skip
    assert r.exit_code != 0 and "error: the throughput performance hint is an openvino setting" in r.output
    assert "Traceback" not in r.output
    for command in (["decode"], ["vocode"], ["dataset", "encode"], ["dataset", "reconstruct"]):
        help_text = runner.invoke(main, [*command, "--help"]).output
        assert "--performance-hint" in help_text and "--no-compile-cache" in help_text, command


@torch_missing
def test_bf16_measurement_failure_does_not_abort_the_export(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from recon_export import validate

    def broken(files: dict[str, Path]) -> dict[str, float]:
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:112:\ncompile failed")

    monkeypatch.setattr(ov_exec, "BF16_PROBE", lambda: (True, "Test CPU: AVX512-BF16"))
    monkeypatch.setattr(validate, "bf16_errors", broken)
    caplog.set_level(logging.WARNING)
    check = validate.bf16_check({})
    assert check["measured"] is False
    assert check["reason"].startswith("the optional bf16 measurement failed while measuring: RuntimeError: Exception")
    assert "\n" not in check["reason"]
    assert any(r.levelno == logging.WARNING and "bf16 measurement failed" in r.getMessage() for r in caplog.records)

    def probe_fails() -> tuple[bool, str]:
        raise RuntimeError("CPU plugin gone")

    monkeypatch.setattr(ov_exec, "BF16_PROBE", probe_fails)
    assert validate.bf16_check({})["reason"].endswith("RuntimeError: CPU plugin gone")


def test_info_shows_the_bf16_measurement(tiny_bundle: Path) -> None:
    r = run_cli("recon-run", "info", "--model", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("bf16 check"))
    if BF16_OK:
        assert "encoder latents rel-L2" in line and "vocoder on real mels" in line
    else:
        assert "not measured on the exporting CPU" in line
