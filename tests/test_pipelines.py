"""What diffusers' AudioLDM, MusicLDM and AudioLDM2 pipelines generate decodes through a bundle to the
pipeline's own audio.

Each pipeline is built locally from tiny components around the checkpoint's real VAE and vocoder
(no hub): a UNet with 8 latent channels, tiny text encoders that only set dtypes (the prompts go in
as embeddings) and no tokenizers. It is saved with `save_pretrained`, so the bundle is exported
from the folder diffusers wrote, model_index.json and all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recon_runtime import Reconstructor
from recon_runtime.contract import FP32, read_contract

from .conftest import run_cli, torch_missing

pytestmark = torch_missing

PIPELINE_REL_L2 = 1e-4  # the bundle's decode vs the pipeline's own audio, fp32
STEPS = 2
EMBED_DIM = 16
BATCH = 2


def _vae_and_vocoder(checkpoint: Path) -> tuple[Any, Any]:
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan

    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae").eval()
    return vae, SpeechT5HifiGan.from_pretrained(checkpoint / "vocoder").eval()


def _unet_kwargs() -> dict[str, Any]:
    return {
        "sample_size": 16,  # the default length: 16 * 4 latent frames = 0.64 s
        "in_channels": 8,
        "out_channels": 8,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }


def _clap_text() -> Any:
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    config = ClapTextConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        projection_dim=EMBED_DIM,
        max_position_embeddings=40,
    )
    return ClapTextModelWithProjection(config).eval()


def _film_unet() -> Any:
    """AudioLDM's and MusicLDM's UNet: the CLAP embedding enters as a FiLM class embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        **_unet_kwargs(),
        cross_attention_dim=(16, 32),
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=EMBED_DIM,
        class_embeddings_concat=True,
    ).eval()


def _clap_embeds() -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(11)
    return {
        "prompt_embeds": torch.randn(BATCH, EMBED_DIM, generator=g),
        "negative_prompt_embeds": torch.randn(BATCH, EMBED_DIM, generator=g),
    }


def build_audioldm(checkpoint: Path) -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.audioldm.pipeline_audioldm import AudioLDMPipeline

    vae, vocoder = _vae_and_vocoder(checkpoint)
    pipe = AudioLDMPipeline(
        vae=vae,
        text_encoder=_clap_text(),
        tokenizer=None,
        unet=_film_unet(),
        scheduler=DDIMScheduler(),
        vocoder=vocoder,
    )
    return pipe, _clap_embeds()


def build_musicldm(checkpoint: Path) -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.musicldm.pipeline_musicldm import MusicLDMPipeline

    vae, vocoder = _vae_and_vocoder(checkpoint)
    pipe = MusicLDMPipeline(
        vae=vae,
        text_encoder=_clap_text(),
        tokenizer=None,
        feature_extractor=None,
        unet=_film_unet(),
        scheduler=DDIMScheduler(),
        vocoder=vocoder,
    )
    return pipe, _clap_embeds()


def build_audioldm2(checkpoint: Path) -> tuple[Any, dict[str, Any]]:
    import torch
    from diffusers import DDIMScheduler
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import (
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
    )
    from diffusers.pipelines.audioldm2.pipeline_audioldm2 import AudioLDM2Pipeline
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5EncoderModel

    vae, vocoder = _vae_and_vocoder(checkpoint)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=EMBED_DIM, d_kv=8, d_ff=16, num_layers=1, num_heads=2))
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=EMBED_DIM, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    )
    unet = AudioLDM2UNet2DConditionModel(
        **_unet_kwargs(), cross_attention_dim=([None, EMBED_DIM, EMBED_DIM], [None, EMBED_DIM, EMBED_DIM])
    )
    pipe = AudioLDM2Pipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=t5.eval(),
        projection_model=AudioLDM2ProjectionModel(EMBED_DIM, EMBED_DIM, EMBED_DIM).eval(),
        language_model=gpt2.eval(),
        tokenizer=None,
        tokenizer_2=None,
        feature_extractor=None,
        unet=unet.eval(),
        scheduler=DDIMScheduler(),
        vocoder=vocoder,
    )
    g = torch.Generator().manual_seed(12)
    embeds = {  # T5 hidden states and the language model's generated ones, as encode_prompt returns them
        "prompt_embeds": torch.randn(BATCH, 5, EMBED_DIM, generator=g),
        "negative_prompt_embeds": torch.randn(BATCH, 5, EMBED_DIM, generator=g),
        "generated_prompt_embeds": torch.randn(BATCH, 4, EMBED_DIM, generator=g),
        "negative_generated_prompt_embeds": torch.randn(BATCH, 4, EMBED_DIM, generator=g),
    }
    return pipe, embeds


BUILDERS: dict[str, Callable[[Path], tuple[Any, dict[str, Any]]]] = {
    "AudioLDMPipeline": build_audioldm,
    "MusicLDMPipeline": build_musicldm,
    "AudioLDM2Pipeline": build_audioldm2,
}
FAMILIES = {"AudioLDMPipeline": "audioldm", "MusicLDMPipeline": "musicldm", "AudioLDM2Pipeline": "audioldm2"}


def generate(pipe: Any, embeds: dict[str, Any], seconds: float | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the pipeline's own audio [B, n], its final latents [B, 8, L, 16]) for one seed.

    AudioLDMPipeline has no latent output: its callback hands over each step's latents, and the
    last call's are the ones it decodes. The others return them with output_type="latent".
    """
    import torch

    kwargs = {**embeds, "num_inference_steps": STEPS, "audio_length_in_s": seconds}
    with torch.no_grad():
        if type(pipe).__name__ == "AudioLDMPipeline":
            steps: list[torch.Tensor] = []
            audio = pipe(
                **kwargs,
                generator=torch.Generator().manual_seed(seed),
                callback=lambda i, t, z: steps.append(z.clone()),
                callback_steps=1,
            ).audios
            assert len(steps) == STEPS
            return audio, steps[-1].numpy()
        audio = pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).audios
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="latent").audios
        return audio, latents.numpy()


@pytest.fixture(scope="module")
def pipeline_bundles(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    """Per pipeline class: (pipeline, embeddings, bundle exported through the CLI from its saved folder)."""
    out = {}
    for cls, build in BUILDERS.items():
        pipe, embeds = build(tiny_checkpoint)
        pipe.set_progress_bar_config(disable=True)
        folder = tmp_path_factory.mktemp("pipelines") / cls
        pipe.save_pretrained(folder)
        bundle = folder.parent / f"{cls}.bundle"
        result = run_cli("recon-export", "--model", str(folder), "--precision", "fp32", "--out", str(bundle))
        assert result.returncode == 0, result.stderr
        assert f"family {FAMILIES[cls]} ({cls})" in result.stderr
        out[cls] = (pipe, embeds, bundle)
    return out


# length in seconds per pipeline: 0.29 s rounds down to 28 mel frames (4480 samples), and the
# pipeline then keeps the vocoder's 32 samples past them (4512); 0.5 s rounds up to 52 frames and is
# trimmed to 8000 samples; None is the pipeline's default length, the whole latent length
LENGTHS = {"AudioLDMPipeline": 0.29, "MusicLDMPipeline": 0.5, "AudioLDM2Pipeline": None}


@pytest.mark.parametrize("cls", list(BUILDERS))
def test_pipeline_latents_decode_to_the_pipelines_own_audio(
    cls: str, pipeline_bundles: dict[str, tuple[Any, Any]]
) -> None:
    pipe, embeds, bundle = pipeline_bundles[cls]
    seconds = LENGTHS[cls]
    audio, latents = generate(pipe, embeds, seconds, seed=5)
    assert latents.shape[:2] == (BATCH, 8) and latents.shape[3] == 16
    rec = Reconstructor.load(bundle, provider="cpu", precision=FP32)
    num_samples = None if seconds is None else int(seconds * pipe.vocoder.config.sampling_rate)
    wave = rec.decode(latents, num_samples=num_samples)
    assert wave.shape == audio.shape, (wave.shape, audio.shape)
    errors = [float(np.linalg.norm(got - want) / np.linalg.norm(want)) for got, want in zip(wave, audio)]
    print(f"{cls}: {audio.shape[1]} samples from latents {list(latents.shape)}, rel-L2 {errors}")
    assert max(errors) <= PIPELINE_REL_L2
    one = rec.decode(latents[1], num_samples=num_samples)  # one item of the batch alone: the same audio
    np.testing.assert_allclose(one, wave[1], atol=1e-6)


@pytest.mark.parametrize("cls", list(BUILDERS))
def test_bundle_exported_from_a_pipeline_folder_records_family_and_pipeline(
    cls: str, pipeline_bundles: dict[str, tuple[Any, Any]]
) -> None:
    pipe, _, bundle = pipeline_bundles[cls]
    contract = read_contract(bundle)
    assert contract.family == FAMILIES[cls] and contract.pipeline_class == cls
    assert contract.scaling_factor == pipe.vae.config.scaling_factor
    info = run_cli("recon-run", "info", "--model", str(bundle))
    assert info.returncode == 0, info.stderr
    assert f"checkpoint   family {FAMILIES[cls]}, pipeline {cls}" in info.stdout


@pytest.mark.parametrize("window_frames", [None, 64])
def test_decode_keeps_the_vocoder_tail_only_when_asked_past_the_latents(
    tiny_bundle: Path, window_frames: int | None
) -> None:
    """num_samples up to 640*L + 32 gives the vocoder's samples past the last frame (the last window's)."""
    windows = {} if window_frames is None else {"window_frames": window_frames, "overlap_frames": 16}
    rec = Reconstructor.load(tiny_bundle, provider="cpu", precision=FP32, **windows)
    z = np.random.default_rng(8).standard_normal((8, 40, 16)).astype(np.float32)
    job = rec.decoding_job(z)
    assert len(job.windows) == (1 if window_frames is None else 3)
    whole = rec.decode(z)
    assert whole.shape == (40 * 640,)
    longer = rec.decode(z, num_samples=40 * 640 + 32)
    assert longer.shape == (40 * 640 + 32,)
    np.testing.assert_array_equal(longer[: 40 * 640], whole)
    last = rec.run_graphs(("decoder", "vocoder"), job.windows[-1][None])[0][0]
    np.testing.assert_allclose(longer[-32:], last[-32:], atol=1e-6)
    assert rec.decode(z, num_samples=10**6).shape == (40 * 640 + 32,)
    assert rec.decode(z, num_samples=1000).shape == (1000,)


def test_decode_takes_the_pipelines_tensors_as_they_come(tiny_bundle: Path) -> None:
    """A CPU tensor (fp16 from an fp16 pipeline too) decodes like its numpy array; one that cannot
    become an array is a one-line error that says how to convert it."""
    import torch

    from recon_runtime.errors import AudioInputError

    rec = Reconstructor.load(tiny_bundle, provider="cpu", precision=FP32)
    z = torch.from_numpy(np.random.default_rng(10).standard_normal((2, 8, 6, 16)).astype(np.float32))
    np.testing.assert_array_equal(rec.decode(z), rec.decode(z.numpy()))
    np.testing.assert_array_equal(rec.decode(z.half()), rec.decode(z.half().float().numpy()))
    with pytest.raises(AudioInputError, match=r"tensor\.detach\(\)\.float\(\)\.cpu\(\)\.numpy\(\)"):
        rec.decode(z.clone().requires_grad_(True))


def test_latents_past_one_window_decode_in_one_pass_when_the_window_holds_them(
    tiny_checkpoint: Path, tiny_bundle: Path
) -> None:
    """A pipeline decodes any length in one pass; the runtime's default 10.24 s windows cross-fade
    longer latents, and a window as long as the latents gives the pipeline's one pass again."""
    import torch

    vae, vocoder = _vae_and_vocoder(tiny_checkpoint)
    z = np.random.default_rng(9).standard_normal((1, 8, 300, 16)).astype(np.float32)  # 12 s
    num_samples = 190_000  # 11.875 s, as audio_length_in_s=11.875 asks
    with torch.no_grad():  # what the pipelines do after denoising
        mel = vae.decode(1 / vae.config.scaling_factor * torch.from_numpy(z)).sample
        want = vocoder(mel.squeeze(1)).float().numpy()[:, :num_samples]
    one_pass = Reconstructor.load(tiny_bundle, provider="cpu", precision=FP32, window_frames=1200)
    windowed = Reconstructor.load(tiny_bundle, provider="cpu", precision=FP32)
    assert len(one_pass.decoding_job(z[0]).windows) == 1 and len(windowed.decoding_job(z[0]).windows) == 2
    got = one_pass.decode(z, num_samples=num_samples)
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) <= PIPELINE_REL_L2
    cross_faded = windowed.decode(z, num_samples=num_samples)
    assert cross_faded.shape == want.shape and np.isfinite(cross_faded).all()


@pytest.mark.full
def test_full_size_audioldm2_pipeline_latents_decode_to_its_audio(full_checkpoint: Path, full_bundle: Path) -> None:
    pipe, embeds = build_audioldm2(full_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    audio, latents = generate(pipe, embeds, 1.0, seed=6)
    wave = Reconstructor.load(full_bundle, provider="cpu", precision=FP32).decode(latents, num_samples=16000)
    assert wave.shape == audio.shape == (BATCH, 16000)
    errors = [float(np.linalg.norm(g - w) / np.linalg.norm(w)) for g, w in zip(wave, audio)]
    print(f"full architecture, pipeline audio vs bundle decode, rel-L2: {errors}")
    assert max(errors) <= PIPELINE_REL_L2
