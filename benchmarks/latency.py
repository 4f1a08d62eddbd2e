"""Latency of the PyTorch reference and of recon_runtime, in the same run, on the same inputs.

    python -m benchmarks.latency --model models/demo                       # CPU, default matrix
    python -m benchmarks.latency --model models/demo --device cuda         # GPU: torch fp16/fp32, ORT fp16/fp32

Times the encoder, decoder, vocoder, decode+vocode (the generation path) and the whole chain
including the front end, per clip length and batch. Reports median and p95 latency, real-time
factor, audio seconds per second, GFLOP/s (work counted once with torch's flop counter), peak
RSS and GPU memory, cold start, and PyTorch/ours ratios. Writes
benchmarks/results/<machine>-<date>.json and a PNG. Timing does not depend on weight values, so
random-weight bundles (recon-export --random-weights) are fine; the JSON says which were used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import DISTRIBUTIONS, describe
from recon_runtime.contract import HOP_LENGTH, LATENT_DOWNSAMPLE, SAMPLE_RATE, read_contract

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("encoder", "decoder", "vocoder", "decode+vocode", "chain")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Row:
    engine: str  # "pytorch" or "onnxruntime"
    provider: str
    precision: str
    stage: str
    seconds: float
    batch: int
    frames: int
    median_ms: float
    p95_ms: float
    runs: int
    rtf: float
    audio_s_per_s: float
    gflop: float | None
    gflop_per_s: float | None
    peak_rss_mb: float
    peak_gpu_mb: float | None
    ratio_pytorch_over_ours: float | None = None


class PeakSampler:
    """Samples this process's RSS (and GPU memory in use) every few ms while a block runs."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.rss = 0
        self.gpu_used = 0
        self._stop = threading.Event()

    def _gpu_used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def _loop(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.rss = max(self.rss, int(f.read().split()[1]) * PAGE)
            if self.gpu:
                self.gpu_used = max(self.gpu_used, self._gpu_used())
            time.sleep(0.005)

    def __enter__(self) -> PeakSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def machine_info(device: str, threads: int | None) -> dict[str, Any]:
    info = describe(("torch", "diffusers", "transformers", *DISTRIBUTIONS))
    info.update(threads=threads, device=device)
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["tf32_override"] = os.environ.get("NVIDIA_TF32_OVERRIDE")
    return info


def test_mel(frames: int, batch: int) -> np.ndarray:
    """Realistic log-mel [batch, frames, 64]: a generated music-like clip through the front end."""
    from recon_export.signals import test_signal
    from recon_runtime.frontend import log_mel

    mel = log_mel(test_signal("music", (frames - 1) * HOP_LENGTH / SAMPLE_RATE, seed=1))
    return np.ascontiguousarray(np.broadcast_to(mel[None, :frames], (batch, frames, mel.shape[1])))


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------------------ engines


def torch_stages(
    modules: dict[str, Any], mel: np.ndarray, device: str, dtype: Any, autocast: Any = None
) -> dict[str, Callable[[], Any]]:
    """Eager PyTorch stage callables on inputs already on the device (the chain starts on the host).

    `autocast`: a dtype for torch.autocast (bf16 on the CPU), the modules staying float32.
    """
    import contextlib

    import torch

    from recon_runtime.frontend import log_mel

    enc, dec, voc = (modules[k] for k in ("encoder", "decoder", "vocoder"))
    x = torch.from_numpy(mel).to(device, dtype)
    with torch.no_grad():
        z = enc(x[:, None])[0]

    def chain_host() -> np.ndarray:
        wave = np.zeros(mel.shape[1] * HOP_LENGTH - HOP_LENGTH, np.float32)
        host = np.stack([log_mel(wave + 0.0)[: mel.shape[1]]] * mel.shape[0])
        m = torch.from_numpy(np.ascontiguousarray(host)).to(device, dtype)
        return voc(dec(enc(m[:, None])[0])[:, 0]).float().cpu().numpy()

    def wrap(f: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            ctx = torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                return f()

        return run

    return {
        "encoder": wrap(lambda: enc(x[:, None])),
        "decoder": wrap(lambda: dec(z)),
        "vocoder": wrap(lambda: voc(x)),
        "decode+vocode": wrap(lambda: voc(dec(z)[:, 0])),
        "chain": wrap(chain_host),
    }


def ort_stages(rec: Any, mel: np.ndarray) -> dict[str, Callable[[], Any]]:
    """recon_runtime stage callables. On CUDA, inputs are uploaded once and outputs stay on the GPU."""
    from recon_runtime.frontend import log_mel
    from recon_runtime.windows import Features

    enc, dec, voc = (rec.executor.session(r) for r in ("encoder", "decoder", "vocoder"))
    mel4 = np.ascontiguousarray(mel[:, None])
    z = enc.run({"log_mel": mel4})[0]
    wave = np.zeros(mel.shape[1] * HOP_LENGTH - HOP_LENGTH, np.float32)

    def chain_host() -> Any:
        feats = [Features(log_mel(wave + 0.0), 1.0, wave.size, wave) for _ in range(mel.shape[0])]
        return rec.reconstruct_features(feats)

    if rec.on_gpu:
        mel_d, z_d, mel3_d = enc.to_device(mel4), dec.to_device(z), voc.to_device(mel)
        b, _, t, f = mel4.shape
        return {
            "encoder": lambda: enc.run_on_device("log_mel", mel_d),
            "decoder": lambda: dec.run_on_device("latent", z_d),
            "vocoder": lambda: voc.run_on_device("log_mel", mel3_d),
            "decode+vocode": lambda: voc.run_on_device("log_mel", dec.run_on_device("latent", z_d)[0], (b, t, f)),
            "chain": chain_host,
        }
    return {
        "encoder": lambda: enc.run({"log_mel": mel4}),
        "decoder": lambda: dec.run({"latent": z}),
        "vocoder": lambda: voc.run({"log_mel": mel}),
        "decode+vocode": lambda: voc.run({"log_mel": dec.run({"latent": z})[0][:, 0]}),
        "chain": chain_host,
    }


def count_gflop(modules: dict[str, Any], frames: int, cache: dict[str, float]) -> dict[str, float]:
    """GFLOP per stage for batch 1 at `frames`, counted once with torch's flop counter (CPU, fp32)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    key = str(frames)
    if key in cache:
        return cache[key]
    mel = torch.from_numpy(test_mel(frames, 1))
    counts = {}
    with torch.no_grad():
        z = modules["encoder"](mel[:, None])[0]
        for stage, fn in (
            ("encoder", lambda: modules["encoder"](mel[:, None])),
            ("decoder", lambda: modules["decoder"](z)),
            ("vocoder", lambda: modules["vocoder"](mel)),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            counts[stage] = counter.get_total_flops() / 1e9
    counts["decode+vocode"] = counts["decoder"] + counts["vocoder"]
    counts["chain"] = counts["encoder"] + counts["decode+vocode"]
    cache[key] = counts
    return counts


def ov_stages(rec: Any, mel: np.ndarray) -> dict[str, Callable[[], Any]]:
    """recon_runtime's OpenVINO stages (compiled models with a request pool), batch as one request."""
    from recon_runtime.frontend import log_mel
    from recon_runtime.windows import Features

    enc, dec, voc = (rec.executor.compiled(r) for r in ("encoder", "decoder", "vocoder"))
    mel4 = np.ascontiguousarray(mel[:, None])
    z = enc.run(mel4)[0]
    wave = np.zeros(mel.shape[1] * HOP_LENGTH - HOP_LENGTH, np.float32)

    def chain_host() -> Any:
        feats = [Features(log_mel(wave + 0.0), 1.0, wave.size, wave) for _ in range(mel.shape[0])]
        return rec.reconstruct_features(feats)

    return {
        "encoder": lambda: enc.run(mel4),
        "decoder": lambda: dec.run(z),
        "vocoder": lambda: voc.run(mel),
        "decode+vocode": lambda: voc.run(dec.run(z)[0][:, 0]),
        "chain": chain_host,
    }


def cold_start(engine: str, model: str, device: str, precision: str, cache_dir: str = "") -> float:
    """Seconds from a fresh interpreter to the first 1 s chain output (imports, sessions, first run)."""
    if engine in ("onnxruntime", "openvino"):
        cache = f", cache_dir={cache_dir!r}" if engine == "openvino" and cache_dir else ""
        code = (
            "import time; t0=time.perf_counter(); import numpy as np; from recon_runtime import Reconstructor; "
            f"r=Reconstructor.load({model!r}, provider={device!r}, precision={precision!r}, backend={engine!r}{cache}); "
            "r.reconstruct(np.zeros(16000, np.float32)+0.01, 16000); print(time.perf_counter()-t0)"
        )
    else:
        code = (
            "import time; t0=time.perf_counter(); import torch, numpy as np; "
            "from recon_export.checkpoint import reference_checkpoint; from recon_export.graphs import wrappers; "
            "from recon_runtime.contract import read_contract; from recon_runtime.frontend import log_mel; "
            f"m=wrappers(*(lambda c:(c.vae,c.vocoder))(reference_checkpoint(read_contract({model!r})))); "
            f"dt=torch.float16 if {precision!r}=='fp16' else torch.float32; "
            f"[v.to({device!r}, dt) for v in m.values()]; "
            f"x=torch.from_numpy(log_mel(np.zeros(16000,np.float32)+0.01)[:100]).to({device!r}, dt)[None]; "
            "torch.no_grad().__enter__(); w=m['vocoder'](m['decoder'](m['encoder'](x[:,None])[0])[:,0]).float().cpu(); "
            "print(time.perf_counter()-t0)"
        )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from recon_export.checkpoint import reference_checkpoint
    from recon_export.graphs import wrappers
    from recon_runtime import Reconstructor

    if args.threads:
        torch.set_num_threads(args.threads)
    contract = read_contract(Path(args.model))
    device = args.device
    machine = machine_info(device, args.threads)  # at the start: its load average is the other work's
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ckpt = reference_checkpoint(contract)  # the bundle's architecture, tiny included
    config = ckpt.source["model"]
    modules = wrappers(ckpt.vae, ckpt.vocoder)
    flop_cache: dict[str, dict[str, float]] = {}
    engines: list[tuple[str, str]] = [("pytorch", p) for p in args.torch_precisions.split(",") if p]
    engines += [("onnxruntime", p) for p in args.precisions.split(",") if p]
    skipped: dict[str, str] = {}
    for p in [p for p in args.openvino_precisions.split(",") if p]:
        if p == "bf16":
            from recon_runtime.executors import openvino as ov_exec

            ok, why = ov_exec.BF16_PROBE()
            if not ok:
                skipped["openvino-bf16"] = why
                continue
        engines.append(("openvino", p))
    rows: list[Row] = []
    for seconds in [float(s) for s in args.lengths.split(",")]:
        frames = int(round(seconds * SAMPLE_RATE)) // HOP_LENGTH + 1
        frames += (-frames) % LATENT_DOWNSAMPLE
        gflop = count_gflop(modules, frames, flop_cache) if args.flops else {}
        for batch in [int(b) for b in args.batches.split(",")]:
            if seconds * batch > args.max_audio_seconds:
                continue
            mel = test_mel(frames, batch)
            for engine, precision in engines:
                if engine == "pytorch":
                    dtype = torch.float16 if precision == "fp16" else torch.float32
                    mods = {k: v.to(device, dtype) for k, v in modules.items()}
                    autocast = torch.bfloat16 if precision == "bf16" else None
                    stages = torch_stages(mods, mel, device, dtype, autocast)
                elif engine == "openvino":
                    rec = Reconstructor.load(
                        args.model, provider=device, precision=precision, backend="openvino", threads=args.threads
                    )
                    stages = ov_stages(rec, mel)
                else:
                    rec = Reconstructor.load(
                        args.model, provider=device, precision=precision, backend="onnxruntime", threads=args.threads
                    )
                    stages = ort_stages(rec, mel)
                for stage in args.stages.split(","):
                    with PeakSampler(device == "cuda") as peak:
                        times = time_fn(stages[stage], args.repeats, args.warmup, sync)
                    med = statistics.median(times)
                    p95 = float(np.percentile(times, 95))
                    audio = seconds * batch
                    g = gflop.get(stage, 0) * batch if gflop else None
                    rows.append(
                        Row(
                            engine,
                            device,
                            precision,
                            stage,
                            seconds,
                            batch,
                            frames,
                            med * 1e3,
                            p95 * 1e3,
                            len(times),
                            med / audio,
                            audio / med,
                            g,
                            (g / med if g else None),
                            peak.rss / 2**20,
                            (peak.gpu_used / 2**20 if device == "cuda" else None),
                        )
                    )
                    print(_fmt(rows[-1]), flush=True)
                if engine == "pytorch":
                    modules = {k: v.to("cpu", torch.float32) for k, v in modules.items()}
    _ratios(rows)
    cold: dict[str, Any] = {}
    if args.cold_start:
        import tempfile

        for engine, precision in engines:
            if engine == "pytorch":
                cold[f"{engine}-{precision}"] = cold_start(engine, args.model, device, precision)
                continue
            with tempfile.TemporaryDirectory() as cache:  # openvino: empty compiled-model cache, then warm
                cold[f"{engine}-{precision}"] = {
                    "first": cold_start(engine, args.model, device, precision, cache),
                    "second": cold_start(engine, args.model, device, precision, cache),
                }
    return {
        "machine": machine,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": {"path": args.model, "source": contract.source, "random_weights": contract.random_weights},
        "pytorch_reference": "diffusers AutoencoderKL + transformers SpeechT5HifiGan, eager, random weights "
        f"of the same architecture ({config})",
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "gflop_per_stage_batch1": flop_cache,
        "cold_start_s": cold,
        "skipped": skipped,
        "rows": [asdict(r) for r in rows],
    }


def _ratios(rows: list[Row]) -> None:
    """PyTorch/ours latency for every onnxruntime and OpenVINO row (same device, stage, length, batch; PyTorch at
    the same precision when measured, e.g. bf16 autocast for OpenVINO bf16, else fp32)."""
    ref = {(r.provider, r.precision, r.stage, r.seconds, r.batch): r for r in rows if r.engine == "pytorch"}
    for r in rows:
        if r.engine == "pytorch":
            continue
        base = ref.get((r.provider, r.precision, r.stage, r.seconds, r.batch)) or ref.get(
            (r.provider, "fp32", r.stage, r.seconds, r.batch)
        )
        if base:
            r.ratio_pytorch_over_ours = base.median_ms / r.median_ms


def _fmt(r: Row) -> str:
    ratio = f"{r.ratio_pytorch_over_ours:5.2f}x" if r.ratio_pytorch_over_ours else "     -"
    gfs = f"{r.gflop_per_s:7.1f}" if r.gflop_per_s else "      -"
    return (
        f"{r.engine:<11} {r.provider:<4} {r.precision:<4} {r.stage:<13} {r.seconds:6.2f}s x{r.batch:<2} "
        f"median {r.median_ms:9.1f} ms  p95 {r.p95_ms:9.1f}  rtf {r.rtf:6.3f}  GFLOP/s {gfs}  "
        f"rss {r.peak_rss_mb:6.0f} MB  {ratio}"
    )


def table(result: dict[str, Any]) -> str:
    """Markdown table of the result (the README shows the latest one)."""
    m = result["machine"]
    head = (
        f"Measured {result['date'][:10]} on {m.get('gpu') or m['cpu']} ({m['cores']} cores), "
        f"torch {m.get('torch')}, onnxruntime {m.get('onnxruntime') or m.get('onnxruntime-gpu')}, "
        f"threads {m['threads'] or 'default'}; random weights: {result['bundle']['random_weights']}."
    )
    lines = [
        head,
        "",
        "| engine | prec | stage | clip | batch | median ms | p95 ms | RTF | GFLOP/s | peak RSS MB | PyTorch/ours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio_pytorch_over_ours']:.2f}x" if r["ratio_pytorch_over_ours"] else "-"
        gfs = f"{r['gflop_per_s']:.0f}" if r["gflop_per_s"] else "-"
        lines.append(
            f"| {r['engine']} | {r['precision']} | {r['stage']} | {r['seconds']:g} s | {r['batch']} | "
            f"{r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['rtf']:.3f} | {gfs} | {r['peak_rss_mb']:.0f} | {ratio} |"
        )
    if result.get("cold_start_s"):
        lines += [
            "",
            "Cold start (fresh process to first 1 s output): "
            + ", ".join(f"{k} {_seconds(v)}" for k, v in result["cold_start_s"].items()),
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["batch"] == 1]
    lengths = sorted({r["seconds"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4), squeeze=False)
    for ax, seconds in zip(axes[0], lengths):
        sel = [r for r in rows if r["seconds"] == seconds]
        engines = sorted({(r["engine"], r["precision"]) for r in sel})
        width = 0.8 / max(1, len(engines))
        for i, (engine, precision) in enumerate(engines):
            vals = [
                next(
                    (
                        r["median_ms"]
                        for r in sel
                        if (r["engine"], r["precision"], r["stage"]) == (engine, precision, s)
                    ),
                    0,
                )
                for s in STAGES
            ]
            ax.bar(np.arange(len(STAGES)) + i * width, vals, width, label=f"{engine} {precision}")
        ax.set_xticks(np.arange(len(STAGES)) + width * (len(engines) - 1) / 2, STAGES, rotation=20)
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"{seconds:g} s clip, batch 1 ({result['machine']['device']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _seconds(value: float | dict[str, float]) -> str:
    """A cold-start entry: one time, or first and second start (engines with a compiled-model cache)."""
    if isinstance(value, dict):
        return " / ".join(f"{k} {v:.1f} s" for k, v in value.items())
    return f"{value:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/demo", help="bundle folder (random weights are fine for timing)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--lengths", default="1.0,10.24", help="clip seconds, comma-separated (30 for the long case)")
    ap.add_argument("--batches", default="1,4", help="comma-separated")
    ap.add_argument("--max-audio-seconds", type=float, default=12.0, help="skip length*batch above this")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--precisions", default="fp32", help="ORT precisions (fp16 on CUDA)")
    ap.add_argument("--torch-precisions", default="fp32", help="PyTorch precisions (fp16 on CUDA, bf16 = CPU autocast)")
    ap.add_argument(
        "--openvino-precisions", default="", help="OpenVINO precisions on the CPU (fp32,bf16; bf16 where supported)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-flops", dest="flops", action="store_false")
    ap.add_argument("--no-cold-start", dest="cold_start", action="store_false")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix for the result file name")
    args = ap.parse_args()
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag.lstrip('-')}" if args.tag else ""
    name = f"{platform.node() or 'machine'}-{args.device}-{dt.date.today().isoformat()}{tag}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{name}.png")
    print(table(result))
    print(f"wrote {out / name}.json and .png")


if __name__ == "__main__":
    main()
