"""The runtime core: fixed after load, thread-safe, executors, window batching, fingerprints, overlap-add."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import recon_runtime
from recon_runtime import Reconstructor
from recon_runtime.contract import FP16, FP16_ARITHMETIC_KEY, FP32, read_contract
from recon_runtime.errors import BundleError, ProviderError
from recon_runtime.executors import ExecutorOptions
from recon_runtime.executors import onnxruntime as ort_exec
from recon_runtime.window_plan import plan_fitted_windows
from recon_runtime.windows import join_windows, window_weights

from .conftest import tone, torch_missing

REPO = Path(__file__).resolve().parents[1]
SAME_RESULT_ATOL = 1e-5  # the same windows through the same fp32 sessions, batched or not


def _state(rec: Reconstructor) -> dict:
    """Everything a call could change on a loaded Reconstructor (sessions excepted: created once)."""
    ex = rec.executor
    return {
        **{k: v for k, v in vars(rec).items() if k != "executor"},
        "executor": (type(ex), ex.provider, ex.precision, ex.options, ex.bundle_dir, ex.contract),
    }


def test_tests_run_the_checkout_not_an_installed_copy() -> None:
    assert Path(recon_runtime.__file__).resolve().is_relative_to(REPO / "src" / "recon_runtime"), recon_runtime.__file__


def test_eight_threads_on_a_fresh_instance_share_one_session_per_stage(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = [tone(0.6 + 0.1 * i, 16000, 200 + 90 * i) for i in range(8)]
    ort = {"provider": "cpu", "backend": "onnxruntime"}
    expected = [Reconstructor.load(tiny_bundle, **ort).reconstruct(a, 16000) for a in inputs]
    created: list[str] = []
    real_init = ort_exec.GraphSession.__init__

    def counting_init(self, bundle_dir, contract, entry, config, fixed_dims=None):  # type: ignore[no-untyped-def]
        created.append(entry.role)
        real_init(self, bundle_dir, contract, entry, config, fixed_dims)

    monkeypatch.setattr(ort_exec.GraphSession, "__init__", counting_init)
    rec = Reconstructor.load(tiny_bundle, **ort)
    before = _state(rec)
    barrier = threading.Barrier(8)

    def work(i: int) -> np.ndarray:
        barrier.wait()  # all threads hit the lazy session creation together
        return rec.reconstruct(inputs[i], 16000)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert sorted(created) == ["decoder", "encoder", "vocoder"]
    for got, want in zip(results, expected):  # each caller gets its own result back
        np.testing.assert_allclose(got, want, atol=SAME_RESULT_ATOL)
    assert _state(rec) == before


def test_calls_and_failed_calls_change_nothing_after_load(tiny_bundle: Path) -> None:
    rec = Reconstructor.load(tiny_bundle, provider="cpu")
    before = _state(rec)
    rec.reconstruct(tone(0.5, 16000), 16000)
    rec.decode(rec.encode(tone(0.4, 22050), 22050))
    rec.vocode(rec.features(tone(0.3, 16000), 16000).log_mel)
    with pytest.raises(recon_runtime.NumericalError):
        rec.decode(np.full((8, 4, 16), 3e38, np.float32))
    assert _state(rec) == before
    assert rec.loaded_stages == ["encoder", "decoder", "vocoder"]


def test_sessions_asked_for_at_load_exist_after_load(tiny_bundle: Path) -> None:
    rec = Reconstructor.load(tiny_bundle, provider="cpu", stages=("decoder", "vocoder"))
    assert rec.loaded_stages == ["decoder", "vocoder"]
    assert Reconstructor.load(tiny_bundle, provider="cpu").loaded_stages == []


def test_windows_from_several_callers_batch_into_one_run(tiny_bundle: Path) -> None:
    rec = Reconstructor.load(tiny_bundle, provider="cpu", window_frames=256, overlap_frames=32)
    a = rec.features(tone(6.0, 16000, 330), 16000)
    b = rec.features(tone(4.0, 16000, 700, 0.1), 16000)
    alone = [rec.run_jobs([rec.reconstruction_job(f)])[0][0] for f in (a, b)]
    jobs = [rec.reconstruction_job(a), rec.reconstruction_job(b)]
    assert {jobs[0].key(i) for i in range(len(jobs[0].windows))} == {jobs[1].key(0)}  # one shape for all
    # every window of both callers in one graph run, in an interleaved order, then joined per caller
    order = [(j, i) for i in range(max(len(job.windows) for job in jobs)) for j in (1, 0) if i < len(jobs[j].windows)]
    outs = rec.run_windows(jobs[0].roles, [jobs[j].windows[i] for j, i in order])
    per_job: list[dict[int, list[np.ndarray]]] = [{}, {}]
    for (j, i), out in zip(order, outs):
        per_job[j][i] = out
    # each caller's log-mel join (its windows end at the decoder), then its one vocoder pass
    for j, job in enumerate(jobs):
        joined = rec.join(job, [per_job[j][i] for i in range(len(job.windows))])
        vocoding = rec.vocoder_pass(job, joined)
        assert vocoding is not None
        (wave,) = rec.join(vocoding, rec.run_windows(vocoding.roles, list(vocoding.windows)))
        np.testing.assert_allclose(wave, alone[j], atol=SAME_RESULT_ATOL)
    with pytest.raises(ValueError, match="share a shape"):
        rec.run_windows(jobs[0].roles, [jobs[0].windows[0], jobs[0].windows[0][:, :128]])


def test_vocode_matches_the_vocoder_graph_and_windows_long_mels(tiny_bundle: Path) -> None:
    rec = Reconstructor.load(tiny_bundle, provider="cpu", window_frames=256, overlap_frames=32)
    mel = rec.features(tone(1.0, 16000, 440), 16000).log_mel
    (direct,) = rec.run_graphs(("vocoder",), mel[None])
    np.testing.assert_allclose(rec.vocode(mel), direct[0, : mel.shape[0] * 160], atol=SAME_RESULT_ATOL)
    long = rec.features(tone(7.0, 16000, 440), 16000).log_mel  # 701 frames: three windows
    assert rec.vocode(long).shape == (long.shape[0] * 160,)
    assert rec.vocode(np.stack([mel, mel])).shape == (2, mel.shape[0] * 160)
    for bad, text in ((mel[:, :60], "log-mel must be"), (np.full_like(mel, np.nan), "NaN")):
        with pytest.raises(recon_runtime.AudioInputError, match=text):
            rec.vocode(bad)


def test_captured_chain_results_are_owned_and_threads_get_their_own(tiny_bundle: Path) -> None:
    contract = read_contract(tiny_bundle)
    roles = ("encoder", "decoder", "vocoder")
    shape = (1, 1, 64, 64)
    chain = ort_exec.FixedShapeChain(
        tiny_bundle, contract, [contract.graph(r, FP32) for r in roles], ort_exec.SessionConfig(), shape
    )
    rec = Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32", backend="onnxruntime")
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-11.5, 1.0, shape).astype(np.float32) for _ in range(32)]
    want = [rec.run_graphs(roles, x)[0] for x in xs]
    first = chain.run(xs[0])[0]
    kept = first.copy()
    chain.run(xs[1])
    np.testing.assert_array_equal(first, kept)  # the next call did not overwrite the first result
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda x: chain.run(x)[0], xs))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=SAME_RESULT_ATOL)


def test_captured_chain_executor_bounds_its_caches(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the CUDA executor's captured chains, exercised on the CPU (IO binding works there too)
    monkeypatch.setattr(ort_exec.OrtCudaExecutor, "_run", ort_exec.OrtExecutor._run)
    contract = read_contract(tiny_bundle)
    ex = ort_exec.CapturedChainExecutor(tiny_bundle, contract, "cpu", FP32, ExecutorOptions(cuda_graph=True))
    plain = ort_exec.OrtExecutor(tiny_bundle, contract, "cpu", FP32, ExecutorOptions())
    rng = np.random.default_rng(1)
    for frames in range(4, 4 * (ort_exec.MAX_TRACKED_SHAPES + 10), 4):  # many shapes, each seen once
        ex.run(("vocoder",), rng.uniform(-11.5, 0, (1, frames, 64)).astype(np.float32))
    assert len(ex._seen) <= ort_exec.MAX_TRACKED_SHAPES and not ex._chains
    for frames in (32, 48, 64, 32, 48, 64):  # seen twice: captured, up to the cap
        x = rng.uniform(-11.5, 0, (2, frames, 64)).astype(np.float32)
        np.testing.assert_allclose(ex.run(("vocoder",), x)[0], plain.run(("vocoder",), x)[0], atol=SAME_RESULT_ATOL)
    assert len(ex._chains) == ort_exec.MAX_CAPTURED_SHAPES


@pytest.mark.parametrize("window", [16, 64, 256, 512, 1024])
def test_overlap_add_is_exact_for_any_window_overlap_and_length(window: int) -> None:
    """Every window returns its slice of one signal: the join must give the signal back exactly."""
    for overlap in sorted({0, 4, window // 4 // 4 * 4, window // 2, window - 4} - {window}):
        for total in sorted({4, window, window + overlap, window + overlap + 4, 3 * window - 8, 772, 2000}):
            if total % 4 or overlap >= window:
                continue
            spans = plan_fitted_windows(total, window, overlap, 4, 4)
            signal = np.random.default_rng(total).standard_normal(total * 10).astype(np.float32)
            pieces = [signal[None, s * 10 : e * 10] for s, e in spans]
            out = join_windows(total, spans, pieces, 10)
            np.testing.assert_allclose(out[0], signal, rtol=1e-5, atol=1e-5, err_msg=f"{window}/{overlap}/{total}")


def test_weights_of_an_end_aligned_window_overlapping_two_are_normalised() -> None:
    spans = [(0, 512), (256, 768), (260, 772)]  # an end-aligned last window overlaps both earlier ones
    assert len(spans) == 3 and spans[-1][0] < spans[0][1]
    raw = np.zeros(772 * 10)
    for (s, _), w in zip(spans, window_weights(spans, 10)):
        raw[s * 10 : s * 10 + w.size] += w
    assert raw.max() > 1.001  # the raw cross-fade weights overshoot here ...
    ones = join_windows(772, spans, [np.ones((1, (e - s) * 10), np.float32) for s, e in spans], 10)
    np.testing.assert_allclose(ones, 1.0, atol=1e-6)  # ... the join does not


def _with_fp16_check(contract, passed: bool | None):  # type: ignore[no-untyped-def]
    validation = dict(contract.validation)
    validation.pop(FP16_ARITHMETIC_KEY, None)
    if passed is not None:
        validation[FP16_ARITHMETIC_KEY] = {"passed": passed}
    return dataclasses.replace(contract, validation=validation)


def test_auto_picks_fp16_on_cuda_only_when_the_fp16_arithmetic_check_passed(tiny_bundle: Path) -> None:
    from recon_runtime.executors.select import choose_precision

    contract = read_contract(tiny_bundle)
    assert contract.fp16_arithmetic_passed  # the export measured it (tiny weights pass)
    check = contract.validation[FP16_ARITHMETIC_KEY]
    assert check["frames"] == 1024 and set(check["results"]) == {"encoder", "decoder", "vocoder"}
    assert choose_precision(_with_fp16_check(contract, True), "auto", "cuda", tiny_bundle) == FP16
    assert choose_precision(_with_fp16_check(contract, False), "auto", "cuda", tiny_bundle) == FP32
    assert choose_precision(_with_fp16_check(contract, None), "auto", "cuda", tiny_bundle) == FP32
    assert choose_precision(contract, "auto", "cpu", tiny_bundle) == FP32
    assert choose_precision(_with_fp16_check(contract, False), "fp16", "cuda", tiny_bundle) == FP16  # asked for


def test_cuda_that_does_not_start_fails_when_asked_and_falls_back_once_on_auto(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the failure path is checked on CPU-only builds")
    with pytest.raises(ProviderError, match="CUDA provider is not in this onnxruntime build"):
        Reconstructor.load(tiny_bundle, provider="cuda")
    # pretend the build offers CUDA: onnxruntime then falls back to the CPU inside the session
    monkeypatch.setattr(ort_exec, "cuda_available", lambda: True)
    with pytest.raises(ProviderError, match="CUDA provider did not start"):
        Reconstructor.load(tiny_bundle, provider="cuda")
    caplog.set_level("WARNING", logger="recon_runtime")
    rec = Reconstructor.load(tiny_bundle)
    assert (rec.provider, rec.precision) == ("cpu", "fp32")
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "CUDA did not start" in r.message)
    ) == 1
    before = _state(rec)
    rec.reconstruct(tone(0.3, 16000), 16000)
    assert _state(rec) == before


def test_expect_digest_pins_a_bundle_even_against_a_matching_recon_json(tiny_bundle: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from recon_runtime.contract import CONTRACT_FILE, sha256_file

    digest = read_contract(tiny_bundle).digest
    assert len(digest) == 16
    assert Reconstructor.load(tiny_bundle, provider="cpu", expect_digest=digest).contract.digest == digest
    with pytest.raises(BundleError, match=f"digest is {digest}, expected 0000"):
        Reconstructor.load(tiny_bundle, provider="cpu", expect_digest="0000000000000000")
    # a deliberate edit: one graph replaced and recon.json updated to match; hashes pass, the pin does not
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    shutil.copy(bundle / "decoder.fp16.onnx", bundle / "decoder.fp32.onnx")
    raw = json.loads((bundle / CONTRACT_FILE).read_text())
    for g in raw["graphs"]:
        if g["file"] == "decoder.fp32.onnx":
            g["sha256"], g["size_bytes"] = sha256_file(bundle / g["file"]), (bundle / g["file"]).stat().st_size
    (bundle / CONTRACT_FILE).write_text(json.dumps(raw))
    assert read_contract(bundle).fingerprint == read_contract(tiny_bundle).fingerprint
    with pytest.raises(BundleError, match="not the bundle you pinned"):
        Reconstructor.load(bundle, provider="cpu", expect_digest=digest)


@torch_missing
def test_fingerprint_follows_the_decoding_weights_not_the_folder(tmp_path: Path) -> None:
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import build_random, load_checkpoint, save_checkpoint

    def export(ckpt_dir: Path, seed: int, out: str) -> str:
        save_checkpoint(build_random("tiny", seed), ckpt_dir)
        return export_bundle(
            load_checkpoint(str(ckpt_dir)), tmp_path / out, precisions=(FP32,), validate=False
        ).fingerprint

    same_a = export(tmp_path / "one", 5, "a")
    same_b = export(tmp_path / "two", 5, "b")  # the same weights from another folder
    other = export(tmp_path / "one", 6, "c")  # other weights from the first folder
    assert same_a == same_b
    assert other != same_a


def test_a_refused_capture_falls_back_once_with_the_same_results(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ort_exec.OrtCudaExecutor, "_run", ort_exec.OrtExecutor._run)

    def refuse(self, x):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA graph capture is not supported for this graph")

    monkeypatch.setattr(ort_exec.FixedShapeChain, "run", refuse)
    contract = read_contract(tiny_bundle)
    ex = ort_exec.CapturedChainExecutor(tiny_bundle, contract, "cpu", FP32, ExecutorOptions(cuda_graph=True))
    plain = ort_exec.OrtExecutor(tiny_bundle, contract, "cpu", FP32, ExecutorOptions())
    caplog.set_level("WARNING", logger="recon_runtime")
    x = np.random.default_rng(2).uniform(-11.5, 0, (1, 32, 64)).astype(np.float32)
    for _ in range(4):  # the second call builds the chain, its run is refused, every call still answers
        np.testing.assert_allclose(ex.run(("vocoder",), x)[0], plain.run(("vocoder",), x)[0], atol=SAME_RESULT_ATOL)
    assert ex._capture_failed and not ex._chains
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1


def test_a_chain_whose_sessions_do_not_start_disables_capture(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort_exec.OrtCudaExecutor, "_run", ort_exec.OrtExecutor._run)

    def no_cuda(self, *a, **k):  # type: ignore[no-untyped-def]
        raise ProviderError("the CUDA provider did not start (out of memory for a second copy)")

    monkeypatch.setattr(ort_exec.FixedShapeChain, "__init__", no_cuda)
    contract = read_contract(tiny_bundle)
    ex = ort_exec.CapturedChainExecutor(tiny_bundle, contract, "cpu", FP32, ExecutorOptions(cuda_graph=True))
    x = np.random.default_rng(3).uniform(-11.5, 0, (1, 16, 64)).astype(np.float32)
    for _ in range(3):
        assert ex.run(("vocoder",), x)[0].shape == (1, 16 * 160 + 32)
    assert ex._capture_failed
