"""recon-export: the load path on saved folders, graph parity, the contract, and every user error."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from recon_runtime.contract import (
    CONTRACT_FILE,
    FP16,
    FP32,
    REL_L2_THRESHOLDS,
    ROLES,
    SCHEMA_VERSION,
    Contract,
    read_contract,
    sha256_file,
)
from recon_runtime.errors import BundleError

from .conftest import run_cli, torch_missing, write_checkpoint

pytestmark = torch_missing

UNWRITABLE = Path("/sys/recon-test-bundle")  # the kernel refuses new entries here, even to root


def _ort_run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


# ------------------------------------------------------------------------------------------ bundle


def test_bundle_contract_round_trips_and_hashes_match(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    contract = read_contract(tiny_bundle)
    assert Contract.from_dict(json.loads(json.dumps(contract.to_dict()))) == contract
    assert contract.schema_version == SCHEMA_VERSION
    assert set(contract.precisions) == {FP16, FP32}
    assert contract.source["model"] == str(tiny_checkpoint.resolve())
    assert contract.source["weights"] == "trained"  # loaded from a folder: not flagged random
    raw = json.loads((tiny_bundle / CONTRACT_FILE).read_text())
    for key in ("mel", "scaling_factor", "latent", "vocoder_output", "vae_config", "vocoder_config", "tools"):
        assert key in raw, key
    assert raw["mel"]["silence_log_mel"] == pytest.approx(np.log(1e-5))
    assert raw["mel"]["pad"] == 512 and raw["mel"]["hop_length"] == 160
    assert raw["vocoder_output"]["length_rule"] == "samples = 160 * frames + 32"
    assert {"torch", "diffusers", "transformers", "onnx", "onnxruntime"} <= set(raw["tools"])
    for g in contract.graphs:
        assert sha256_file(tiny_bundle / g.file) == g.sha256
        assert g.rel_l2 is not None and g.rel_l2 <= REL_L2_THRESHOLDS[g.precision]
    for precision in (FP16, FP32):
        assert raw["validation"]["results"][precision]["chain"]["passed"]


def test_onnx_files_carry_the_contract_in_metadata(tiny_bundle: Path) -> None:
    import onnx

    contract = read_contract(tiny_bundle)
    for g in contract.graphs:
        model = onnx.load(str(tiny_bundle / g.file), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["recon.role"] == g.role and meta["recon.precision"] == g.precision
        assert meta["recon.sample_rate"] == "16000" and meta["recon.hop_length"] == "160"
        assert float(meta["recon.scaling_factor"]) == contract.scaling_factor
        assert [i.name for i in model.graph.input] == [t.name for t in g.inputs]
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == list(g.inputs[0].axes)
        if g.precision == FP16:  # fp16 graphs take and return float32
            assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            kinds = {i.data_type for i in model.graph.initializer}
            assert onnx.TensorProto.FLOAT16 in kinds


@pytest.mark.parametrize("precision", [FP32, FP16])
def test_each_graph_matches_pytorch_at_several_lengths(
    tiny_bundle: Path, tiny_checkpoint: Path, precision: str
) -> None:
    import torch

    from recon_export.checkpoint import load_checkpoint
    from recon_export.graphs import wrappers
    from recon_export.validate import mel_batch

    ckpt = load_checkpoint(str(tiny_checkpoint))
    ckpt.vae.register_to_config(scaling_factor=read_contract(tiny_bundle).scaling_factor)
    modules = wrappers(ckpt.vae, ckpt.vocoder)
    limit = REL_L2_THRESHOLDS[precision]
    for frames in (36, 200):  # batch 2 at two lengths
        mel = mel_batch(("speech", "noise"), frames, seed=frames)
        with torch.no_grad():
            mean, std = modules["encoder"](torch.from_numpy(mel)[:, None])
            dec = modules["decoder"](mean)
        enc_out = _ort_run(tiny_bundle / f"encoder.{precision}.onnx", mel[:, None])
        assert enc_out[0].shape == (2, 8, frames // 4, 16)
        assert _rel(mean.numpy(), enc_out[0]) <= limit and _rel(std.numpy(), enc_out[1]) <= limit
        dec_out = _ort_run(tiny_bundle / f"decoder.{precision}.onnx", mean.numpy())[0]
        assert dec_out.shape == (2, 1, frames, 64) and _rel(dec.numpy(), dec_out) <= limit
    for frames in (37, 101, 256):  # the vocoder takes any T, not only multiples of 4
        mel = mel_batch(("music", "sweep"), frames, seed=frames)
        with torch.no_grad():
            wave = modules["vocoder"](torch.from_numpy(mel)).numpy()
        out = _ort_run(tiny_bundle / f"vocoder.{precision}.onnx", mel)[0]
        assert out.shape == (2, 160 * frames + 32) and np.isfinite(out).all()
        assert _rel(wave, out) <= limit


def test_random_weights_have_realistic_activations() -> None:
    import torch

    from recon_export.checkpoint import build_random
    from recon_export.validate import mel_batch

    ckpt = build_random("tiny", seed=0)
    with torch.no_grad():
        wave = ckpt.vocoder(torch.from_numpy(mel_batch(("music",), 64)))
    # transformers' N(0, 0.01) init gives ~1e-7; PyTorch's default conv init is audible
    assert float(wave.abs().max()) > 1e-3


def test_random_weights_cli_bundle_is_flagged_loudly(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_cli("recon-export", "--random-weights", "--config", "tiny", "--out", str(out), "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    assert "RANDOM WEIGHTS" in result.stderr
    for step in ("load", "export", "validate", "done in"):
        assert step in result.stderr
    contract = read_contract(out)
    assert contract.random_weights and contract.precisions == (FP32,)
    info = run_cli("recon-run", "info", "--model", str(out))
    assert info.returncode == 0 and "RANDOM WEIGHTS" in info.stdout
    again = run_cli("recon-export", "--random-weights", "--config", "tiny", "--out", str(out), "--precision", "fp32")
    assert again.returncode == 1 and "--force" in again.stderr


def test_without_out_the_bundle_goes_to_the_per_user_folder_the_runtime_looks_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recon_runtime.locations import USER, resolve_model

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("RECON_MODEL", None)
    work = tmp_path / "work"
    work.mkdir()
    args = ("recon-export", "--random-weights", "--config", "tiny", "--precision", "fp32", "--no-validate")
    result = run_cli(*args, env=env, cwd=work)
    assert result.returncode == 0, result.stderr
    want = tmp_path / "data" / "audioldm2-recon" / "models" / "audioldm2-music"
    assert read_contract(want).random_weights and f"bundle folder {want} (the per-user default" in result.stderr
    assert list(work.iterdir()) == []  # nothing under the current folder (models/ was the old default)
    monkeypatch.setenv("XDG_DATA_HOME", env["XDG_DATA_HOME"])  # platformdirs reads the process's own
    found = resolve_model(env={}, cwd=work)
    assert (found.path, found.origin) == (want, USER)
    assert run_cli("recon-run", "info", "--model", str(want), env=env).returncode == 0


def test_force_replaces_only_a_bundle_never_the_users_files_beside_it(tmp_path: Path) -> None:
    """--force removed the whole folder of any recon.json, with a user's files in it, and deleted any
    existing `.NAME.old` beside it."""
    out = tmp_path / "demo"
    args = ("recon-export", "--random-weights", "--config", "tiny", "--out", str(out), "--precision", "fp32")
    assert run_cli(*args).returncode == 0
    theirs = tmp_path / ".demo.old"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    refused = run_cli(*args, "--force")
    assert refused.returncode == 1 and "notes.txt" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and refused.stderr.strip().splitlines()[-1].startswith("error: "), (
        refused.stderr
    )
    assert (out / "notes.txt").read_text() == "mine too" and (out / "recon.json").is_file()
    (out / "notes.txt").unlink()
    before = (out / "recon.json").read_text()
    replaced = run_cli(*args, "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / "recon.json").read_text())["created"] != json.loads(before)["created"]
    assert (theirs / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.old", "demo"]


# ------------------------------------------------------------------------------------------ tampering


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_graph_is_refused(tiny_bundle: Path, tmp_path: Path, damage: str) -> None:
    from recon_runtime import Reconstructor

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    target = bundle / "decoder.fp32.onnx"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    else:
        target.unlink()
    with pytest.raises(BundleError, match="decoder.fp32.onnx") as err:
        Reconstructor.load(bundle, provider="cpu", precision="fp32", stages=("decoder",))
    assert {"truncate": "size", "flip": "sha256", "delete": "missing"}[damage] in str(err.value)


def test_unknown_schema_version_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    raw = json.loads((bundle / CONTRACT_FILE).read_text())
    raw["schema_version"] = 99
    (bundle / CONTRACT_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="schema_version 99.*\\[2\\]"):
        read_contract(bundle)


# ------------------------------------------------------------------------------------------ errors


def _export(*args: str) -> tuple[int, str]:
    """Run recon-export in-process (torch is already imported); returns exit code and the error line."""
    from click.testing import CliRunner

    from recon_export.cli import main

    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output  # one line, no traceback
    return result.exit_code, lines[0]


def test_error_hub_offline(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("recon-export", "--model", "cvssp/audioldm2-music", "--out", str(tmp_path / "b"), env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cvssp/audioldm2-music:")
    assert "unreachable (offline)" in line and "--random-weights" in line and "local folder" in line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["repository", "revision"])
def test_error_hub_id_or_revision_not_found(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    from recon_export.checkpoint import load_checkpoint
    from recon_export.errors import CheckpointError

    exc = hf_errors.RepositoryNotFoundError if kind == "repository" else hf_errors.RevisionNotFoundError

    import importlib

    http = importlib.import_module(hf_errors.Response.__module__.split(".")[0])  # the hub client's HTTP library
    url = "https://huggingface.co/api/models/someone/no-such-model"
    response = http.Response(404, request=http.Request("GET", url))

    def refuse(*args: object, **kwargs: object) -> None:  # what the hub answers for an unknown id/revision
        raise exc("404 Client Error", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint("someone/no-such-model", revision="v9" if kind == "revision" else None)


def test_error_not_a_folder_or_hub_id(tmp_path: Path) -> None:
    code, line = _export("--model", str(tmp_path / "nowhere" / "ckpt"), "--out", str(tmp_path / "b"))
    assert code == 1 and "no such folder" in line


def test_error_folder_without_vae(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint / "vocoder", ckpt / "vocoder")
    code, line = _export("--model", str(ckpt), "--out", str(tmp_path / "b"))
    assert code == 1 and "no vae/ folder" in line and str(ckpt) in line


def test_error_folder_without_vocoder(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint / "vae", ckpt / "vae")
    code, line = _export("--model", str(ckpt), "--out", str(tmp_path / "b"))
    assert code == 1 and "no vocoder/ folder" in line


def test_error_pickle_weights_need_a_flag(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import torch
    from safetensors.torch import load_file

    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    weights = ckpt / "vocoder" / "model.safetensors"
    torch.save(load_file(str(weights)), ckpt / "vocoder" / "pytorch_model.bin")
    weights.unlink()
    code, line = _export("--model", str(ckpt), "--out", str(tmp_path / "b"))
    assert code == 1 and "--allow-pickle" in line


def test_error_wrong_architecture(tmp_path: Path) -> None:
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny")
    shutil.rmtree(ckpt / "vocoder")
    # SpeechT5's own vocoder: 80 mel bins, hop 256 - a HiFi-GAN, but not AudioLDM2's
    SpeechT5HifiGan(SpeechT5HifiGanConfig(upsample_initial_channel=32)).save_pretrained(ckpt / "vocoder")
    code, line = _export("--model", str(ckpt), "--out", str(tmp_path / "b"))
    assert code == 1 and "not an AudioLDM-family VAE/vocoder" in line
    assert "vocoder/config.json model_in_dim: expected 64, found 80" in line and "(hop 256)" in line


def test_error_output_not_writable(tmp_path: Path) -> None:
    code, line = _export("--random-weights", "--config", "tiny", "--out", str(UNWRITABLE / "bundle"))
    assert code == 1 and "cannot create the output folder" in line
    code, line = _export("--random-weights", "--config", "tiny", "--out", str(UNWRITABLE))
    assert code == 1 and "not writable" in line


def test_error_disk_full_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import build_random
    from recon_export.errors import ExportError

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    with pytest.raises(ExportError, match="disk full"):
        export_bundle(build_random("tiny"), tmp_path / "b", validate=False)
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_writes_no_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import recon_export.validate as validate
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import build_random
    from recon_export.errors import ParityError

    monkeypatch.setattr(validate, "REL_L2_THRESHOLDS", {FP32: 1e-12, FP16: 1e-12})
    with pytest.raises(ParityError, match="fp32 encoder: rel-L2 .* > 1e-12") as err:
        export_bundle(build_random("tiny"), tmp_path / "b", precisions=[FP32])
    assert all(role in str(err.value) for role in ROLES)  # every failure is collected, not just the first
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("budget", ["mixer=0.1", "decoder=abc", "chain=-1", "chain"])
def test_error_bad_int8_budget(tmp_path: Path, budget: str) -> None:
    code, line = _export("--random-weights", "--config", "tiny", "--out", str(tmp_path / "b"), "--int8-budget", budget)
    assert code == 1 and "--int8-budget" in line and budget in line
    assert not (tmp_path / "b").exists()


@torch_missing
def test_bundle_gets_the_umask_permissions(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import os
    import stat

    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import load_checkpoint

    old = os.umask(0o027)
    try:
        out = tmp_path / "bundle"
        export_bundle(load_checkpoint(str(tiny_checkpoint)), out, precisions=("fp32",), validate=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}


@torch_missing
def test_fp16_emulation_rounds_to_fp16_and_overflows_like_fp16() -> None:
    import torch

    from recon_export.validate import FP16_MAX, fp16_emulated

    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with torch.no_grad():
        layer[0].weight.copy_(torch.eye(4) * (1 + 2**-12))  # not representable in fp16: rounds to 1
        layer[0].bias.zero_()
    emulated = fp16_emulated(layer)
    x = torch.tensor([[1.0, 2.0, 3.0, FP16_MAX]])
    with torch.no_grad():
        assert torch.equal(emulated(x[:, :3].repeat(1, 2)[:, :4]), torch.tensor([[1.0, 2.0, 3.0, 1.0]]))
        assert torch.isinf(emulated(x * 2)).any()  # past 65504: inf, as an fp16 graph gives
        assert torch.isfinite(layer(x * 2)).all()  # the fp32 original stays finite
