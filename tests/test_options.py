"""The model options are defined once: every command that loads a bundle (the file commands, dataset
jobs and `serve`) offers `LoadOptions`' fields with the runtime's own choices and defaults, and what
a user picks there reaches `Reconstructor.load`."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest

from recon_runtime import Reconstructor
from recon_runtime.cli import main
from recon_runtime.executors.base import PERFORMANCE_HINTS
from recon_runtime.executors.select import BACKEND_CHOICES, PRECISION_CHOICES, PROVIDER_CHOICES
from recon_runtime.options import LoadOptions

CHOICES = {
    "backend": BACKEND_CHOICES,
    "provider": PROVIDER_CHOICES,
    "precision": PRECISION_CHOICES,
    "performance_hint": PERFORMANCE_HINTS,
}
NOT_USER_OPTIONS = {
    "bundle_dir",
    "stages",
    "window_frames",
    "overlap_frames",
    "bucket_frames",
    "cpu_arena",
    "cache_dir",
}
"""`Reconstructor.load` arguments no command offers as a model option: the bundle is `model`, stages
are the command's, windowing is fixed, the arena and the cache folder are the engine's defaults
(serve has its own --bucket-frames)."""
SERVE_MISSING = [
    m for m in ("fastapi", "uvicorn", "httpx", "prometheus_client", "multipart") if not importlib.util.find_spec(m)
]
needs_serve = pytest.mark.skipif(bool(SERVE_MISSING), reason=f"serve needs the `serve` extra ({SERVE_MISSING} missing)")


def _commands() -> dict[str, click.Command]:
    dataset = main.commands["dataset"]
    assert isinstance(dataset, click.Group)
    cmds = {name: main.commands[name] for name in ("reconstruct", "encode", "decode", "vocode", "serve")}
    cmds |= {f"dataset {name}": dataset.commands[name] for name in ("encode", "reconstruct", "evaluate")}
    return cmds


def _described(param: click.Parameter) -> dict[str, Any]:
    """What a user sees of an option: its flags, choices, default, and whether it is a flag."""
    choices = tuple(param.type.choices) if isinstance(param.type, click.Choice) else None
    return {
        "opts": tuple(param.opts),
        "secondary": tuple(param.secondary_opts),
        "choices": choices,
        "default": param.default,
        "flag": getattr(param, "is_flag", False),
        "type": type(param.type).__name__,
    }


def test_every_command_offers_the_load_options_with_the_runtimes_choices_and_defaults() -> None:
    load = inspect.signature(Reconstructor.load).parameters
    names = [f.name for f in fields(LoadOptions)]
    # every user setting of Reconstructor.load is a LoadOptions field (a new argument must be classified)
    assert set(load) - {"cls"} == (set(names) - {"model"}) | NOT_USER_OPTIONS
    defaults = LoadOptions()
    for name in names:
        if name != "model":
            assert getattr(defaults, name) == load[name].default, name

    seen: dict[str, dict[str, Any]] = {}
    for cmd_name, cmd in _commands().items():
        params = {p.name: p for p in cmd.params}
        missing = [n for n in names if n not in params]
        assert not missing, f"{cmd_name} lacks {missing}"
        described = {n: _described(params[n]) for n in names}
        for name, choices in CHOICES.items():
            assert described[name]["choices"] == tuple(choices), (cmd_name, name)
        for name in names:
            assert described[name]["default"] == getattr(defaults, name), (cmd_name, name)
        if seen:
            first = next(iter(seen))
            assert described == seen[first], f"{cmd_name}'s model options differ from {first}'s"
        seen[cmd_name] = described


def test_load_options_refuse_what_the_runtime_refuses() -> None:
    from recon_runtime.errors import ProviderError

    with pytest.raises(ProviderError, match="unknown precision 'bf17'; use auto, bf16, fp16, fp32, int8"):
        LoadOptions(precision="bf17")
    with pytest.raises(ValueError, match="max_batch"):
        LoadOptions(max_batch=0)
    assert LoadOptions(model="x").model == Path("x")  # type: ignore[arg-type]


def test_the_options_reach_reconstructor_load(tiny_bundle: Path) -> None:
    rec = LoadOptions(tiny_bundle, "onnxruntime", "cpu", "fp32", 1, max_batch=3).load(("vocoder",))
    assert (rec.backend, rec.provider, rec.precision, rec.max_batch) == ("onnxruntime", "cpu", "fp32", 3)
    assert rec.loaded_stages == ["vocoder"]


def test_the_server_config_reads_the_same_options_from_the_environment() -> None:
    pytest.importorskip("fastapi", reason="the server needs the `serve` extra")
    from recon_runtime.serving.config import ServerConfig

    assert issubclass(ServerConfig, LoadOptions)
    # booleans as a user writes them (1/0 alone cannot tell strict parsing from "anything else is False")
    env = {"RECON_PRECISION": "bf16", "RECON_MAX_BATCH": "2", "RECON_CUDA_GRAPH": "On", "RECON_MODEL": "/m"}
    env |= {"RECON_PERFORMANCE_HINT": "latency", "RECON_EXPECT_DIGEST": "abc", "RECON_COMPILE_CACHE": "false "}
    c = ServerConfig.from_env(env)
    want = LoadOptions(
        Path("/m"), precision="bf16", max_batch=2, cuda_graph=True, performance_hint="latency",
        expect_digest="abc", compile_cache=False,
    )  # fmt: skip
    assert LoadOptions(**{f.name: getattr(c, f.name) for f in fields(LoadOptions)}) == want
    assert ServerConfig().max_batch is None  # the runtime's per-device default


# ---------------------------------------------------------------------- serve --precision bf16
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(bundle: Path, tmp: Path, *args: str, pinned_no_bf16: bool = False) -> subprocess.Popen:
    """`recon-run serve` in a subprocess (optionally with the bf16 probe pinned to refuse)."""
    port = _free_port()
    cli = ["serve", "--model", str(bundle), "--provider", "cpu", "--threads", "1", "--port", str(port), *args]
    if pinned_no_bf16:
        code = (
            "import sys; import recon_runtime.executors.openvino as ov; "
            "ov.BF16_PROBE = lambda: (False, 'Pinned CPU: neither AVX512-BF16 nor AMX'); "
            "from recon_runtime.cli import main; main(sys.argv[1:], prog_name='recon-run')"
        )
        cmd = [sys.executable, "-c", code, *cli]
    else:
        cmd = [str(Path(sys.executable).with_name("recon-run")), *cli]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}
    with open(tmp / f"serve-{port}.log", "wb") as log:  # a file, never a pipe that could fill
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    proc.port = port  # type: ignore[attr-defined]
    proc.log = tmp / f"serve-{port}.log"  # type: ignore[attr-defined]
    return proc


def _wait_info(proc: subprocess.Popen, timeout: float = 120) -> dict[str, Any] | None:
    """/v1/info once ready, or None when the server exited first."""
    import httpx

    url = f"http://127.0.0.1:{proc.port}"  # type: ignore[attr-defined]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return None
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return httpx.get(url + "/v1/info", timeout=10).json()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"serve neither ready nor exited in {timeout} s")


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    """Stop the server (SIGTERM, then SIGKILL past 30 s); its exit status and stderr."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    return proc.returncode, proc.log.read_text()  # type: ignore[attr-defined]


@needs_serve
def test_serve_precision_bf16_reaches_reconstructor_load(tiny_bundle: Path, tmp_path: Path) -> None:
    """Accepted where the CPU computes bf16, refused with the runtime's one line where it does not."""
    ov = pytest.importorskip("recon_runtime.executors.openvino", reason="bf16 runs on the `openvino` extra")
    supported, reason = ov.probe_bf16()
    proc = _serve(tiny_bundle, tmp_path, "--precision", "bf16")
    try:
        info = _wait_info(proc)
    finally:
        code, err = _stop(proc)
    if supported:
        assert info is not None, err
        assert (info["backend"], info["precision"]) == ("openvino", "bf16"), info
        assert info["limits"]["precision"] == "bf16"
    else:
        assert info is None and code == 1, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == [f"error: bf16 refused: {reason}; use --precision fp32"], err
        assert "Traceback" not in err


@needs_serve
def test_serve_refuses_bf16_in_one_line_on_a_cpu_without_it(tiny_bundle: Path, tmp_path: Path) -> None:
    """The refusal on every machine: the bf16 probe pinned to say no."""
    pytest.importorskip("openvino", reason="bf16 runs on the `openvino` extra")
    proc = _serve(tiny_bundle, tmp_path, "--precision", "bf16", pinned_no_bf16=True)
    try:
        info = _wait_info(proc)
    finally:
        code, err = _stop(proc)
    assert info is None and code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: bf16 refused: Pinned CPU: neither AVX512-BF16 nor AMX; use --precision fp32"], err
    assert "Traceback" not in err


# ---------------------------------------------------------------------- serve's batch default
@needs_serve
def test_serve_batches_at_the_runtimes_per_device_default(tiny_bundle: Path, tmp_path: Path) -> None:
    """No --max-batch: the runtime's CPU default (1 window per graph run), not a GPU's batch."""
    import httpx

    from recon_runtime.reconstructor import CPU_MAX_BATCH

    from .conftest import tone
    from .test_server import metric, wav_bytes

    proc = _serve(tiny_bundle, tmp_path, "--precision", "fp32", "--max-wait-ms", "50")
    try:
        info = _wait_info(proc)
        assert info is not None, proc.log.read_text()  # type: ignore[attr-defined]
        assert info["limits"]["max_batch"] == CPU_MAX_BATCH == 1
        url = f"http://127.0.0.1:{proc.port}"  # type: ignore[attr-defined]
        body = wav_bytes(tone(0.5))
        with ThreadPoolExecutor(4) as pool:
            codes = list(
                pool.map(lambda _: httpx.post(url + "/v1/reconstruct", content=body, timeout=60).status_code, range(4))
            )
        assert codes == [200] * 4
        text = httpx.get(url + "/metrics", timeout=10).text
        stages = "encoder+decoder+vocoder"
        runs = metric(text, "recon_batch_size_count", stages=stages)
        assert runs >= 4 and metric(text, "recon_batch_size_bucket", stages=stages, le="1.0") == runs
    finally:
        _stop(proc)


@needs_serve
def test_the_batcher_follows_the_served_reconstructors_max_batch(tiny_bundle: Path) -> None:
    from starlette.testclient import TestClient

    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig

    rec = Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32", threads=1, max_batch=3)
    app = create_app(ServerConfig(model=tiny_bundle, warmup=False), reconstructor=rec)
    with TestClient(app) as client:
        service = app.state.service
        assert service.ready.wait(60)
        assert service.batcher.max_batch == 3
        assert client.get("/v1/info").json()["limits"]["max_batch"] == 3


@needs_serve
def test_serve_runs_openvino_with_the_latency_hint_unless_asked(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Latency was faster than throughput for the one batcher thread at 1 and 16 clients (docs/serving.md)."""
    pytest.importorskip("openvino", reason="the hint is an `openvino` extra setting")
    from starlette.testclient import TestClient

    from recon_runtime.contract import ROLES
    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for hint, want in ((None, "LATENCY"), ("throughput", "THROUGHPUT")):
        config = ServerConfig(model=tiny_bundle, backend="openvino", provider="cpu", threads=1, performance_hint=hint)
        app = create_app(dataclasses.replace(config, warmup=False))
        with TestClient(app):
            service = app.state.service
            assert service.ready.wait(60), service.load_error
            hints = {str(service.rec.executor.compiled(r).compiled.get_property("PERFORMANCE_HINT")) for r in ROLES}
            assert hints == {want}, hint
