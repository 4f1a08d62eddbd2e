"""Write a validated bundle: graphs per precision, stamped metadata, hashes, `recon.json`.

Everything is written into a temporary folder beside the destination and moved into place only
when every graph passed validation, so a failed export leaves no half-written bundle.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import platform
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from recon_runtime.contract import (
    BF16_KEY,
    CHAIN_BUDGET_KEY,
    CHAIN_LOG_MEL_L1_BUDGET,
    DEFAULT_OPSET,
    EXPECTED_MEL,
    FP16,
    FP16_ARITHMETIC_KEY,
    FP32,
    GRAPH_SPECS,
    INT8,
    PRECISIONS,
    REL_L2_THRESHOLDS,
    ROLES,
    SOURCE_SCALING_FACTOR,
    Contract,
    GraphEntry,
    sha256_file,
)

from . import graphs
from .checkpoint import FROM_CHECKPOINT, Checkpoint, calibrate, config_dict, decoding_weights_sha256
from .errors import ExportError, ParityError
from .validate import (
    bf16_check,
    failures,
    fp16_arithmetic,
    reference,
    validate_precision,
)

_LOGGER = logging.getLogger(__name__)
EXPORTABLE_PRECISIONS = (FP16, FP32, INT8)
TORCH_VALIDATED = (FP16, FP32)  # int8 is checked against the fp32 graphs with its own budgets
TOOL_DISTRIBUTIONS = (
    "audioldm2-recon",
    "torch",
    "diffusers",
    "transformers",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "openvino",
    "numpy",
    "librosa",
)


@dataclass
class Progress:
    """Prints each step with its duration (the CLI passes click.echo)."""

    echo: Callable[[str], None] = lambda s: _LOGGER.info("%s", s)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.echo(f"  {what} ...")
        yield
        self.echo(f"  {what}: done in {time.perf_counter() - t0:.1f} s")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in TOOL_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _prepare_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "recon.json").is_file():
            raise ExportError(f"{out}: folder exists and is not empty (and holds no bundle); choose another --out")
        if not force:
            raise ExportError(f"{out}: a bundle is already there; pass --force to replace it")
        foreign = _files_not_of_the_bundle(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ExportError(
                f"{out}: holds files its bundle does not list ({shown}); --force replaces only a bundle: "
                "move them or choose another --out"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{out.parent}: cannot create the output folder ({e.strerror or e})") from None


def _files_not_of_the_bundle(out: Path) -> list[str]:
    """Entries of `out` that its recon.json does not list (its graphs and recon.json itself): what
    `--force` must not delete. An unreadable recon.json lists nothing, so every other entry counts."""
    listed = {"recon.json"}
    try:
        manifest = json.loads((out / "recon.json").read_text())
        listed |= {str(g["file"]) for g in manifest.get("graphs", []) if isinstance(g, dict) and "file" in g}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return sorted(p.name for p in out.iterdir() if p.name not in listed or not p.is_file())


def _new_partial_folder(out: Path) -> Path:
    """A new, empty folder beside `out` with the permissions of any new folder (the umask applies).

    tempfile.mkdtemp makes it 0700, which the rename would give to the bundle.
    """
    for _ in range(100):
        tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.partial"
        try:
            tmp.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary folder name", str(out.parent))


def _disk_error(where: Path, e: OSError) -> ExportError:
    if e.errno == errno.ENOSPC:
        return ExportError(f"{where}: disk full while writing the bundle; free space or choose another --out")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExportError(f"{where}: output folder not writable ({e.strerror}); choose another --out")
    return ExportError(f"{where}: cannot write ({e.strerror or e})")


def export_bundle(
    ckpt: Checkpoint,
    out: Path,
    precisions: Sequence[str] = (FP16, FP32),
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    force: bool = False,
    progress: Progress | None = None,
    calibration: Path | None = None,
    int8_budgets: dict[str, float] | None = None,
) -> Contract:
    """Export, convert, stamp, validate and write a bundle to `out`. Returns its contract.

    int8 needs the fp32 graphs (it is quantized from them and falls back to them), so asking for
    int8 adds fp32. `calibration` is a folder of the user's audio for int8 (default: built-in set).
    """
    progress = progress or Progress()
    out = Path(out)
    unknown = [p for p in precisions if p not in EXPORTABLE_PRECISIONS]
    if unknown or not precisions:
        raise ExportError(
            f"precision {unknown or precisions} not exportable; choose from {', '.join(EXPORTABLE_PRECISIONS)}"
        )
    if INT8 in precisions and FP32 not in precisions:
        precisions = [*precisions, FP32]
    precisions = [p for p in PRECISIONS if p in precisions]
    _prepare_destination(out, force)
    if not ckpt.calibrated:
        with progress.step("calibrate scaling factor (random weights)"):
            calibrate(ckpt)
    modules = graphs.wrappers(ckpt.vae, ckpt.vocoder)
    progress.echo(
        f"  scaling factor {ckpt.scaling_factor!r} ({ckpt.source.get(SOURCE_SCALING_FACTOR, FROM_CHECKPOINT)})"
    )
    contract = Contract(
        source=ckpt.source,
        vae_config=config_dict(ckpt.vae),
        vocoder_config=config_dict(ckpt.vocoder),
        mel=EXPECTED_MEL,
        scaling_factor=ckpt.scaling_factor,
        graphs=(),
        validation={},
        tools=tool_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        weights_sha256=decoding_weights_sha256(ckpt),
    )
    try:
        tmp = _new_partial_folder(out)
    except OSError as e:
        raise _disk_error(out.parent, e) from None
    try:
        float_precisions = [p for p in precisions if p in TORCH_VALIDATED]
        entries = _write_graphs(modules, contract, tmp, float_precisions, opset, progress)
        validation: dict[str, Any] = {"enabled": validate}
        if validate:
            entries, validation = _validate(modules, entries, tmp, float_precisions, progress)
        if validate and FP16 in precisions:
            with progress.step("measure fp16 arithmetic (PyTorch float16 on the CPU, one 10.24 s window)"):
                validation[FP16_ARITHMETIC_KEY] = check = fp16_arithmetic(modules)
            progress.echo(
                "  fp16 arithmetic: "
                + "; ".join(
                    f"{r} rel-L2 {v['rel_l2']:.2%}" if v["finite"] else f"{r} NOT FINITE"
                    for r, v in check["results"].items()
                )
                + (" (passed: auto picks fp16 on CUDA)" if check["passed"] else " (FAILED: auto keeps fp32 on CUDA)")
            )
        if FP32 in precisions:
            validation[BF16_KEY] = _measure_bf16(entries, tmp, validate, progress)
        if INT8 in precisions:
            int8_entries, validation[INT8] = _write_int8(
                contract, entries, tmp, opset, calibration, progress, int8_budgets
            )
            entries += int8_entries
        contract = replace(contract, graphs=tuple(entries), validation=validation)
        contract.save(tmp)
        _move_into_place(tmp, out)
    except OSError as e:
        raise _disk_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return contract


def _measure_bf16(entries: list[GraphEntry], folder: Path, validate: bool, progress: Progress) -> dict[str, Any]:
    """The OpenVINO bf16 plan's errors on this bundle's fp32 graphs (where the CPU computes bf16)."""
    if not validate:
        return {"measured": False, "reason": "exported with --no-validate"}
    files = {e.role: folder / e.file for e in entries if e.precision == FP32}
    with progress.step("measure the bf16 plan (OpenVINO CPU, vs OpenVINO f32)"):
        check = bf16_check(files)
    if not check["measured"]:
        progress.echo(f"  bf16: not measured ({check['reason']})")
        return check
    r = check["results"]
    progress.echo(
        f"  bf16: encoder rel-L2 {r['encoder_rel_l2']:.2%}, vocoder on real mels log-mel L1 "
        f"{r['vocoder_log_mel_l1']:.4f} nats, decoder rel-L2 {r['decoder_rel_l2']:.2%}, chain log-mel L1 "
        f"{r['chain_log_mel_l1']:.3f} nats ({'within budget' if check['passed'] else 'OVER BUDGET'})"
    )
    return check


def _write_graph(
    model: onnx.ModelProto, contract: Contract, folder: Path, role: str, precision: str, opset: int, **fields: Any
) -> GraphEntry:
    """Stamp the contract into `model`, save and check it, and describe it (hash, size) for recon.json."""
    spec = GRAPH_SPECS[role]
    entry = GraphEntry(
        role=role,
        precision=precision,
        file=spec.file_name(precision),
        sha256="",
        size_bytes=0,
        opset=opset,
        inputs=spec.inputs,
        outputs=spec.outputs,
        **fields,
    )
    graphs.stamp(model, contract.metadata_props(entry))
    path = folder / entry.file
    graphs.save(model, path)
    return replace(entry, sha256=sha256_file(path), size_bytes=path.stat().st_size)


def _write_graphs(
    modules: dict[str, Any],
    contract: Contract,
    folder: Path,
    precisions: Sequence[str],
    opset: int,
    progress: Progress,
) -> list[GraphEntry]:
    entries = []
    for role in ROLES:
        with progress.step(f"export {role} (fp32, opset {opset})"):
            fp32_model = graphs.export_fp32(modules[role], role, opset)
        for precision in precisions:
            if precision == FP16:
                with progress.step(f"convert {role} to fp16"):
                    model = graphs.to_fp16(onnx.ModelProto.FromString(fp32_model.SerializeToString()))
                notes: dict[str, Any] = {"kept_fp32_ops": list(graphs.FP16_KEEP_FP32_OPS), "io_dtype": "float32"}
            else:
                model, notes = fp32_model, {}
            with progress.step(f"write and check {GRAPH_SPECS[role].file_name(precision)}"):
                entries.append(_write_graph(model, contract, folder, role, precision, opset, notes=notes))
    return entries


def _write_int8(
    contract: Contract,
    entries: list[GraphEntry],
    folder: Path,
    opset: int,
    calibration: Path | None,
    progress: Progress,
    budgets: dict[str, float] | None = None,
) -> tuple[list[GraphEntry], dict[str, Any]]:
    from .quantize import DEFAULT_SCHEME, QUANTIZED_OPS, describe, quantize_bundle

    fp32 = {e.role: folder / e.file for e in entries if e.precision == FP32}
    with progress.step(f"quantize int8 (calibration: {calibration or 'built-in generated set'})"):
        graph_budgets = {k: v for k, v in (budgets or {}).items() if k != CHAIN_BUDGET_KEY} or None
        chain_budget = (budgets or {}).get(CHAIN_BUDGET_KEY, CHAIN_LOG_MEL_L1_BUDGET)
        results, chain, trajectory = quantize_bundle(fp32, calibration, progress.echo, graph_budgets, chain_budget)
    costs = describe(results, chain)
    out = []
    for role in ROLES:
        res = results[role]
        notes = {
            "kept_fp32_blocks": res.kept_fp32,
            "int8_mac_share": round(res.int8_share, 4),
            "quantized_ops": list(QUANTIZED_OPS),
            "scheme": DEFAULT_SCHEME.label(),
            "calibration": str(calibration) if calibration else "built-in generated set",
            "reference": "fp32 ONNX graph",
            "cost": costs[role],
        }
        if res.fp32_fallback:  # no duplicate file: the int8 set points at the fp32 graph
            fp32_entry = next(e for e in entries if e.role == role and e.precision == FP32)
            out.append(
                replace(fp32_entry, precision=INT8, file_precision=FP32, rel_l2=0.0, threshold=res.budget, notes=notes)
            )
            continue
        out.append(
            _write_graph(
                res.model, contract, folder, role, INT8, opset, rel_l2=res.rel_l2, threshold=res.budget, notes=notes
            )
        )
    report = {
        "reference": "fp32 ONNX graphs, on calibration-independent generated signals",
        "graphs": {
            r: {
                "rel_l2": results[r].rel_l2,
                "budget": results[r].budget,
                "kept_fp32_blocks": results[r].kept_fp32,
                "int8_mac_share": results[r].int8_share,
                "fp32_fallback": results[r].fp32_fallback,
            }
            for r in ROLES
        },
        "chain_log_mel_l1": chain,
        "chain_budget": chain_budget,
        "search": trajectory,
    }
    progress.echo(
        "  int8: "
        + "; ".join(f"{r} rel-L2 {results[r].rel_l2:.2%}" for r in ROLES)
        + f"; chain log-mel L1 {chain:.4f} nats"
    )
    return out, report


def _validate(
    modules: dict[str, Any], entries: list[GraphEntry], folder: Path, precisions: Sequence[str], progress: Progress
) -> tuple[list[GraphEntry], dict[str, Any]]:
    with progress.step("run the PyTorch reference"):
        ref = reference(modules)
    reports, problems = {}, []
    for precision in precisions:
        files = {e.role: folder / e.file for e in entries if e.precision == precision}
        with progress.step(f"validate {precision} graphs in onnxruntime (CPU)"):
            reports[precision] = validate_precision(files, precision, ref)
        problems += failures(reports[precision], precision)
    progress.echo(format_report(reports))
    if problems:
        raise ParityError("parity check failed, no bundle written: " + "; ".join(problems))
    updated = [
        replace(e, rel_l2=reports[e.precision][e.role]["rel_l2"], threshold=REL_L2_THRESHOLDS[e.precision])
        for e in entries
    ]
    return updated, {
        "enabled": True,
        "backend": "onnxruntime CPUExecutionProvider",
        "reference": "PyTorch fp32",
        "metric": "rel-L2 = ||onnx - torch|| / ||torch||, worst over inputs and outputs",
        "results": reports,
    }


def format_report(reports: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The validation table printed at the end of an export."""
    lines = [f"  {'precision':<9} {'graph':<8} {'rel-L2':>10} {'threshold':>10}  result"]
    for precision, report in reports.items():
        for name, r in report.items():
            lines.append(
                f"  {precision:<9} {name:<8} {r['rel_l2']:>10.2e} {r['threshold']:>10.0e}  "
                f"{'ok' if r['passed'] else 'FAIL'}"
            )
    return "\n".join(lines)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        # a name of our own beside it: an existing `.NAME.old` may be anybody's
        old = out.with_name(f".{out.name}.{secrets.token_hex(6)}.old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
