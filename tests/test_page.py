"""The listening page at `/` and its `/v1/compare`, on a real `recon-run serve` on 127.0.0.1.

`/v1/compare` is checked with httpx against the in-process runtime (the mels and metrics
`recon-run reconstruct --metrics` computes) and with bad forms. The page itself runs in a real
headless Chromium (Debian's `chromium`, driven by Playwright; .ci/run installs it): it uploads a
generated clip, plays both with the A/B switch, draws both spectrograms, and the audio it received
equals the in-process reconstruction; refusals show the server's message; the API key is asked for
and sent as a bearer header; every control works from the keyboard; a phone-sized window does not
scroll sideways. Screenshots go to each test's tmp folder. Waits are on page state, bounded.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from .conftest import tone
from .test_server import KEY, MISSING, REL, Gated, Server, raw_exchange, rel_l2, serve_in_process, wav_bytes

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"server tests need the `serve` extra ({', '.join(MISSING)} missing)"
)

if not MISSING:
    import httpx

CHROMIUM = os.environ.get("RECON_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
NO_BROWSER = (
    "the page tests need playwright (the `test` extra)"
    if importlib.util.find_spec("playwright") is None
    else None
    if Path(CHROMIUM).is_file()
    else f"the page tests need Debian's chromium ({CHROMIUM} missing; .ci/run installs it: apt-get install chromium)"
)
needs_browser = pytest.mark.skipif(NO_BROWSER is not None, reason=NO_BROWSER or "")

RATE = 16000
MAX_SECONDS = 6
UI_TIMEOUT_MS = 60_000  # a reconstruction of a few seconds on the tiny model, on a busy machine
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def clip(seconds: float = 3.3, rate: int = 22050) -> np.ndarray:
    noise = 0.05 * np.random.default_rng(1).standard_normal(round(seconds * rate)).astype(np.float32)
    return tone(seconds, rate, 330.0) + noise


def form(original: bytes, reconstruction: bytes) -> dict[str, Any]:
    return {"original": ("in.wav", original, "audio/wav"), "reconstruction": ("out.wav", reconstruction, "audio/wav")}


def mels_of(answer: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The two quantised mels of a /v1/compare answer, as bytes [columns, n_mels]."""
    shape = (answer["columns"], answer["n_mels"])
    return tuple(  # type: ignore[return-value]
        np.frombuffer(base64.b64decode(answer["mels"][k]), np.uint8).reshape(shape)
        for k in ("original", "reconstruction")
    )


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Any:
    from recon_runtime import Reconstructor

    return Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32", threads=1)


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tiny_bundle, tmp_path_factory.mktemp("page"), "--max-seconds", str(MAX_SECONDS), "--max-body-mb", "2")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def keyed(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tiny_bundle, tmp_path_factory.mktemp("page-key"), api_key=True)
    yield s
    assert s.stop() == 0, s.log.read_text()


# ---------------------------------------------------------------------- /v1/compare
def test_compare_returns_both_mels_and_the_metrics_reconstruct_writes(server: Server, rec: Any) -> None:
    from recon_runtime.files.metrics import compare
    from recon_runtime.frontend import log_mel
    from recon_runtime.serving.page import mel_columns

    audio = clip()
    original = wav_bytes(audio, 22050)
    out = server.post("/v1/reconstruct", original)
    assert out.status_code == 200, out.text
    feats = rec.features(audio, 22050)
    (wave,) = rec.reconstruct_features([feats])  # what `recon-run reconstruct --metrics` compares
    want = compare(feats.waveform, wave)
    for columns in (None, 100):
        r = httpx.post(
            server.url + "/v1/compare",
            files=form(original, out.content),
            params={} if columns is None else {"columns": columns},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert set(got["metrics"]) == set(want)
        for k, v in want.items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-3, abs=1e-4), k
        frames = feats.log_mel.shape[0]
        assert (got["frames"], got["n_mels"], got["num_samples"]) == (frames, 64, feats.num_samples)
        assert got["columns"] == (frames if columns is None else columns)
        lo, hi = got["scale"]["min"], got["scale"]["max"]
        expected = [mel_columns(m, got["columns"]) for m in (feats.log_mel, log_mel(wave, rec.contract.mel))]
        assert lo == pytest.approx(min(e.min() for e in expected), abs=1e-3)
        assert hi == pytest.approx(max(e.max() for e in expected), abs=1e-3)
        for sent, mel in zip(mels_of(got), expected):
            levels = np.rint((mel - lo) * (255 / (hi - lo)))
            assert np.abs(levels - sent.astype(np.float64)).max() <= 1  # one quantisation step at most


def test_mel_columns_average_their_frames() -> None:
    from recon_runtime.serving.page import mel_columns, quantise

    mel = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    assert np.array_equal(mel_columns(mel, 20), mel)  # no more frames than columns: unchanged
    cols = mel_columns(mel, 4)  # frames [0,2) [2,5) [5,7) [7,10)
    assert np.allclose(cols[:, 0], [1.0, 6.0, 11.0, 16.0])
    assert np.frombuffer(base64.b64decode(quantise(np.array([[0.0, 0.5, 1.0]]), 0.0, 1.0)), np.uint8).tolist() == [
        0,
        128,
        255,
    ]


def test_compare_refuses_bad_forms_with_a_json_4xx(server: Server) -> None:
    audio = tone(1.0, RATE, 440.0)
    good = wav_bytes(audio)
    out = server.post("/v1/reconstruct", good).content
    post = lambda **kw: httpx.post(server.url + "/v1/compare", timeout=60, **kw)  # noqa: E731
    cases = {
        "raw body": (post(content=good, headers={"Content-Type": "audio/wav"}), 400, "multipart form"),
        "one file": (post(files={"original": ("a.wav", good)}), 400, "reconstruction"),
        "text": (post(files=form(b"hello, this is not audio", out)), 400, "not a readable audio file"),
        "empty": (post(files=form(b"", out)), 400, "empty"),
        "other length": (post(files=form(good, wav_bytes(tone(2.0, RATE, 440.0)))), 422, "lasts 2.000 s"),
        "text reconstruction": (post(files=form(good, b"not audio either")), 400, "uploaded reconstruction"),
        "too long": (post(files=form(wav_bytes(tone(MAX_SECONDS + 1, RATE, 440.0)), out)), 413, "over the limit"),
        "columns": (post(files=form(good, out), params={"columns": 0}), 422, "columns"),
        "too many columns": (post(files=form(good, out), params={"columns": 10**6}), 422, "columns"),
        "malformed": (
            post(content=b"--x\r\nnonsense", headers={"Content-Type": "multipart/form-data; boundary=x"}),
            400,
            "",
        ),
    }
    for name, (r, status, words) in cases.items():
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["error"], (name, r.json())
    # the body limit: the original's (--max-body-mb) plus a float32 WAV of --max-seconds
    big = b"RIFF" + bytes(3 * 2**20)
    r = post(files=form(big, out))
    assert r.status_code == 413 and "over the limit" in r.json()["error"], r.text
    assert post(files=form(good, out)).status_code == 200  # and the server goes on


def test_compare_gets_the_body_timeout_scaled_by_its_body_limit(tiny_bundle: Path, rec: Any) -> None:
    """/v1/compare, whose body may be 1.6x what /v1/reconstruct takes (at the defaults), had the same
    --body-timeout-s: it gets as long per byte (its limit over --max-body-mb times the timeout)."""
    import json

    from recon_runtime.serving.page import compare_limit_bytes

    timeout_s, body_mb, seconds = 1.0, 2.0, 60.0
    scaled = round(timeout_s * compare_limit_bytes(body_mb, seconds, RATE) / (body_mb * 2**20), 1)
    assert scaled >= 2 * timeout_s  # the fixture's limits make the difference plain
    srv = serve_in_process(
        rec, tiny_bundle, body_timeout_s=timeout_s, max_body_mb=body_mb, max_seconds=seconds, min_upload_rate=0.0
    )
    try:
        for path, content_type, want in [
            ("/v1/compare", "multipart/form-data; boundary=x", scaled),
            ("/v1/reconstruct", "audio/wav", timeout_s),
        ]:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 1000\r\n\r\n--x"
            ).encode()  # the body's first bytes, then nothing
            t0 = time.monotonic()
            answer = raw_exchange(srv.port, head, timeout=4 * scaled + 30).decode(errors="replace")
            waited = time.monotonic() - t0
            assert answer.startswith("HTTP/1.1 408"), (path, answer)
            error = json.loads(answer.split("\r\n\r\n", 1)[1])["error"]
            assert f"within {want:g} s" in error, (path, error)
            assert waited >= want, (path, waited)  # the server waited for the body that long
    finally:
        srv.close()


def test_the_page_loads_without_the_key_and_every_api_route_stays_guarded(keyed: Server) -> None:
    get = lambda path, **h: httpx.get(keyed.url + path, headers=h, timeout=10)  # noqa: E731
    page = get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css"):
        assert get(asset).status_code == 200, asset
    assert get("/static/nothing.js").status_code == 404
    for path in ("/v1/info", "/docs", "/openapi.json", "/metrics", "/readyz", "/static"):
        assert get(path).status_code == 401, path
    r = httpx.post(keyed.url + "/v1/compare", files=form(b"a", b"b"), timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    # a path that starts like an asset never reaches an API route
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as s:
        s.sendall(b"GET /static/../v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while part := s.recv(65536):
            answer += part
    assert not answer.startswith(b"HTTP/1.1 200") and b"fingerprint" not in answer, answer[:200]
    assert "/v1/compare" in get("/openapi.json", Authorization=f"Bearer {KEY}").json()["paths"]


# ---------------------------------------------------------------------- the page in a browser
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if NO_BROWSER:
        pytest.skip(NO_BROWSER)
    from playwright.sync_api import sync_playwright

    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]  # a generated microphone
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


class Tab:
    """A page in a fresh browser context that records its requests, console errors and page errors."""

    def __init__(self, browser: Any, url: str, viewport: dict[str, int] = DESKTOP, **context: Any):
        self.url = url
        self.context = browser.new_context(viewport=viewport, **context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(UI_TIMEOUT_MS)
        self.requests: list[Any] = []
        self.problems: list[str] = []
        self.choosers: list[Any] = []  # file dialogs the page opened (listening from the start: no race)
        self.page.on("filechooser", lambda c: self.choosers.append(c))
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(m.text))
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))

    def open(self, state: str = "ready") -> Any:
        self.page.goto(self.url + "/")
        self.wait_state(state)
        return self.page

    def wait_state(self, *states: str) -> str:
        selector = ", ".join(f"body[data-state={s}]" for s in states)
        self.page.wait_for_selector(selector)
        return self.page.evaluate("() => document.body.dataset.state")

    def wait(self, js: str) -> None:
        """Wait until the function `js` is true (a function, not a string: the page's CSP forbids eval)."""
        self.page.wait_for_function(js)

    def chooser(self, timeout_s: float = 10) -> Any:
        """The file dialog the page opened last (waited for within `timeout_s`)."""
        end = time.monotonic() + timeout_s
        while not self.choosers:
            assert time.monotonic() < end, "the page opened no file dialog"
            self.page.wait_for_timeout(50)
        return self.choosers.pop()

    def upload(self, path: Path) -> str:
        self.page.set_input_files("#file-input", str(path))
        return self.wait_state("done", "error")

    def close(self, allowed: tuple[str, ...] = ()) -> None:
        try:
            foreign = [r.url for r in self.requests if not r.url.startswith((self.url, "blob:", "data:"))]
            assert not foreign, f"the page loaded from elsewhere: {foreign}"
            # a refusal's status shows in Chromium's console as a failed resource: expected for those tested
            unexpected = [p for p in self.problems if not any(a in p for a in allowed)]
            assert not unexpected, unexpected
        finally:
            self.context.close()


def write_wav(path: Path, audio: np.ndarray, rate: int) -> Path:
    sf.write(path, audio, rate, subtype="FLOAT")
    return path


def audio_state(page: Any, which: str) -> dict[str, Any]:
    return page.evaluate(
        """(id) => { const a = document.getElementById(id);
        return {ready: a.readyState, duration: a.duration, paused: a.paused, time: a.currentTime}; }""",
        f"audio-{which}",
    )


@needs_browser
def test_the_page_plays_and_compares_what_the_server_reconstructs(
    browser: Any, server: Server, rec: Any, tmp_path: Path
) -> None:
    from recon_runtime.files.metrics import compare

    audio = clip()
    path = write_wav(tmp_path / "clip.wav", audio, 22050)
    tab = Tab(browser, server.url)
    page = tab.open()
    assert "onnxruntime" in page.inner_text("#server-info") and "6 s" in page.inner_text("#limits")
    assert "answered within 2 min plus 2 s per second of audio" in page.inner_text("#limits")  # the deadline
    with page.expect_response(lambda r: r.url.startswith(server.url + "/v1/compare")) as compared:
        assert tab.upload(path) == "done", page.inner_text("#error")
    tab.wait("() => ['a', 'b'].every((w) => document.getElementById('audio-' + w).readyState >= 1)")
    for which in "ab":
        assert audio_state(page, which)["duration"] == pytest.approx(3.3, abs=0.01)
    for canvas in ("#mel-a", "#mel-b"):
        assert page.get_attribute(canvas, "data-drawn") == "true"
        assert "64 mel bands" in page.get_attribute(canvas, "aria-label")
    # the audio the page received (its download link) is the in-process reconstruction
    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / "downloaded.wav"
    download.value.save_as(saved)
    got, rate = sf.read(saved, dtype="float32")
    assert rate == RATE and rel_l2(got, rec.reconstruct(audio, 22050)) <= REL
    # the numbers shown are those --metrics computes
    feats = rec.features(audio, 22050)
    want = compare(feats.waveform, rec.reconstruct_features([feats])[0])
    shown = page.inner_text("#metrics")
    assert f"{want['log_mel_l1']:.3f}" in shown and f"{want['si_sdr_db']:.2f}" in shown, shown
    assert f"{want['mel_correlation']:.4f}" in shown, shown
    answer = compared.value.json()
    assert answer["metrics"]["log_mel_l1"] == pytest.approx(want["log_mel_l1"], rel=1e-3)
    page.screenshot(path=str(tmp_path / "page-desktop.png"), full_page=True)

    # A/B: the switch keeps the position and the playing state
    page.click("#play")
    tab.wait("() => document.getElementById('audio-a').currentTime > 0.3")
    page.click("#switch")
    a, b = audio_state(page, "a"), audio_state(page, "b")
    assert a["paused"] and not b["paused"] and b["time"] >= a["time"] - 0.05, (a, b)
    assert page.is_checked("#ab-b") and page.get_attribute("#play", "aria-label") == "Pause"
    page.click("#play")
    assert audio_state(page, "b")["paused"]
    page.click("#mel-a", position={"x": 5, "y": 5})  # a click on a spectrogram seeks near its start
    assert audio_state(page, "b")["time"] < 0.3
    tab.close()


@needs_browser
def test_the_page_reads_on_a_phone(browser: Any, server: Server, tmp_path: Path) -> None:
    tab = Tab(browser, server.url, PHONE, device_scale_factor=3, is_mobile=True, has_touch=True)
    page = tab.open()
    assert tab.upload(write_wav(tmp_path / "clip.wav", clip(2.0), 22050)) == "done"
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1] == PHONE["width"], f"the page scrolls sideways on a phone: {width}"
    for selector in ("#pick", "#play", "#switch", "#mel-b", "#seek"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (selector, box)
    assert page.locator("#play").bounding_box()["height"] >= 44  # a finger's target
    page.screenshot(path=str(tmp_path / "page-phone.png"), full_page=True)
    tab.close()


def test_compare_of_a_silent_input_gives_null_metrics_with_the_reason(server: Server, rec: Any) -> None:
    original = wav_bytes(np.zeros(2 * RATE, np.float32))
    out = server.post("/v1/reconstruct", original)
    assert out.status_code == 200, out.text
    r = httpx.post(server.url + "/v1/compare", files=form(original, out.content), timeout=60)
    assert r.status_code == 200, r.text
    m = r.json()["metrics"]
    assert (m["mel_correlation"], m["mrstft"], m["si_sdr_db"]) == (None, None, None), m
    assert "input is silent" in m["undefined_reason"] and np.isfinite(m["log_mel_l1"])


@needs_browser
def test_the_page_shows_undefined_metrics_of_a_silent_input_as_such(
    browser: Any, server: Server, tmp_path: Path
) -> None:
    tab = Tab(browser, server.url)
    page = tab.open()
    assert tab.upload(write_wav(tmp_path / "silence.wav", np.zeros(2 * RATE, np.float32), RATE)) == "done"
    shown = page.inner_text("#metrics")
    assert shown.count("undefined") == 2 and "nats" in shown, shown  # SI-SDR and correlation; L1 is a number
    minor = page.inner_text("#metrics-minor")
    assert "multi-resolution STFT distance undefined" in minor and "input is silent" in minor, minor
    tab.close()


@needs_browser
def test_refusals_show_the_servers_message(browser: Any, server: Server, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are notes, not audio\n")
    too_long = write_wav(tmp_path / "long.wav", tone(MAX_SECONDS + 2, RATE, 440.0), RATE)
    tab = Tab(browser, server.url)
    page = tab.open()
    for path, status in ((text, 400), (too_long, 413)):
        expected = httpx.post(server.url + "/v1/reconstruct", content=path.read_bytes(), timeout=60)
        assert expected.status_code == status
        assert tab.upload(path) == "error"
        assert page.is_visible("#error") and page.get_attribute("#error", "role") == "alert"
        assert page.inner_text("#error-text") == expected.json()["error"]
        assert f"({status})" in page.inner_text("#error-head")
        assert page.is_hidden("#listen-section") and page.is_hidden("#status")
        assert page.is_hidden("#retry")  # sending the same file again would be refused again
    page.screenshot(path=str(tmp_path / "page-refused.png"), full_page=True)
    assert tab.upload(write_wav(tmp_path / "ok.wav", clip(1.0), 22050)) == "done"  # and the page goes on
    assert page.is_hidden("#error")
    tab.close(allowed=("400", "413"))


@needs_browser
def test_a_long_run_shows_progress_and_a_busy_server_its_503(
    browser: Any, tiny_bundle: Path, rec: Any, tmp_path: Path
) -> None:
    gated = Gated(rec)  # the reconstruction is held until released: the page's working state is seen for sure
    srv = serve_in_process(gated, tiny_bundle, max_queue=1, max_batch=1, max_wait_ms=0)
    first = Tab(browser, srv.url)
    second = Tab(browser, srv.url)
    try:
        page = first.open()
        page.set_input_files("#file-input", str(write_wav(tmp_path / "a.wav", clip(2.0), 22050)))
        assert first.wait_state("working") == "working"
        assert gated.entered.wait(30)
        assert "Reconstructing" in page.inner_text("#status-text")
        assert page.get_attribute("#progress", "value") is None  # indeterminate while the server works
        first.wait("() => parseFloat(document.getElementById('status-time').textContent) > 0")
        assert page.is_disabled("#pick")
        # the one admission slot is taken: another tab is refused with the server's 503 message
        other = second.open()
        assert second.upload(write_wav(tmp_path / "b.wav", clip(1.0), 22050)) == "error"
        assert "server busy" in other.inner_text("#error-text") and "(503)" in other.inner_text("#error-head")
        assert other.is_visible("#retry")
        gated.release.set()
        assert first.wait_state("done") == "done"
        other.click("#retry")  # the slot is free again
        assert second.wait_state("done", "error") == "done", other.inner_text("#error")
        first.close()
        second.close(allowed=("503",))
    finally:
        gated.release.set()
        srv.close()


@needs_browser
def test_the_page_asks_for_the_key_and_sends_it_as_a_bearer_header(browser: Any, keyed: Server, tmp_path: Path) -> None:
    tab = Tab(browser, keyed.url)
    page = tab.open("needs-key")  # the page and its assets came without the key; /v1/info asked for it
    assert page.is_visible("#key-section") and page.evaluate("() => document.activeElement.id") == "key-input"
    refusal = httpx.post(keyed.url + "/v1/reconstruct", content=b"x", timeout=10).json()["error"]
    # a file sent before the key is refused with the server's 401 message
    assert tab.upload(write_wav(tmp_path / "clip.wav", clip(1.0), 22050)) == "error"
    assert page.inner_text("#error-text") == refusal and "(401)" in page.inner_text("#error-head")
    # a wrong key: the server's 401 message again
    page.fill("#key-input", KEY + "-wrong")
    page.press("#key-input", "Enter")
    tab.wait("() => /refused the key/.test(document.getElementById('error-head').textContent)")
    assert page.inner_text("#error-text") == refusal and "(401)" in page.inner_text("#error-head")
    assert tab.wait_state("needs-key") and page.is_visible("#key-section")
    # the right key: accepted, and the file refused for want of it goes again, with the key
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    assert tab.wait_state("done", "error") == "done", page.inner_text("#error")
    assert page.is_hidden("#key-section") and page.is_hidden("#error") and page.is_visible("#docs-key-note")
    api = [r for r in tab.requests if "/v1/" in r.url]
    keyed_paths = {r.url.removeprefix(keyed.url) for r in api if r.headers.get("authorization") == f"Bearer {KEY}"}
    assert keyed_paths >= {"/v1/info", "/v1/reconstruct", "/v1/compare"}, keyed_paths
    assert all(KEY not in r.url for r in tab.requests), "the key went into a URL"
    assert page.evaluate("() => window.localStorage.length") == 0 and not tab.context.cookies()
    page.screenshot(path=str(tmp_path / "page-key.png"), full_page=True)
    # a new tab (another browsing context) does not know the key
    fresh = Tab(browser, keyed.url)
    fresh.open("needs-key")
    fresh.close(allowed=("401",))
    # and this one forgets it when asked
    page.click("#key-forget")
    assert tab.wait_state("needs-key") and page.evaluate("() => window.sessionStorage.length") == 0
    tab.close(allowed=("401",))


def tab_to(page: Any, element_id: str, presses: int = 30) -> None:
    """Press Tab until `element_id` has the focus (fails after `presses`)."""
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement && document.activeElement.id") == element_id:
            outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
            shown = element_id.startswith("ab-") or outline != "none"  # radios show it on their label
            assert shown, f"{element_id} has no visible focus"
            return
    raise AssertionError(f"Tab never reached #{element_id}")


@needs_browser
def test_every_control_works_from_the_keyboard(browser: Any, server: Server, tmp_path: Path) -> None:
    tab = Tab(browser, server.url)
    page = tab.open()
    tab_to(page, "pick")
    page.keyboard.press("Enter")
    tab.chooser().set_files(str(write_wav(tmp_path / "clip.wav", clip(2.0), 22050)))
    assert tab.wait_state("done", "error") == "done"
    tab.wait("() => document.getElementById('audio-b').readyState >= 1")
    tab_to(page, "ab-a")
    page.keyboard.press("ArrowRight")  # the radio group: arrows pick
    assert page.is_checked("#ab-b")
    tab_to(page, "play")
    page.keyboard.press("Space")
    tab.wait("() => !document.getElementById('audio-b').paused")
    tab_to(page, "switch")
    page.keyboard.press("Enter")
    tab.wait("() => !document.getElementById('audio-a').paused && document.getElementById('audio-b').paused")
    page.keyboard.press("p")  # the shortcut pauses
    tab.wait("() => document.getElementById('audio-a').paused")
    tab_to(page, "seek")
    before = audio_state(page, "a")["time"]
    page.keyboard.press("End")
    assert audio_state(page, "a")["time"] > before
    page.keyboard.press("b")
    assert page.is_checked("#ab-b")
    tab_to(page, "download")
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    assert download.value.suggested_filename == "clip-reconstruction.wav"
    tab.close()


@needs_browser
def test_a_recording_from_the_microphone_is_reconstructed(browser: Any, server: Server) -> None:
    tab = Tab(browser, server.url)
    page = tab.open()
    assert page.is_enabled("#record")  # 127.0.0.1 is a secure context: the microphone is offered
    page.click("#record")
    tab.wait("() => document.getElementById('record').getAttribute('aria-pressed') === 'true'")  # the mic opened
    tab.wait("() => /0:01/.test(document.getElementById('record').textContent)")
    page.click("#record")
    assert tab.wait_state("done", "error") == "done", page.inner_text("#error")
    assert page.inner_text("#file-name").startswith("recording-")
    assert audio_state(page, "b")["duration"] >= 1.0
    tab.close()


NO_DOCS_ASSETS = (
    None
    if importlib.util.find_spec("fastapi_offline")
    else "the offline API docs need the `serve` extra (fastapi-offline missing)"
)
needs_docs_assets = pytest.mark.skipif(NO_DOCS_ASSETS is not None, reason=NO_DOCS_ASSETS or "")


@needs_docs_assets
def test_the_api_docs_load_their_scripts_from_the_server(server: Server) -> None:
    """/docs (linked from the page) loaded Swagger UI from cdn.jsdelivr.net: blank on an offline machine."""
    import re

    for path, scripts in (("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}), ("/redoc", {"redoc.standalone.js"})):
        html = httpx.get(server.url + path, timeout=10)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html"), path
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html.text)
        assert not [u for u in urls if "//" in u], (path, urls)  # nothing from another origin
        assert "cdn." not in html.text and "fonts.googleapis" not in html.text, path
        assert {u.rsplit("/", 1)[-1] for u in urls if u.startswith("/docs/assets/")} >= scripts, (path, urls)
        for name in scripts:
            asset = httpx.get(f"{server.url}/docs/assets/{name}", timeout=30)
            assert asset.status_code == 200 and len(asset.content) > 10_000, (name, asset.status_code)


@needs_docs_assets
@needs_browser
def test_the_api_docs_render_with_every_other_origin_blocked(browser: Any, server: Server, tmp_path: Path) -> None:
    """In Chromium with every request outside the server refused (an offline machine), /docs shows the
    operations of the schema."""
    tab = Tab(browser, server.url)
    try:
        blocked: list[str] = []

        def offline(route: Any) -> None:
            if route.request.url.startswith(server.url):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort("internetdisconnected")

        tab.page.route("**/*", offline)
        tab.page.goto(server.url + "/docs")
        tab.page.wait_for_selector(".swagger-ui .info .title")
        assert "audioldm2-recon" in tab.page.inner_text(".swagger-ui .info .title")
        tab.wait(
            "() => [...document.querySelectorAll('.opblock-summary-path')].some(e => e.textContent.includes('/v1/reconstruct'))"
        )
        paths = tab.page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent.trim())")
        assert {"/v1/reconstruct", "/v1/encode", "/v1/decode", "/v1/compare"} <= set(paths), paths
        tab.page.screenshot(path=str(tmp_path / "docs.png"), full_page=False)
        assert not blocked, blocked
    finally:
        tab.close()


def test_without_the_docs_assets_the_server_says_docs_needs_the_network(
    tiny_bundle: Path, rec: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from recon_runtime.serving import api_docs

    monkeypatch.setattr(api_docs, "assets_dir", lambda: None)  # as where fastapi-offline is not installed
    with caplog.at_level("WARNING", logger="recon_runtime.serving"):
        srv = serve_in_process(rec, tiny_bundle)
    try:
        html = httpx.get(srv.url + "/docs", timeout=10)
        assert html.status_code == 200 and "swagger-ui-bundle.js" in html.text  # FastAPI's page, from the CDN
        assert httpx.get(srv.url + "/docs/assets/swagger-ui.css", timeout=10).status_code == 404
    finally:
        srv.close()
    said = [r.getMessage() for r in caplog.records if "fastapi-offline is not installed" in r.getMessage()]
    assert len(said) == 1 and "/openapi.json works" in said[0] and "serve" in said[0], said


def test_pages_static_files_are_package_data() -> None:
    """The page's files sit in the package folder `create_app` serves (tests/test_wheel.py checks the wheel)."""
    from recon_runtime.serving.page import STATIC_DIR

    names = {p.name for p in STATIC_DIR.iterdir()}
    assert {"index.html", "app.js", "app.css"} <= names
    for name in ("index.html", "app.js", "app.css"):
        text = (STATIC_DIR / name).read_text()
        assert "http://" not in text and "https://" not in text, f"{name} refers to another site"
