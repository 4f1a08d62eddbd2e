"""Long audio: the previous window plan against the product's (windows sized to the input, one chunked vocoder pass).

    python -m benchmarks.long_audio --model models/demo --repeats 2 \\
        --out benchmarks/results/long-audio-cpu-2026-12-01-product.json
    python -m benchmarks.long_audio --model models/demo --lengths 12 --repeats 1 --vocoder-memory 600

Per length, in one process, interleaved (the order alternates between repeats):
- old: the previous plan, rebuilt here from the Reconstructor's parts (`reconstruct_old`): full
  1024-frame windows, the last aligned to the end (`old_plan_windows`), each through encoder,
  decoder and vocoder in one graph run, the waveforms cross-faded (`windows.join_windows`);
- new: `Reconstructor.reconstruct`, the product: encoder + decoder per window of
  `window_plan.plan_fitted_windows`, the decoded windows joined in log-mel (`join_mel_windows`),
  one vocoder pass over the joined mel in chunks (`vocoding.ChunkJob`, `vocode_chunked`'s plan).
The old plan is only selectable here, not in the product. Each row records frames computed per
plan, an estimate of the work (the full-size graphs' GFLOP per 1024 frames), wall and CPU times
(the process's, all threads; on a busy machine `--threads 1` makes CPU time the steadier measure
of work) and the load average; the input is Debian's freedesktop sounds (real audio) concatenated and looped to
length, and the log-mel L1 between the old and the new reconstruction is reported (on random
weights it shows how far the plans' outputs are apart, not which one is better).
`--vocoder-memory S` also vocodes S seconds of mel in chunks, in a fresh process, and reports its
peak RSS while vocoding beside that of one chunk alone (`--memory-chunks`: the sizes measured);
`--memory-only` runs just that and updates the file `--out` names.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import soxr

from benchmarks.machine import describe
from recon_runtime import Reconstructor
from recon_runtime.contract import DECODER, ENCODER, HOP_LENGTH, LATENT_DOWNSAMPLE, N_MELS, ROLES, SAMPLE_RATE, VOCODER
from recon_runtime.files.audio import read_audio
from recon_runtime.files.metrics import compare
from recon_runtime.frontend import to_mono
from recon_runtime.vocoding import (
    VOCODER_CHUNK_FRAMES,
    VOCODER_MARGIN_FRAMES,
    executor_vocoder_run,
    plan_chunks,
    receptive_field,
    vocode_chunked,
)
from recon_runtime.window_plan import WINDOW_STEP_FRAMES, frames_computed, join_mel_windows, plan_fitted_windows
from recon_runtime.windows import join_windows

SOUNDS: Final = Path("/usr/share/sounds/freedesktop/stereo")
LENGTHS: Final = (10.24, 12.0, 20.0, 30.0, 120.0)
GFLOP_PER_1024_FRAMES: Final = {ENCODER: 311.0, DECODER: 636.0, VOCODER: 1027.0}
"""The full-size graphs' work per 1024-frame window (attention's quadratic share ignored): an estimate."""


def real_audio(seconds: float) -> np.ndarray:
    """Debian's freedesktop sounds (sound-theme-freedesktop), mono 16 kHz, concatenated and looped to `seconds`."""
    files = sorted(SOUNDS.glob("*.oga"))
    if not files:
        raise SystemExit(f"{SOUNDS}: no .oga files (apt-get install sound-theme-freedesktop)")
    parts = []
    for path in files:
        audio, rate = read_audio(path)
        mono = to_mono(audio)
        parts.append(soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32) if rate != SAMPLE_RATE else mono)
    joined = np.concatenate(parts)
    return np.resize(joined, int(round(seconds * SAMPLE_RATE))).astype(np.float32)


def old_plan_windows(total: int, window: int, overlap: int, multiple: int = 1) -> list[tuple[int, int]]:
    """The previous plan: [0, total) in full windows of `window` units overlapping by at least
    `overlap`, starts multiples of `multiple`, the last aligned to the end; one window up to
    `window + overlap` units (as `window_plan.plan_fitted_windows`)."""
    if total <= window + overlap:
        return [(0, total)]
    starts = [*range(0, total - window, window - overlap), total - window]
    return [(s, s + window) for s in starts]


def _padded_mel(rec: Reconstructor, audio: np.ndarray) -> tuple[Any, np.ndarray]:
    feats = rec.features(audio, SAMPLE_RATE)
    frames = feats.log_mel.shape[0]
    total = rec.padded_frames(frames)
    return feats, np.pad(feats.log_mel, ((0, total - frames), (0, 0)), constant_values=rec.contract.mel.silence)


def reconstruct_old(rec: Reconstructor, audio: np.ndarray) -> np.ndarray:
    """The previous plan's reconstruction: each full window through the whole chain (one graph run
    each, as the CPU runs them), the waveforms cross-faded, cropped and levelled as the product does."""
    feats, mel = _padded_mel(rec, audio)
    total = mel.shape[0]
    spans = old_plan_windows(total, rec.window_frames, rec.overlap_frames, LATENT_DOWNSAMPLE)
    waves = [rec.run_windows((ENCODER, DECODER, VOCODER), [mel[None, s:e]])[0][0] for s, e in spans]
    return rec.finish(feats, rec.crop(feats, join_windows(total, spans, waves, HOP_LENGTH)))


def old_plan(rec: Reconstructor, frames: int) -> dict[str, int]:
    """Frames the previous plan runs: every window through encoder, decoder and vocoder."""
    spans = old_plan_windows(rec.padded_frames(frames), rec.window_frames, rec.overlap_frames, LATENT_DOWNSAMPLE)
    n = frames_computed(spans)
    return {"windows": len(spans), "window_frames": spans[0][1] - spans[0][0], "vae_frames": n, "vocoder_frames": n}


def new_plan(rec: Reconstructor, frames: int) -> dict[str, int]:
    """Frames the new plan runs: fitted windows through the VAE, chunks through the vocoder."""
    total = rec.padded_frames(frames)
    spans = plan_fitted_windows(total, rec.window_frames, rec.overlap_frames, LATENT_DOWNSAMPLE)
    chunks = plan_chunks(total)
    return {
        "windows": len(spans),
        "window_frames": spans[0][1] - spans[0][0],
        "vae_frames": frames_computed(spans),
        "vocoder_chunks": len(chunks),
        "vocoder_chunk_frames": chunks[0].end - chunks[0].start,
        "vocoder_frames": sum(c.end - c.start for c in chunks),
    }


def estimated_gflop(plan: dict[str, int]) -> float:
    per = GFLOP_PER_1024_FRAMES
    return (plan["vae_frames"] * (per[ENCODER] + per[DECODER]) + plan["vocoder_frames"] * per[VOCODER]) / 1024


def reconstruct_old_windows_new_join(rec: Reconstructor, audio: np.ndarray) -> np.ndarray:
    """The previous plan's windows with the product's join (log-mel, then one chunked vocoder pass):
    tells the two changes' effects on the output apart (`--split-quality`)."""
    feats, mel = _padded_mel(rec, audio)
    total = mel.shape[0]
    spans = old_plan_windows(total, rec.window_frames, rec.overlap_frames, LATENT_DOWNSAMPLE)
    decoded = [rec.run_windows((ENCODER, DECODER), [mel[None, s:e]])[0][0][0] for s, e in spans]
    wave = vocode_chunked(join_mel_windows(total, spans, decoded), executor_vocoder_run(rec.executor))
    return rec.finish(feats, rec.crop(feats, wave))


def _status_mb(key: str) -> float:
    """A /proc/self/status memory line (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _vocoder_memory_child(model: str, frames: int, chunk_frames: int) -> dict[str, Any]:
    """Vocode `frames` frames of random mel in chunks; RSS after load, and the peak while vocoding.

    The process's lifetime peak (ru_maxrss) says nothing about vocoding: Linux carries it over from
    the forked parent across exec, and loading peaks on its own. So the kernel's high-water mark
    (VmHWM) is reset after load (freed heap returned first with `malloc_trim`) and read after the pass.
    """
    rec = Reconstructor.load(model, provider="cpu", precision="fp32", stages=(VOCODER,))
    mel = np.random.default_rng(0).normal(-5.0, 2.0, (frames, N_MELS)).astype(np.float32)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    wave = vocode_chunked(mel, executor_vocoder_run(rec.executor), chunk_frames)
    wall = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    return {
        "frames": frames,
        "seconds": frames / 100,
        "chunk_frames": chunk_frames,
        "chunks": len(plan_chunks(frames, chunk_frames)),
        "rss_after_load_mb": round(loaded, 1),
        "peak_rss_vocoding_mb": round(peak, 1),
        "growth_mb": round(peak - loaded, 1),
        "mel_mb": round(mel.nbytes / 2**20, 1),
        "waveform_mb": round(wave.nbytes / 2**20, 1),
        "wall_s": round(wall, 1),
    }


def vocoder_memory(model: str, seconds: list[float], chunk_sizes: list[int]) -> list[dict[str, Any]]:
    """Peak RSS while vocoding one chunk of each size alone, then each length of mel in default
    chunks, each in a fresh process."""
    cases = [(c, c) for c in chunk_sizes] + [(int(round(s * 100)), VOCODER_CHUNK_FRAMES) for s in seconds]
    rows = []
    for frames, chunk in cases:
        load = [round(x, 2) for x in os.getloadavg()]
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.long_audio",
            "--model",
            model,
            "--memory-child",
            str(frames),
            str(chunk),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append({**json.loads(r.stdout.strip().splitlines()[-1]), "load_average_at_start": load})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--lengths", type=float, nargs="+", default=list(LENGTHS), help="seconds")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vocoder-memory", type=float, nargs="*", default=None, metavar="SECONDS")
    ap.add_argument(
        "--memory-chunks", type=int, nargs="*", default=[VOCODER_CHUNK_FRAMES], help="chunk sizes measured alone"
    )
    ap.add_argument(
        "--memory-only", action="store_true", help="only --vocoder-memory; update the vocoder_memory of --out"
    )
    ap.add_argument("--split-quality", action="store_true", help="also run today's windows with the new join (untimed)")
    ap.add_argument("--memory-child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    if args.memory_child is not None:
        print(json.dumps(_vocoder_memory_child(args.model, *args.memory_child)))
        return
    if args.memory_only:
        if not (args.vocoder_memory and args.out):
            raise SystemExit("--memory-only needs --vocoder-memory and --out")
        path = Path(args.out)
        result = json.loads(path.read_text()) if path.is_file() else {}
        if result and "vocoder_chunk_frames" not in result:
            raise SystemExit(f"{path}: not a long_audio result; refusing to overwrite it")
        result["vocoder_memory_machine"] = describe()
        result["vocoder_memory"] = vocoder_memory(args.model, args.vocoder_memory, args.memory_chunks)
        path.write_text(json.dumps(result, indent=2) + "\n")
        return
    info = describe()  # at the start: its load average is the other work's
    rec = Reconstructor.load(args.model, provider="cpu", precision="fp32", stages=ROLES, threads=args.threads)
    t0 = time.perf_counter()
    field = receptive_field(executor_vocoder_run(rec.executor))
    print(f"vocoder receptive field: {field} ({time.perf_counter() - t0:.1f} s)", flush=True)
    rec.reconstruct(real_audio(1.0), SAMPLE_RATE)  # first runs of each stage out of the timings
    inputs = {s: real_audio(s) for s in args.lengths}
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for seconds in args.lengths:
            audio = inputs[seconds]
            frames = rec.features(audio, SAMPLE_RATE).log_mel.shape[0]
            row: dict[str, Any] = {"seconds": seconds, "repeat": repeat, "frames": frames}
            row["old"], row["new"] = old_plan(rec, frames), new_plan(rec, frames)
            outputs = {}
            for which in ("old", "new") if repeat % 2 == 0 else ("new", "old"):
                load = [round(x, 2) for x in os.getloadavg()]
                t, cpu = time.perf_counter(), time.process_time()
                if which == "old":
                    outputs[which] = reconstruct_old(rec, audio)
                else:
                    outputs[which] = rec.reconstruct(audio, SAMPLE_RATE)
                row[which].update(
                    wall_s=round(time.perf_counter() - t, 2),
                    cpu_s=round(time.process_time() - cpu, 2),
                    load_average_at_start=load,
                )
                row[which]["estimated_gflop"] = round(estimated_gflop(row[which]))
            old, new = outputs["old"], outputs["new"]
            assert old.shape == new.shape == audio.shape and np.isfinite(new).all()
            row["speedup"] = round(row["old"]["wall_s"] / row["new"]["wall_s"], 3)
            row["cpu_speedup"] = round(row["old"]["cpu_s"] / row["new"]["cpu_s"], 3)
            row["expected_speedup"] = round(row["old"]["estimated_gflop"] / row["new"]["estimated_gflop"], 3)
            row["old_vs_new"] = {k: round(v, 5) for k, v in compare(old, new).items()}
            row["old_vs_input_log_mel_l1"] = round(compare(audio, old)["log_mel_l1"], 4)
            row["new_vs_input_log_mel_l1"] = round(compare(audio, new)["log_mel_l1"], 4)
            row["identical"] = bool(np.array_equal(old, new))
            if args.split_quality:  # today's windows, the new join: which change moves the output
                mixed = reconstruct_old_windows_new_join(rec, audio)
                row["old_windows_new_join_vs_old_log_mel_l1"] = round(compare(old, mixed)["log_mel_l1"], 5)
                row["old_windows_new_join_vs_new_log_mel_l1"] = round(compare(new, mixed)["log_mel_l1"], 5)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result: dict[str, Any] = {
        "machine": info,
        "model": str(args.model),
        "random_weights": rec.contract.random_weights,
        "backend": rec.executor.describe(),
        "new": "Reconstructor.reconstruct (the product)",
        "old": "reconstruct_old (the previous plan, rebuilt in this benchmark)",
        "threads": args.threads,
        "audio": f"{SOUNDS}/*.oga, sorted, mono 16 kHz, concatenated and looped to length",
        "window_frames": rec.window_frames,
        "overlap_frames": rec.overlap_frames,
        "window_step_frames": WINDOW_STEP_FRAMES,
        "vocoder_chunk_frames": VOCODER_CHUNK_FRAMES,
        "vocoder_margin_frames": VOCODER_MARGIN_FRAMES,
        "receptive_field": {"before": field.before, "after": field.after, "probe_frames": field.probe_frames},
        "gflop_per_1024_frames": GFLOP_PER_1024_FRAMES,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    if args.vocoder_memory:
        result["vocoder_memory"] = vocoder_memory(args.model, args.vocoder_memory, args.memory_chunks)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
