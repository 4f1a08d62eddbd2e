"""Every AudioLDM-family checkpoint: each published --config, model_index.json, the scaling factor
as recorded, and the refusals of checkpoints that do not fit the contract."""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recon_runtime import Reconstructor
from recon_runtime.contract import (
    CONTRACT_FILE,
    FP32,
    REL_L2_THRESHOLDS,
    SOURCE_FAMILY,
    SOURCE_PIPELINE,
    SOURCE_SCALING_FACTOR,
    read_contract,
)

from .conftest import run_cli, torch_missing

pytestmark = torch_missing

DECODE_REL_L2 = 1e-4  # the runtime's decode vs PyTorch's decoder + vocoder, fp32
_DELETE = object()  # _edit_json: remove the key


def _published() -> dict[str, Any]:
    from recon_export.families import PUBLISHED, TINY

    return {name: spec for name, spec in PUBLISHED.items() if name != TINY}


def write_model_index(folder: Path, pipeline_class: str, **components: list[str | None]) -> Path:
    """A model_index.json as diffusers' save_pretrained writes it (only the two components the export reads)."""
    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"],
        "vocoder": ["transformers", "SpeechT5HifiGan"],
        **components,
    }
    path = Path(folder) / "model_index.json"
    path.write_text(json.dumps(index, indent=2))
    return path


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ --config


@pytest.mark.parametrize("config", list(_published()))
def test_each_published_config_exports_with_parity(config: str, tmp_path: Path) -> None:
    """The family's facts (family, pipeline, scaling factor) on the tiny architecture: the export's own
    parity gate against PyTorch passes, and the runtime decodes like PyTorch."""
    import torch

    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import (
        FROM_CALIBRATION,
        SOURCE_PUBLISHED_SCALING_FACTOR,
        SOURCE_PUBLISHED_SCALING_FACTOR_FROM,
        build_random,
    )
    from recon_export.families import FAMILY_PIPELINES
    from recon_export.validate import CALIBRATION_FRAMES, CALIBRATION_KINDS, mel_batch

    spec = _published()[config]
    ckpt = build_random(config, seed=2, tiny=True)
    contract = export_bundle(ckpt, tmp_path / "b", precisions=[FP32])
    assert contract.family == spec.family and contract.pipeline_class == FAMILY_PIPELINES[spec.family]
    assert contract.source["config"] == config and contract.source["tiny"] is True
    # random weights are always calibrated; the checkpoint's quoted factor is information only
    assert contract.source[SOURCE_SCALING_FACTOR] == FROM_CALIBRATION
    assert contract.source[SOURCE_PUBLISHED_SCALING_FACTOR] == spec.published_scaling_factor
    quoted_from = contract.source[SOURCE_PUBLISHED_SCALING_FACTOR_FROM]
    assert (quoted_from is None) == (spec.published_scaling_factor is None)
    assert quoted_from is None or ("as quoted from" in quoted_from and "not verified against the hub" in quoted_from)
    for g in contract.graphs:
        assert g.rel_l2 is not None and g.rel_l2 <= REL_L2_THRESHOLDS[FP32], g
    rec = Reconstructor.load(tmp_path / "b", provider="cpu", precision=FP32)
    # the bundle's latents are unit-scale, on the calibration signals and on others
    for seed in (100, 7):
        mel = mel_batch(CALIBRATION_KINDS, CALIBRATION_FRAMES, seed=seed)
        latent_std = float(rec.run_graphs(("encoder",), mel[:, None])[0].std())
        assert latent_std == pytest.approx(1.0, rel=1e-3 if seed == 100 else 0.3), (seed, latent_std)
    z = np.random.default_rng(4).standard_normal((2, 8, 25, 16)).astype(np.float32)
    with torch.no_grad():
        mel = ckpt.vae.decode(torch.from_numpy(z) / contract.scaling_factor).sample
        ref = ckpt.vocoder(mel.squeeze(1)).numpy()[:, : 25 * 640]
    got = rec.decode(z)
    assert got.shape == ref.shape
    assert float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) <= DECODE_REL_L2


@pytest.mark.full
def test_full_size_musicldm_config_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "musicldm"
    result = run_cli(
        "recon-export", "--random-weights", "--config", "musicldm", "--precision", "fp32", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "family musicldm (MusicLDMPipeline)" in result.stderr
    contract = read_contract(out)
    assert contract.vae_config["block_out_channels"] == [128, 256, 512]
    assert contract.vocoder_config["upsample_initial_channel"] == 1024
    assert contract.source["published_scaling_factor"] == 1.075324296951294  # information only
    assert contract.source["scaling_factor_from"] == "calibrated on random weights"
    for g in contract.graphs:
        assert g.rel_l2 is not None and g.rel_l2 <= REL_L2_THRESHOLDS[FP32], g
    print({g.role: f"{g.rel_l2:.2e}" for g in contract.graphs})


def test_calibrated_scaling_factor_gives_latents_of_unit_std() -> None:
    """The encoder graph returns means times its current factor; calibration must divide that out."""
    import torch

    from recon_export.checkpoint import build_random
    from recon_export.graphs import EncoderGraph
    from recon_export.validate import CALIBRATION_FRAMES, CALIBRATION_KINDS, calibrate_scaling_factor, mel_batch

    vae = build_random("audioldm2", seed=0, tiny=True).vae
    vae.register_to_config(scaling_factor=0.411)  # a start far from what these weights need
    vae.register_to_config(scaling_factor=calibrate_scaling_factor(EncoderGraph(vae)))
    mel = torch.from_numpy(mel_batch(CALIBRATION_KINDS, CALIBRATION_FRAMES, seed=100))[:, None]
    with torch.no_grad():
        z, _ = EncoderGraph(vae)(mel)
    assert float(z.std()) == pytest.approx(1.0, rel=1e-4)


def test_random_checkpoints_are_calibrated_once(tmp_path: Path) -> None:
    from recon_export.checkpoint import FROM_CALIBRATION, build_random, calibrate, save_checkpoint

    a, b = build_random("tiny", seed=0), build_random("tiny", seed=0)
    assert a.source[SOURCE_SCALING_FACTOR] == FROM_CALIBRATION and not a.calibrated
    calibrate(a)
    factor = a.scaling_factor
    calibrate(a)
    assert a.calibrated and a.scaling_factor == factor != 1.0
    save_checkpoint(b, tmp_path / "ckpt")  # saved like a trained checkpoint: with its factor
    assert json.loads((tmp_path / "ckpt" / "vae" / "config.json").read_text())["scaling_factor"] == factor
    quoted = build_random("audioldm2", seed=0, tiny=True)  # a quoted factor changes nothing
    assert not quoted.calibrated and quoted.source[SOURCE_SCALING_FACTOR] == FROM_CALIBRATION


def test_reference_checkpoint_rebuilds_a_random_bundles_own_weights(tiny_bundle: Path, tmp_path: Path) -> None:
    """What benchmarks compare and time a bundle against: its config, seed, tiny flag and factor."""
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import build_random, decoding_weights_sha256, reference_checkpoint

    exported = export_bundle(build_random("audioldm2", seed=5, tiny=True), tmp_path / "b", [FP32], validate=False)
    rebuilt = reference_checkpoint(read_contract(tmp_path / "b"))
    assert decoding_weights_sha256(rebuilt) == exported.weights_sha256
    trained = read_contract(tiny_bundle)  # trained weights: random ones of the same (tiny) architecture
    stand_in = reference_checkpoint(trained)
    assert list(stand_in.vae.config.block_out_channels) == list(trained.vae_config["block_out_channels"])
    assert stand_in.vocoder.config.upsample_initial_channel == trained.vocoder_config["upsample_initial_channel"]


def test_the_docs_table_is_the_published_table() -> None:
    """docs/pipelines.md lists each --config with its hub id, family, pipeline and quoted factor."""
    import re

    docs = (Path(__file__).parents[1] / "docs" / "pipelines.md").read_text()
    rows = re.findall(r"^\| `([\w./-]+)` \| (\w+) \| `(\w+)` \| ([^|]+?) \| `([\w.-]+)` \|$", docs, re.M)
    expected = [
        (
            p.hub_id,
            p.family,
            p.pipeline_class,
            repr(p.published_scaling_factor) if p.published_scaling_factor else "not quoted",
            p.name,
        )
        for p in _published().values()
    ]
    assert rows == expected


# ------------------------------------------------------------------------------------------ model_index.json


@pytest.mark.parametrize(
    ("pipeline_class", "family"),
    [("AudioLDMPipeline", "audioldm"), ("MusicLDMPipeline", "musicldm"), ("AudioLDM2Pipeline", "audioldm2")],
)
def test_model_index_names_family_and_pipeline(
    pipeline_class: str, family: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from recon_export.checkpoint import load_checkpoint

    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    write_model_index(ckpt, pipeline_class, unet=["diffusers", "UNet2DConditionModel"])
    source = load_checkpoint(str(ckpt)).source
    assert source[SOURCE_FAMILY] == family and source[SOURCE_PIPELINE] == pipeline_class


def test_scaling_factor_is_read_from_the_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from recon_export.bundle import export_bundle
    from recon_export.checkpoint import FROM_CHECKPOINT, load_checkpoint

    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    write_model_index(ckpt, "MusicLDMPipeline")
    _edit_json(ckpt / "vae" / "config.json", scaling_factor=1.075324296951294)
    contract = export_bundle(load_checkpoint(str(ckpt)), tmp_path / "b", precisions=[FP32], validate=False)
    assert contract.scaling_factor == 1.075324296951294
    assert contract.source[SOURCE_SCALING_FACTOR] == FROM_CHECKPOINT
    info = run_cli("recon-run", "info", "--model", str(tmp_path / "b"))
    assert info.returncode == 0, info.stderr
    assert "family musicldm, pipeline MusicLDMPipeline" in info.stdout
    assert "scaling factor 1.075324296951294 (vae/config.json;" in info.stdout


def test_a_folder_without_model_index_records_no_family(tiny_bundle: Path) -> None:
    contract = read_contract(tiny_bundle)
    assert contract.family is None and contract.pipeline_class is None
    info = run_cli("recon-run", "info", "--model", str(tiny_bundle))
    assert info.returncode == 0, info.stderr
    assert "family and pipeline not recorded (no model_index.json at export)" in info.stdout


def test_bundles_exported_before_the_family_was_recorded_still_read(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "old"))
    raw = json.loads((bundle / CONTRACT_FILE).read_text())
    for key in (SOURCE_FAMILY, SOURCE_PIPELINE, SOURCE_SCALING_FACTOR):
        raw["source"].pop(key)
    (bundle / CONTRACT_FILE).write_text(json.dumps(raw))
    contract = read_contract(bundle)
    assert contract.family is None and contract.source == raw["source"]
    assert Reconstructor.load(bundle, provider="cpu").decode(np.zeros((8, 4, 16), np.float32)).shape == (2560,)
    info = run_cli("recon-run", "info", "--model", str(bundle))
    assert info.returncode == 0 and "(from the checkpoint; baked into the graphs)" in info.stdout
    assert "family and pipeline not recorded (exported before families were recorded)" in info.stdout


def test_the_tiny_test_architecture_says_it_has_no_family(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from recon_export.cli import main

    out = tmp_path / "tiny"
    args = ["--random-weights", "--config", "tiny", "--precision", "fp32", "--no-validate", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "family not recorded (test architecture)" in result.output
    info = run_cli("recon-run", "info", "--model", str(out))
    assert info.returncode == 0, info.stderr
    assert "family and pipeline not recorded (test architecture)" in info.stdout


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("kernels", "rule"),
    [
        ([16, 16, 8, 4, 4], (160, 32)),
        ([10, 8, 4, 4, 4], (160, 32)),
        ([16, 16, 8, 4, 5], (160, 33)),
        ([15, 16, 8, 4, 4], (160, 0)),
    ],
)
def test_vocoder_length_rule_is_what_speecht5_hifigan_gives(kernels: list[int], rule: tuple[int, int]) -> None:
    """The length arithmetic the refusal relies on, against the module itself (tiny channels)."""
    import torch
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from recon_export.checkpoint import _VOCODER_TINY, vocoder_length_rule

    rates = _VOCODER_TINY["upsample_rates"]
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**{**_VOCODER_TINY, "upsample_kernel_sizes": kernels})).eval()
    a, b = vocoder_length_rule(rates, kernels)
    assert (a, b) == rule
    for frames in (1, 7):
        with torch.no_grad():
            assert vocoder(torch.zeros(1, frames, 64)).shape[-1] == a * frames + b


def _audioldm_48k(ckpt: Path) -> None:
    """The 48 kHz AudioLDM's interface: 16 latent channels, downsampling by 8, 256 mels, hop 480."""
    _edit_json(
        ckpt / "vae" / "config.json",
        latent_channels=16,
        block_out_channels=[16, 32, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
    )
    _edit_json(ckpt / "vocoder" / "config.json", model_in_dim=256, sampling_rate=48000, upsample_rates=[6, 5, 4, 2, 2])


def _stable_diffusion_vae(ckpt: Path) -> None:
    _edit_json(
        ckpt / "vae" / "config.json",
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=[128, 256, 512, 512],
        scaling_factor=0.18215,
    )


REFUSALS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "audioldm-48k": (
        _audioldm_48k,
        [
            "vae/config.json latent_channels: expected 8, found 16",
            "vae/config.json block_out_channels: expected 3 levels (downsampling by 4), found 4",
            "vocoder/config.json model_in_dim: expected 64, found 256",
            "vocoder/config.json sampling_rate: expected 16000, found 48000",
            "vocoder/config.json upsample_rates: expected a product of 160 (hop 160), found [6, 5, 4, 2, 2] (hop 480)",
        ],
    ),
    "stable-diffusion-vae": (
        _stable_diffusion_vae,
        [
            "vae/config.json in_channels: expected 1, found 3",
            "vae/config.json out_channels: expected 1, found 3",
            "vae/config.json latent_channels: expected 8, found 4",
        ],
    ),
    "vocoder-of-another-rate": (
        lambda ckpt: _edit_json(ckpt / "vocoder" / "config.json", sampling_rate=22050),
        ["vocoder/config.json sampling_rate: expected 16000, found 22050"],
    ),
    "no-scaling-factor": (
        lambda ckpt: _edit_json(ckpt / "vae" / "config.json", scaling_factor=_DELETE),
        ["vae/config.json scaling_factor: expected the checkpoint's learned value > 0, found None"],
    ),
    "pipeline-of-another-family": (
        lambda ckpt: write_model_index(ckpt, "StableDiffusionPipeline"),
        [
            "model_index.json _class_name: expected one of AudioLDM2Pipeline, AudioLDMPipeline, MusicLDMPipeline, "
            "found 'StableDiffusionPipeline'"
        ],
    ),
    "model-index-with-another-vae": (
        lambda ckpt: write_model_index(ckpt, "AudioLDM2Pipeline", vae=["diffusers", "AutoencoderTiny"]),
        ["model_index.json vae: expected ['diffusers', 'AutoencoderKL'], found ['diffusers', 'AutoencoderTiny']"],
    ),
    # valid JSON of the wrong type: one line, never a traceback
    "vae-blocks-not-a-list": (
        lambda ckpt: _edit_json(ckpt / "vae" / "config.json", block_out_channels=5),
        ["vae/config.json block_out_channels: expected a list of 3 ints, found 5"],
    ),
    "model-index-class-name-not-a-string": (
        lambda ckpt: write_model_index(ckpt, ["x"]),
        [
            "model_index.json _class_name: expected one of AudioLDM2Pipeline, AudioLDMPipeline, MusicLDMPipeline, "
            "found ['x']"
        ],
    ),
    "model-index-vae-not-a-list": (
        lambda ckpt: write_model_index(ckpt, "AudioLDM2Pipeline", vae=3),
        ["model_index.json vae: expected ['diffusers', 'AutoencoderKL'], found 3"],
    ),
    "vocoder-rates-not-a-list": (
        lambda ckpt: _edit_json(ckpt / "vocoder" / "config.json", upsample_rates=160),
        ["vocoder/config.json upsample_rates: expected a list of ints with a product of 160 (hop 160), found 160"],
    ),
    "vocoder-tail-of-another-length": (  # 160 * T + 33 samples: the runtime's 32-sample tail would be wrong
        lambda ckpt: _edit_json(ckpt / "vocoder" / "config.json", upsample_kernel_sizes=[16, 16, 8, 4, 5]),
        [
            "vocoder/config.json upsample_kernel_sizes: expected kernels that give 160*T + 32 samples for T frames "
            "with upsample_rates [5, 4, 2, 2, 2], found [16, 16, 8, 4, 5] (160*T + 33)"
        ],
    ),
    "vocoder-even-resblock-kernel": (
        lambda ckpt: _edit_json(ckpt / "vocoder" / "config.json", resblock_kernel_sizes=[3, 4]),
        ["vocoder/config.json resblock_kernel_sizes: expected a list of odd ints (an even kernel changes the length)"],
    ),
    "vocoder-config-transformers-refuses": (
        lambda ckpt: _edit_json(ckpt / "vocoder" / "config.json", leaky_relu_slope="steep"),
        ["vocoder/config.json: not a SpeechT5HifiGan config (", "leaky_relu_slope"],
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_checkpoint_that_does_not_fit_is_refused_before_loading_or_tracing(
    case: str, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recon_export import graphs

    from .test_export import _export

    def no_tracing(*args: object, **kwargs: object) -> None:
        raise AssertionError("traced a graph of a refused checkpoint")

    monkeypatch.setattr(graphs, "export_fp32", no_tracing)
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    for weights in ckpt.rglob("*.safetensors"):  # refused from the configs alone: the weights are never read
        weights.write_bytes(b"not safetensors")
    mutate, expected = REFUSALS[case]
    mutate(ckpt)
    code, line = _export("--model", str(ckpt), "--out", str(tmp_path / "b"))
    assert code == 1 and line.startswith(f"error: {ckpt}: ")
    for fragment in expected:
        assert fragment in line, line
    assert not (tmp_path / "b").exists()


# Every field the pre-load checks read, with JSON of the wrong type (or shape): each is one line naming
# the field, exit 1, no traceback. None means "absent" where a field may be left out.
_WRONG = [None, "x", 1.5, True, [], {}, [1, "a"], [[1]], ["diffusers"], ["diffusers", 3]]
FUZZED_FIELDS: dict[str, tuple[str, list[Any]]] = {
    **{
        f"vae.{field}": ("vae/config.json", _WRONG)
        for field in (
            "in_channels",
            "out_channels",
            "latent_channels",
            "block_out_channels",
            "down_block_types",
            "up_block_types",
        )
    },
    "vae._class_name": ("vae/config.json", [v for v in _WRONG if v is not None]),
    "vae.scaling_factor": ("vae/config.json", [v for v in _WRONG if v != 1.5]),  # 1.5 is a valid factor
    **{
        f"vocoder.{field}": ("vocoder/config.json", _WRONG)
        for field in (
            "model_in_dim",
            "sampling_rate",
            "upsample_rates",
            "upsample_kernel_sizes",
            "resblock_kernel_sizes",
            "resblock_dilation_sizes",
            "normalize_before",
        )
    },
    "model_index._class_name": ("model_index.json", _WRONG),
    "model_index.vae": ("model_index.json", [v for v in _WRONG if v is not None]),
    "model_index.vocoder": ("model_index.json", [v for v in _WRONG if v is not None]),
}


@pytest.mark.parametrize("name", list(FUZZED_FIELDS))
def test_wrong_json_types_in_every_checked_field_are_one_line(name: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from .test_export import _export

    file, values = FUZZED_FIELDS[name]
    field = name.split(".", 1)[1]
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    for weights in ckpt.rglob("*.safetensors"):  # a field that slipped through would fail later, differently
        weights.write_bytes(b"not safetensors")
    original = (ckpt / file).read_text() if (ckpt / file).exists() else None
    for value in values:
        if original is None:
            write_model_index(ckpt, "AudioLDM2Pipeline", **{field: value})
        else:
            data = json.loads(original)
            data[field] = value
            (ckpt / file).write_text(json.dumps(data))
        code, line = _export("--model", str(ckpt), "--out", str(tmp_path / "b"))
        assert code == 1 and line.startswith(f"error: {ckpt}: "), (value, line)
        assert f"{file} {field}:" in line or f"{file}: " in line, (value, line)
        assert field in line, (value, line)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("file", "changes", "fragment"),
    [
        ("vae/config.json", {"block_out_channels": 5}, "block_out_channels: expected a list of 3 ints, found 5"),
        ("model_index.json", {"_class_name": ["x"]}, "_class_name: expected one of"),
        ("vocoder/config.json", {"upsample_rates": 160}, "upsample_rates: expected a list of ints"),
        ("vocoder/config.json", {"leaky_relu_slope": "x"}, "not a SpeechT5HifiGan config"),
    ],
)
def test_wrong_json_types_through_the_cli(
    file: str, changes: dict[str, Any], fragment: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    if file == "model_index.json":
        write_model_index(ckpt, "AudioLDM2Pipeline", **changes)
    else:
        _edit_json(ckpt / file, **changes)
    result = run_cli("recon-export", "--model", str(ckpt), "--out", str(tmp_path / "b"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {ckpt}: ") and fragment in errors[0], result.stderr
    assert not (tmp_path / "b").exists()


def _fake_hub(repo: Path, cache: Path, requested: list[list[str]]) -> Callable[..., str]:
    """snapshot_download serving a local folder: the files matching allow_patterns, in snapshots/<commit>."""
    commit = "0123456789abcdef0123456789abcdef01234567"

    def snapshot_download(repo_id: str, revision: str | None = None, allow_patterns: list[str] = ()) -> str:
        requested.append(list(allow_patterns))
        assert revision in (None, commit)
        snap = cache / repo_id.replace("/", "--") / "snapshots" / commit
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, snap / rel)
        snap.mkdir(parents=True, exist_ok=True)
        return str(snap)

    return snapshot_download


def test_hub_checkpoints_are_checked_before_their_weights_download(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from recon_export.checkpoint import load_checkpoint
    from recon_export.errors import CheckpointError

    good = Path(shutil.copytree(tiny_checkpoint, tmp_path / "good"))
    write_model_index(good, "AudioLDMPipeline")
    bad = Path(shutil.copytree(good, tmp_path / "bad"))
    _audioldm_48k(bad)
    requested: list[list[str]] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(bad, tmp_path / "cache-bad", requested))
    with pytest.raises(CheckpointError, match="someone/audioldm-48k: not an AudioLDM-family VAE/vocoder"):
        load_checkpoint("someone/audioldm-48k")
    assert requested == [["model_index.json", "vae/*.json", "vocoder/*.json"]]  # no weights fetched

    requested.clear()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(good, tmp_path / "cache-good", requested))
    ckpt = load_checkpoint("someone/audioldm")
    assert [p[0] for p in requested] == ["model_index.json", "vae/*.safetensors"]
    assert ckpt.source["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert ckpt.source[SOURCE_FAMILY] == "audioldm" and ckpt.source["format"] == "hub"


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_snapshot_without_model_index_says_why_the_family_is_not_recorded(
    offline: bool,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Offline, the cached snapshot may lack a model_index.json the repository has: one warning says so."""
    import huggingface_hub

    from recon_export.checkpoint import load_checkpoint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(tiny_checkpoint, tmp_path / "cache", []))
    with caplog.at_level("WARNING", logger="recon_export"):
        ckpt = load_checkpoint("someone/audioldm2")
    assert ckpt.source[SOURCE_FAMILY] is None
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("recon_export")]
    assert len(warnings) == 1, warnings
    assert (
        warnings[0].startswith("someone/audioldm2: no model_index.json in the ")
        and "family and pipeline" in warnings[0]
    )
    assert ("HF_HUB_OFFLINE" in warnings[0]) == offline


@pytest.mark.parametrize(
    ("sub", "field", "value", "expected"),
    [
        ("vae", "layers_per_block", 2, "weights the config needs are missing"),  # more layers than the weights
        ("vocoder", "resblock_dilation_sizes", [[1, 3, 5], [1, 3, 5]], "weights the config needs are missing"),
        ("vae", "block_out_channels", [16, 32, 64], "size mismatch"),  # diffusers refuses this one itself
    ],
)
def test_weights_that_do_not_fit_their_config_are_refused(
    sub: str, field: str, value: Any, expected: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """diffusers and transformers would initialise the missing weights at random with a warning, and
    parity would then pass on those random weights: the load refuses instead."""
    from .test_export import _export

    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    _edit_json(ckpt / sub / "config.json", **{field: value})
    code, line = _export("--model", str(ckpt), "--out", str(tmp_path / "b"), "--precision", "fp32")
    assert code == 1 and line.startswith(f"error: {ckpt / sub}: "), line
    assert expected in line, line
    assert not (tmp_path / "b").exists()
