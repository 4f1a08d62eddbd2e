"""Dataset jobs on Ray Data: encode a whole dataset to latents, reconstruct it, or evaluate it.

Pipeline: the driver lists the inputs (folders, files, CSV/Parquet manifests, local or any file
system pyarrow opens) and drops the files already done -> CPU tasks read, decode and run the front
end (`Reconstructor.features`) -> an actor pool (`map_batches` with a class holding one
`Reconstructor`, so the graphs load once per worker) runs the graphs and writes the results ->
the driver counts what came back and prints a summary.

Output folder (`OUT`, a local path; on a cluster, one every node mounts):

- `job.json`: the job (a format marker, mode, bundle fingerprint, output settings); a rerun with
  another mode (with or without --no-resume), bundle or settings is refused.
- `latents/` (encode), `done/` (reconstruct), `metrics/` (evaluate): Parquet shards, one row per
  file, keyed by (`path`, `size`, `mtime_ns`); reconstruct's audio goes under `audio/`, mirroring
  the input tree as `recon-run reconstruct` does.
- `errors/`: Parquet shards, one row per failed file (`path`, `size`, `mtime_ns`, `stage`, `message`).
- `outputs/` (reconstruct): the audio each run is about to write (a plan, owning nothing), and
  right after each write that file's size and mtime (relative to OUT, as `done/` records it): the
  job owns a file under `audio/` only while it is still of a size and mtime recorded for it.
- `attempts/`: per-batch attempt markers while a run goes (see `_Attempts`).
- `summary.json` (and for evaluate `metrics-summary.json`: mean, median, p95 per metric).
- `job.lock` while a job runs (`OutLock`): a second job on the same folder is refused.

OUT must be empty or a job's folder: a job.json that is not a job record (`read_job`) or a
job.lock that is not a lock record makes it the user's, refused whole. The job never overwrites a
file it did not write, never reads its own outputs as inputs, and --no-resume deletes only what
the job wrote (`start_over`). Ctrl-C ends a job within seconds (`stop_ray`), keeping what was
written.

Resume: a rerun skips every file that has a row (result or error) with the same key and does the
rest; `retry_errors` runs the failed ones again. A graph worker writes both of a batch's shards
(results and errors, even empty) atomically under a name derived from the whole batch's keys, so a
batch that Ray runs again after a worker died replaces its own rows; compaction at the start of a
run removes repeated keys and error rows of files that have a result. Ray's retries are bounded,
and a file that kills its worker every time ends as an error row (`_Attempts`).

ray and pyarrow (the `ray` extra) are imported only inside functions: importing this package (or
`recon_runtime`) never imports them.
"""
