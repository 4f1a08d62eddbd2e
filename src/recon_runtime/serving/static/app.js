// The listening page: sends the chosen audio to the server's /v1/reconstruct, plays the original and
// the reconstruction with an A/B switch that keeps the position, and draws the two AudioLDM2
// log-mels and the metrics /v1/compare computes. Plain browser APIs: no dependencies, no build step.

const KEY_STORE = "recon-api-key"; // sessionStorage: this tab only, gone when it closes
const NUM_SAMPLES_HEADER = "X-Recon-Num-Samples";
const MODEL_RATE = 16000;
const TICK_STEPS = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1200];

// matplotlib's "magma" colour map (CC0): 256 RGB entries, dark to bright
const MAGMA_HEX =
  "00000401000501010601010802010902020b02020d03030f03031204041405041606051806051a07061c08071e090720" +
  "0a08220b09240c09260d0a290e0b2b100b2d110c2f120d31130d34140e36150e38160f3b180f3d19103f1a10421c1044" +
  "1d11471e114920114b21114e22115024125325125527125829115a2a115c2c115f2d11612f1163311165331067341069" +
  "36106b38106c390f6e3b0f703d0f713f0f72400f74420f75440f764510774710784910784a10794c117a4e117b4f127b" +
  "51127c52137c54137d56147d57157e59157e5a167e5c167f5d177f5f187f601880621980641a80651a80671b80681c81" +
  "6a1c816b1d816d1d816e1e81701f81721f817320817521817621817822817922827b23827c23827e2482802582812581" +
  "8326818426818627818827818928818b29818c29818e2a81902a81912b81932b80942c80962c80982d80992d809b2e7f" +
  "9c2e7f9e2f7fa02f7fa1307ea3307ea5317ea6317da8327daa337dab337cad347cae347bb0357bb2357bb3367ab5367a" +
  "b73779b83779ba3878bc3978bd3977bf3a77c03a76c23b75c43c75c53c74c73d73c83e73ca3e72cc3f71cd4071cf4070" +
  "d0416fd2426fd3436ed5446dd6456cd8456cd9466bdb476adc4869de4968df4a68e04c67e24d66e34e65e44f64e55064" +
  "e75263e85362e95462ea5661eb5760ec5860ed5a5fee5b5eef5d5ef05f5ef1605df2625df2645cf3655cf4675cf4695c" +
  "f56b5cf66c5cf66e5cf7705cf7725cf8745cf8765cf9785df9795df97b5dfa7d5efa7f5efa815ffb835ffb8560fb8761" +
  "fc8961fc8a62fc8c63fc8e64fc9065fd9266fd9467fd9668fd9869fd9a6afd9b6bfe9d6cfe9f6dfea16efea36ffea571" +
  "fea772fea973feaa74feac76feae77feb078feb27afeb47bfeb67cfeb77efeb97ffebb81febd82febf84fec185fec287" +
  "fec488fec68afec88cfeca8dfecc8ffecd90fecf92fed194fed395fed597fed799fed89afdda9cfddc9efddea0fde0a1" +
  "fde2a3fde3a5fde5a7fde7a9fde9aafdebacfcecaefceeb0fcf0b2fcf2b4fcf4b6fcf6b8fcf7b9fcf9bbfcfbbdfcfdbf";
const MAGMA = Uint8Array.from(MAGMA_HEX.match(/../g), (h) => parseInt(h, 16));

const $ = (id) => document.getElementById(id);
const el = {
  serverInfo: $("server-info"),
  keySection: $("key-section"),
  keyForm: $("key-form"),
  keyInput: $("key-input"),
  keyForget: $("key-forget"),
  drop: $("drop"),
  pick: $("pick"),
  fileInput: $("file-input"),
  fileName: $("file-name"),
  record: $("record"),
  recordNote: $("record-note"),
  limits: $("limits"),
  status: $("status"),
  statusText: $("status-text"),
  statusTime: $("status-time"),
  progress: $("progress"),
  error: $("error"),
  errorHead: $("error-head"),
  errorText: $("error-text"),
  retry: $("retry"),
  listen: $("listen-section"),
  abA: $("ab-a"),
  abB: $("ab-b"),
  play: $("play"),
  playText: $("play-text"),
  switch: $("switch"),
  seek: $("seek"),
  clock: $("clock"),
  playNote: $("play-note"),
  download: $("download"),
  compare: $("compare-section"),
  metrics: $("metrics"),
  metricsMinor: $("metrics-minor"),
  melA: $("mel-a"),
  melB: $("mel-b"),
  timeAxis: $("time-axis"),
  scaleBar: $("scale-bar"),
  scaleMin: $("scale-min"),
  scaleMax: $("scale-max"),
  melNote: $("mel-note"),
};
const players = { a: $("audio-a"), b: $("audio-b") };

const state = {
  key: sessionStorage.getItem(KEY_STORE),
  info: null,
  file: null, // the last input sent (kept for "Send it again")
  refusedForKey: false, // the last input was refused with 401: send it again once a key is accepted
  busy: false,
  active: "a",
  duration: 0,
  urls: [],
  comparison: null,
  ticker: null,
  recorder: null,
};

// ---------------------------------------------------------------------- talking to the server
class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function bytesText(buffer) {
  return new TextDecoder().decode(buffer || new ArrayBuffer(0));
}

function errorMessage(xhr) {
  const text = bytesText(xhr.response);
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
  } catch (_) {
    // not JSON (a proxy's page, say): shown as text
  }
  return text.trim().slice(0, 300) || `${xhr.status} ${xhr.statusText}`.trim();
}

// One request with the key as a bearer header (never in the URL), upload and download progress, and
// the server's JSON message on refusal. Resolves to {xhr, body: ArrayBuffer}.
function send(method, path, body, { onUpload, onDownload, contentType } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, path);
    xhr.responseType = "arraybuffer";
    if (state.key) xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
    if (contentType) xhr.setRequestHeader("Content-Type", contentType);
    if (onUpload) {
      xhr.upload.onprogress = (e) => onUpload(e.lengthComputable && e.total ? e.loaded / e.total : null, false);
      xhr.upload.onload = () => onUpload(1, true);
    }
    if (onDownload) xhr.onprogress = (e) => onDownload(e.lengthComputable && e.total ? e.loaded / e.total : null);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve({ xhr, body: xhr.response });
      else reject(new ApiError(xhr.status, errorMessage(xhr), xhr.getResponseHeader("Retry-After")));
    };
    xhr.onerror = () =>
      reject(
        new ApiError(
          0,
          "No answer from the server: the connection closed before an answer came " +
            "(is the server still running? a file over its upload limit is cut off this way).",
        ),
      );
    xhr.send(body ?? null);
  });
}

async function getJson(path) {
  const { body } = await send("GET", path);
  return JSON.parse(bytesText(body));
}

// ---------------------------------------------------------------------- server info and the key
async function loadInfo() {
  try {
    state.info = await getJson("/v1/info");
  } catch (e) {
    if (e.status === 401) {
      askForKey(e);
      return;
    }
    if (e.status === 503) {
      el.serverInfo.textContent = `The server is not ready yet (${e.message}); asking again…`;
      setState("loading");
      setTimeout(loadInfo, 1000 * Math.max(1, Number(e.retryAfter) || 1));
      return;
    }
    el.serverInfo.textContent = `Could not ask the server what it runs: ${e.message}`;
    setState("ready");
    return;
  }
  showInfo(state.info);
  el.keySection.hidden = true;
  el.keyForget.hidden = !state.key;
  $("docs-key-note").hidden = !state.info.api_key_required;
  setState("ready");
  if (state.refusedForKey && state.file && !state.busy) {
    state.refusedForKey = false;
    run(state.file);
  }
}

function showInfo(info) {
  const source = (info.source && (info.source.model || info.source.id)) || "the bundle";
  el.serverInfo.replaceChildren();
  const badge = (text) => Object.assign(document.createElement("span"), { className: "badge", textContent: text });
  el.serverInfo.append("Model ", badge(String(source)), " on ", badge(`${info.backend} · ${info.provider}`), " ");
  el.serverInfo.append(badge(info.precision));
  if (info.weights === "random") {
    const warn = Object.assign(document.createElement("span"), {
      className: "warn",
      textContent: " · random weights: the reconstruction is not meaningful audio",
    });
    el.serverInfo.append(warn);
  }
  const limits = info.limits || {};
  const parts = ["Any format libsndfile reads: WAV, FLAC, OGG, Opus, MP3, AIFF…"];
  if (limits.max_seconds) parts.push(`up to ${formatDuration(limits.max_seconds)}`);
  if (limits.max_body_mb) parts.push(`${formatNumber(limits.max_body_mb)} MB a file`);
  if (limits.timeout_s) {
    const perAudio = limits.timeout_per_audio_s ? ` plus ${formatNumber(limits.timeout_per_audio_s)} s per second of audio` : "";
    parts.push(`answered within ${formatDuration(limits.timeout_s)}${perAudio}`);
  }
  el.limits.textContent = parts.join("; ") + ".";
}

function askForKey(error) {
  el.keySection.hidden = false;
  el.keyForget.hidden = !state.key;
  $("docs-key-note").hidden = false;
  el.serverInfo.textContent = "This server needs an API key.";
  setState("needs-key");
  if (state.key) showError(error, "The server refused the key");
  el.keyInput.focus();
}

el.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = el.keyInput.value.trim();
  if (!key) return;
  state.key = key;
  sessionStorage.setItem(KEY_STORE, key);
  el.keyInput.value = "";
  clearError();
  loadInfo();
});

el.keyForget.addEventListener("click", () => {
  state.key = null;
  sessionStorage.removeItem(KEY_STORE);
  el.keyForget.hidden = true;
  loadInfo();
});

// ---------------------------------------------------------------------- status, progress, errors
function setState(name) {
  document.body.dataset.state = name;
}

function status(text, fraction) {
  el.status.hidden = false;
  el.statusText.textContent = text;
  if (fraction === null || fraction === undefined) el.progress.removeAttribute("value");
  else el.progress.value = Math.min(1, Math.max(0, fraction));
}

function startClock() {
  const started = performance.now();
  clearInterval(state.ticker);
  const tick = () => (el.statusTime.textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`);
  tick();
  state.ticker = setInterval(tick, 100);
  return started;
}

function stopClock() {
  clearInterval(state.ticker);
  state.ticker = null;
}

function showError(error, head) {
  el.error.hidden = false;
  const code = error.status ? ` (${error.status})` : "";
  el.errorHead.textContent = `${head || "The server refused this"}${code}`;
  el.errorText.textContent = error.message;
  // worth sending again: no answer, too slow, busy, timed out, or the server's fault
  const transient = error.status === 0 || error.status === 408 || error.status === 429 || error.status >= 500;
  el.retry.hidden = !(state.file && transient);
}

function clearError() {
  el.error.hidden = true;
  el.errorText.textContent = "";
}

el.retry.addEventListener("click", () => state.file && run(state.file));

// ---------------------------------------------------------------------- the run
function setBusy(busy) {
  state.busy = busy;
  el.pick.disabled = busy;
  el.record.disabled = busy || !canRecord();
  el.retry.disabled = busy;
  el.drop.setAttribute("aria-busy", String(busy));
}

async function run(file) {
  if (state.busy) return;
  state.file = file;
  state.refusedForKey = false;
  clearError();
  el.listen.hidden = true;
  el.compare.hidden = true;
  pauseAll();
  el.fileName.textContent = `${file.name || "audio"} · ${formatBytes(file.size)}`;
  const limits = (state.info && state.info.limits) || {};
  if (limits.max_body_mb && file.size > limits.max_body_mb * 2 ** 20) {
    // the server would cut such an upload off; say why before sending it
    showError(
      new ApiError(413, `${file.name} is ${formatBytes(file.size)}; this server takes at most ${formatNumber(limits.max_body_mb)} MB a file.`),
      "Too large to send",
    );
    setState("error");
    return;
  }
  setBusy(true);
  setState("uploading");
  const started = startClock();
  let stage = "reconstruct";
  try {
    status("Uploading…", 0);
    const { xhr, body } = await send("POST", "/v1/reconstruct", file, {
      contentType: "application/octet-stream",
      onUpload: (fraction, done) => {
        if (done) {
          setState("working");
          status("Reconstructing on the server…", null);
        } else status(`Uploading… ${fraction === null ? "" : Math.round(fraction * 100) + " %"}`, fraction);
      },
      onDownload: (fraction) => status("Receiving the reconstruction…", fraction),
    });
    const samples = Number(xhr.getResponseHeader(NUM_SAMPLES_HEADER));
    const wav = new Blob([body], { type: "audio/wav" });
    setPlayers(file, wav, samples / MODEL_RATE);
    stage = "compare";
    setState("comparing");
    status("Computing the spectrograms and metrics…", 0);
    const form = new FormData();
    form.append("original", file, file.name || "original");
    form.append("reconstruction", wav, "reconstruction.wav");
    const answer = await send("POST", "/v1/compare", form, {
      onUpload: (fraction, done) =>
        done ? status("Computing the spectrograms and metrics…", null) : status("Sending both for comparison…", fraction),
    });
    state.comparison = JSON.parse(bytesText(answer.body));
    showComparison(state.comparison);
    el.status.hidden = true;
    setState("done");
    el.fileName.textContent = `${file.name || "audio"} · ${formatBytes(file.size)} · done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (e) {
    el.status.hidden = true;
    if (!(e instanceof ApiError)) e = new ApiError(0, String(e && e.message ? e.message : e));
    if (e.status === 401) {
      state.refusedForKey = true;
      askForKey(e);
      showError(e, state.key ? "The server refused the key" : "The server needs an API key");
    } else {
      showError(e, stage === "compare" ? "The spectrograms could not be computed" : "The server refused this");
    }
    setState("error");
  } finally {
    stopClock();
    setBusy(false);
  }
}

// ---------------------------------------------------------------------- picking, dropping, recording
el.pick.addEventListener("click", () => el.fileInput.click());
el.fileInput.addEventListener("change", () => {
  const file = el.fileInput.files && el.fileInput.files[0];
  el.fileInput.value = ""; // the same file can be chosen again
  if (file) run(file);
});

for (const name of ["dragenter", "dragover"]) {
  el.drop.addEventListener(name, (e) => {
    e.preventDefault();
    el.drop.classList.add("over");
  });
}
for (const name of ["dragleave", "drop"]) el.drop.addEventListener(name, () => el.drop.classList.remove("over"));
el.drop.addEventListener("drop", (e) => {
  e.preventDefault();
  const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
  if (file && !state.busy) run(file);
});
// a file dropped beside the drop zone is not opened in place of the page
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => e.preventDefault());

function canRecord() {
  return Boolean(window.isSecureContext && navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder);
}

if (!canRecord()) {
  el.record.disabled = true;
  el.recordNote.hidden = false;
  el.recordNote.textContent = window.isSecureContext
    ? "This browser cannot record audio here."
    : "Browsers give the microphone only to pages served over HTTPS or from localhost.";
}

el.record.addEventListener("click", async () => {
  if (state.recorder) {
    state.recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    showError(new ApiError(0, `The microphone could not be opened (${e.name || "error"}: ${e.message}).`), "No recording");
    return;
  }
  clearError();
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  const started = performance.now();
  const maxSeconds = (state.info && state.info.limits && state.info.limits.max_seconds) || 600;
  recorder.ondataavailable = (e) => e.data.size && chunks.push(e.data);
  const ticker = setInterval(() => {
    const seconds = (performance.now() - started) / 1000;
    el.record.textContent = `Stop recording (${formatClock(seconds)})`;
    if (seconds >= maxSeconds) recorder.stop();
  }, 200);
  recorder.onstop = async () => {
    clearInterval(ticker);
    stream.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    el.record.setAttribute("aria-pressed", "false");
    el.record.textContent = "Record from the microphone";
    try {
      const wav = await recordingToWav(new Blob(chunks, { type: recorder.mimeType }));
      const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
      run(new File([wav], `recording-${stamp}.wav`, { type: "audio/wav" }));
    } catch (e) {
      showError(new ApiError(0, `The recording could not be read (${e.message}).`), "No recording");
    }
  };
  state.recorder = recorder;
  recorder.start(250);
  el.record.setAttribute("aria-pressed", "true");
  el.record.textContent = "Stop recording (0:00.0)";
});

// The browser's own recording format (WebM or Ogg Opus, MP4) is decoded here and sent as a 16-bit
// mono WAV, which every libsndfile reads.
async function recordingToWav(blob) {
  const context = new AudioContext();
  try {
    const audio = await context.decodeAudioData(await blob.arrayBuffer());
    const mono = new Float32Array(audio.length);
    for (let c = 0; c < audio.numberOfChannels; c++) {
      const data = audio.getChannelData(c);
      for (let i = 0; i < data.length; i++) mono[i] += data[i] / audio.numberOfChannels;
    }
    return wavPcm16(mono, audio.sampleRate);
  } finally {
    context.close();
  }
}

function wavPcm16(samples, rate) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const text = (at, s) => [...s].forEach((ch, i) => view.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  text(36, "data");
  view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, Math.round(s * 32767), true);
  }
  return buffer;
}

// ---------------------------------------------------------------------- listening: A/B
function setPlayers(file, wav, seconds) {
  state.urls.forEach((u) => URL.revokeObjectURL(u));
  const a = URL.createObjectURL(file);
  const b = URL.createObjectURL(wav);
  state.urls = [a, b];
  el.playNote.hidden = true;
  players.a.src = a;
  players.b.src = b;
  el.download.href = b;
  const stem = (file.name || "audio").replace(/\.[^.]*$/, "");
  el.download.download = `${stem}-reconstruction.wav`;
  state.duration = seconds;
  state.active = "a";
  el.abA.checked = true;
  el.seek.max = String(seconds);
  el.seek.value = "0";
  el.listen.hidden = false;
  updateTransport();
}

players.a.addEventListener("error", () => {
  if (!players.a.getAttribute("src")) return;
  el.playNote.hidden = false;
  el.playNote.textContent =
    "This browser cannot play the original's format; B (the reconstruction) plays, and the spectrogram shows A.";
});

function pauseAll() {
  players.a.pause();
  players.b.pause();
}

function select(which) {
  if (which === state.active) return;
  const from = players[state.active];
  const to = players[which];
  const playing = !from.paused && !from.ended;
  const at = from.currentTime;
  from.pause();
  to.currentTime = Math.min(at, Number.isFinite(to.duration) ? to.duration : at);
  state.active = which;
  (which === "a" ? el.abA : el.abB).checked = true;
  if (playing) play(to);
  updateTransport();
}

function play(player) {
  player.play().catch((e) => {
    el.playNote.hidden = false;
    el.playNote.textContent = `Playback did not start (${e.name}: ${e.message}).`;
  });
}

function togglePlay() {
  const player = players[state.active];
  if (player.paused || player.ended) play(player);
  else player.pause();
}

el.play.addEventListener("click", togglePlay);
el.switch.addEventListener("click", () => select(state.active === "a" ? "b" : "a"));
el.abA.addEventListener("change", () => el.abA.checked && select("a"));
el.abB.addEventListener("change", () => el.abB.checked && select("b"));
el.seek.addEventListener("input", () => {
  players[state.active].currentTime = Number(el.seek.value);
  updateTransport();
});

document.addEventListener("keydown", (e) => {
  if (el.listen.hidden || e.ctrlKey || e.metaKey || e.altKey) return;
  const target = e.target;
  if (target instanceof HTMLInputElement && ["text", "password", "search"].includes(target.type)) return;
  const key = e.key.toLowerCase();
  if (key === "a" || key === "b") select(key);
  else if (key === "s") select(state.active === "a" ? "b" : "a");
  else if (key === "p") togglePlay();
  else return;
  e.preventDefault();
});

function updateTransport() {
  const player = players[state.active];
  const playing = !player.paused && !player.ended;
  el.play.classList.toggle("playing", playing);
  el.playText.textContent = playing ? "Pause" : "Play";
  el.play.setAttribute("aria-label", playing ? "Pause" : "Play");
  const at = player.currentTime || 0;
  el.seek.value = String(at);
  el.seek.setAttribute("aria-valuetext", `${at.toFixed(1)} s of ${state.duration.toFixed(1)} s`);
  el.clock.textContent = `${formatClock(at)} / ${formatClock(state.duration)}`;
  const fraction = state.duration ? Math.min(1, at / state.duration) : 0;
  document.querySelectorAll(".playhead").forEach((p) => (p.style.left = `${fraction * 100}%`));
}

function animate() {
  updateTransport();
  const player = players[state.active];
  if (!player.paused && !player.ended) requestAnimationFrame(animate);
}

for (const player of Object.values(players)) {
  player.addEventListener("play", () => requestAnimationFrame(animate));
  for (const name of ["pause", "ended", "seeked", "loadedmetadata"]) player.addEventListener(name, updateTransport);
}

// ---------------------------------------------------------------------- comparing: mels and metrics
function decodeBytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function showComparison(c) {
  const m = c.metrics;
  // null: undefined for this pair (a silent input or reconstruction); undefined_reason says why
  const shown = (value, digits) => (value === null ? "undefined" : value.toFixed(digits));
  el.metrics.replaceChildren(
    metric("Log-mel L1", shown(m.log_mel_l1, 3), "nats, lower is better"),
    metric("SI-SDR", shown(m.si_sdr_db, 2), "dB, higher is better"),
    metric("Mel correlation", shown(m.mel_correlation, 4), "1 is identical"),
  );
  el.metricsMinor.textContent =
    `Also: log-mel RMSE ${shown(m.log_mel_rmse, 3)} nats, multi-resolution STFT distance ${shown(m.mrstft, 3)} ` +
    "(both lower is better)." +
    (m.undefined_reason ? ` Undefined here: ${m.undefined_reason}.` : "");
  el.compare.hidden = false;
  c.bytes = { a: decodeBytes(c.mels.original), b: decodeBytes(c.mels.reconstruction) };
  drawComparison(c);
  const lo = c.scale.min.toFixed(1);
  const hi = c.scale.max.toFixed(1);
  const what = `${c.n_mels} mel bands from 0 to 8 kHz, ${formatDuration(c.seconds)}; colours from ${lo} (dark) to ${hi} nats (bright)`;
  el.melA.setAttribute("aria-label", `Log-mel spectrogram of the original: ${what}`);
  el.melB.setAttribute("aria-label", `Log-mel spectrogram of the reconstruction: ${what}`);
  el.scaleMin.textContent = `${lo}`;
  el.scaleMax.textContent = `${hi} nats`;
  const reduced = c.columns < c.frames ? `, shown as ${c.columns} columns of ${c.frames_per_column.toFixed(1)} frames each` : "";
  el.melNote.textContent =
    `One colour scale for both: natural log of the mel magnitude, ${lo} (${lo <= -11.5 ? "the silence floor" : "lowest"}) ` +
    `to ${hi}. ${c.frames} frames of 10 ms${reduced}. Click a spectrogram to play from there.`;
}

function metric(name, value, note) {
  const box = document.createElement("div");
  box.className = "metric";
  const dt = Object.assign(document.createElement("dt"), { textContent: name });
  const dd = Object.assign(document.createElement("dd"), { textContent: value });
  dd.append(Object.assign(document.createElement("small"), { textContent: note }));
  box.append(dt, dd);
  return box;
}

function drawComparison(c) {
  if (!c || !c.bytes) return;
  drawMel(el.melA, c.bytes.a, c.columns, c.n_mels);
  drawMel(el.melB, c.bytes.b, c.columns, c.n_mels);
  drawScale();
  drawTicks(c.seconds);
}

function drawMel(canvas, bytes, columns, bands) {
  const image = new ImageData(columns, bands);
  for (let col = 0; col < columns; col++) {
    for (let band = 0; band < bands; band++) {
      const v = bytes[col * bands + band] * 3;
      const o = ((bands - 1 - band) * columns + col) * 4; // the lowest band at the bottom
      image.data[o] = MAGMA[v];
      image.data[o + 1] = MAGMA[v + 1];
      image.data[o + 2] = MAGMA[v + 2];
      image.data[o + 3] = 255;
    }
  }
  const source = document.createElement("canvas");
  source.width = columns;
  source.height = bands;
  source.getContext("2d").putImageData(image, 0, 0);
  const ratio = window.devicePixelRatio || 1;
  const box = canvas.getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(box.width * ratio));
  canvas.height = Math.max(1, Math.round(box.height * ratio));
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = columns > canvas.width; // averaging when shrinking; crisp bands when stretching
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(source, 0, 0, canvas.width, canvas.height);
  canvas.dataset.drawn = "true";
}

function drawScale() {
  const ctx = el.scaleBar.getContext("2d");
  const image = new ImageData(256, 1);
  for (let i = 0; i < 256; i++) image.data.set([MAGMA[3 * i], MAGMA[3 * i + 1], MAGMA[3 * i + 2], 255], 4 * i);
  ctx.putImageData(image, 0, 0);
}

function drawTicks(seconds) {
  const width = el.timeAxis.getBoundingClientRect().width || 300;
  const most = Math.max(2, Math.floor(width / 70));
  const step = TICK_STEPS.find((s) => seconds / s <= most) || TICK_STEPS[TICK_STEPS.length - 1];
  el.timeAxis.replaceChildren();
  for (let t = 0; t <= seconds + 1e-9; t += step) {
    const tick = document.createElement("span");
    tick.style.left = `${(t / seconds) * 100}%`;
    tick.textContent = formatTick(t, step);
    el.timeAxis.append(tick);
  }
}

for (const canvas of [el.melA, el.melB]) {
  canvas.addEventListener("click", (e) => {
    if (!state.duration) return;
    const box = canvas.getBoundingClientRect();
    players[state.active].currentTime = ((e.clientX - box.left) / box.width) * state.duration;
    updateTransport();
  });
}

new ResizeObserver(() => drawComparison(state.comparison)).observe(el.melA);

// ---------------------------------------------------------------------- formatting
function formatClock(seconds) {
  const s = Math.max(0, seconds || 0);
  const minutes = Math.floor(s / 60);
  return `${minutes}:${(s - minutes * 60).toFixed(1).padStart(4, "0")}`;
}

function formatTick(t, step) {
  if (t >= 60) return formatClock(t).replace(/\.0$/, "");
  return `${step < 1 ? t.toFixed(1) : Math.round(t)} s`;
}

function formatDuration(seconds) {
  if (seconds < 60) return `${formatNumber(seconds)} s`;
  return `${formatNumber(seconds / 60)} min`;
}

function formatNumber(x) {
  return Number(x.toFixed(2)).toString();
}

function formatBytes(n) {
  if (n < 1024) return `${n} bytes`;
  if (n < 2 ** 20) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 2 ** 20).toFixed(1)} MB`;
}

loadInfo();
