"""Test stages for dataset jobs (`recon_runtime.jobs.stages.Stages`): graph workers that stall or die
and a reader that dies, passed to `run_job` so that no production batch checks a test's setting.

Ray ships them to its processes with cloudpickle: the classes and functions are made inside the
factories (pickled by value), and refer to nothing of this module but the values they close over.
"""

from __future__ import annotations

from typing import Any

from recon_runtime.jobs.stages import Stages, Worker, read_any

STALL_SECONDS = 600.0
"""Long enough that only the interrupted job's shutdown ends a stalled worker."""


def stalling(after: int, seconds: float = STALL_SECONDS) -> Stages:
    """Each graph worker stalls once it has taken `after` files (until the job is interrupted, so a test
    can stop a job mid-way however fast the workers are)."""

    class StallingWorker(Worker):
        taken = 0

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            if self.taken >= after:
                import time

                time.sleep(seconds)
                raise RuntimeError(f"stalling worker: the job was not interrupted within {seconds:.0f} s")
            self.taken += len(batch["path"])
            return super().__call__(batch)

    return Stages(worker=StallingWorker)


def dying_once(name: str, marker: str) -> Stages:
    """One graph worker process dies (os._exit) on the file named `name`, once: `marker` records it."""

    class DyingOnceWorker(Worker):
        def process(self, paths: Any, feats: Any) -> list[Any]:
            import os
            from pathlib import Path, PurePosixPath

            if any(PurePosixPath(p).name == name for p in paths) and not os.path.exists(marker):
                Path(marker).write_text("crashed once\n")
                os._exit(1)
            return super().process(paths, feats)

    return Stages(worker=DyingOnceWorker)


def dying_always(name: str, stage: str) -> Stages:
    """The process handling the file named `name` dies (os._exit) every time, in `stage` ("read": the CPU
    task, "run": the graph worker), as an out-of-memory kill or a decoder's segfault would."""
    if stage == "read":

        def read(path: str) -> Any:
            import os
            from pathlib import PurePosixPath

            if PurePosixPath(path).name == name:
                os._exit(1)
            return read_any(path)

        return Stages(read=read)

    class DyingWorker(Worker):
        def process(self, paths: Any, feats: Any) -> list[Any]:
            import os
            from pathlib import PurePosixPath

            if any(PurePosixPath(p).name == name for p in paths):
                os._exit(1)
            return super().process(paths, feats)

    return Stages(worker=DyingWorker)
