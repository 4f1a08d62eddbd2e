"""What a dataset job is: its mode and settings (`JobConfig`) and the names of its output folder.

Every module of the jobs reads these names from here, so OUT's layout is written down once (see
`recon_runtime.jobs.job` for what each holds).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from ..files.audio import FLOAT32
from ..options import LoadOptions
from ..reconstructor import DEFAULT_OVERLAP_FRAMES, DEFAULT_WINDOW_FRAMES, LONG_AUDIO_PLAN, PREVIOUS_LONG_AUDIO_PLAN

_LOGGER = logging.getLogger(__name__)

ENCODE: Final = "encode"
RECONSTRUCT: Final = "reconstruct"
EVALUATE: Final = "evaluate"
MODES: Final = (ENCODE, RECONSTRUCT, EVALUATE)
RESULT_DIRS: Final = {ENCODE: "latents", RECONSTRUCT: "done", EVALUATE: "metrics"}
ERRORS_DIR: Final = "errors"
ATTEMPTS_DIR: Final = "attempts"
AUDIO_DIR: Final = "audio"
JOB_FILE: Final = "job.json"
SUMMARY_FILE: Final = "summary.json"
METRICS_SUMMARY_FILE: Final = "metrics-summary.json"
METRIC_NAMES: Final = ("log_mel_l1", "log_mel_rmse", "mel_correlation", "mrstft", "si_sdr_db")
DEFAULT_MAX_SECONDS: Final = 3600.0
KEY_COLUMNS: Final = ("path", "size", "mtime_ns")
LOCK_FILE: Final = "job.lock"
UNRECORDED_WINDOWING: Final = {"window_frames": DEFAULT_WINDOW_FRAMES, "overlap_frames": DEFAULT_OVERLAP_FRAMES}
"""The Reconstructor's windowing, which jobs of earlier versions did not record (no option changed it then)."""
UNRECORDED_SETTINGS: Final = {**UNRECORDED_WINDOWING, "long_audio_plan": PREVIOUS_LONG_AUDIO_PLAN}
"""Settings that jobs of earlier versions did not record, with the value they ran at: a resume of such
a job compares with these (so one that ran long inputs on the previous plan is not mixed with this one's)."""
OUTPUTS_DIR: Final = "outputs"  # reconstruct: the audio a run plans, then each file's size and mtime once written

Key = tuple[str, int, int]


@dataclass(frozen=True)
class JobConfig:
    """One dataset job. `model`: the options its workers load the bundle with (`LoadOptions.for_cpus` then
    `load`; a subclass may load otherwise)."""

    mode: str
    inputs: tuple[str, ...]
    out: Path
    model: LoadOptions
    ray_address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_size: int = 8
    resume: bool = True
    retry_errors: bool = False
    max_seconds: float | None = DEFAULT_MAX_SECONDS
    output_rate: int | None = None
    sample_format: str = FLOAT32
    sample: bool = False
    """encode: draw from the posterior instead of taking its mean (`--sample`)."""
    seed: int = 0
    """encode --sample: each file's draw is seeded from this and its path (`encoded.file_seed`)."""
    progress: bool = True
    # a batch whose worker died this many times is run again one file at a time, and a file whose
    # worker dies then gets an error row instead of another try
    batch_attempts: int = 2

    def settings(self) -> dict[str, Any]:
        """What shapes the results besides the bundle: a resume must use the same."""
        model = self.model
        out: dict[str, Any] = {
            "backend": model.backend,
            "provider": model.provider,
            "precision": model.precision,
            "max_seconds": self.max_seconds,
        }
        out.update({name: getattr(model, name, default) for name, default in UNRECORDED_WINDOWING.items()})
        out["long_audio_plan"] = LONG_AUDIO_PLAN
        if self.mode == RECONSTRUCT:
            out.update(output_rate=self.output_rate, sample_format=self.sample_format)
        if self.mode == ENCODE:
            out.update(sample=self.sample, seed=self.seed if self.sample else None)
        return out


def audio_rel(rel: str) -> str:
    """Where reconstruct writes the audio of the input at `rel`, relative to OUT (the input tree mirrored
    under OUT/audio): how OUT/outputs and OUT/done record it, so a record names its file however OUT is
    spelled on the command line."""
    return (PurePosixPath(AUDIO_DIR) / PurePosixPath(rel).with_suffix(".wav")).as_posix()


def audio_output(out: Path, rel: str) -> Path:
    """The audio file of the input at `rel` under OUT (see `audio_rel`)."""
    return out / audio_rel(rel)
