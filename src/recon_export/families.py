"""The AudioLDM family: the pipelines and checkpoints that share one VAE + HiFi-GAN contract.

AudioLDM, MusicLDM and AudioLDM2 all ship diffusers' `AutoencoderKL` (one channel in and out,
blocks [128, 256, 512], 8 latent channels) and transformers' `SpeechT5HifiGan` (64 mels, 16 kHz,
hop 160) in `vae/` and `vocoder/`, trained on the same 16 kHz 64-band front end; what differs is
the VAE's learned scaling factor. The scaling factors here are as quoted from the checkpoints'
published vae/config.json files; they were not verified against the hub (the machine they were
written down on is offline). One not quoted is None, never a guess. They are information only:
an export of a real checkpoint reads its factor from the checkpoint, and random weights always
get one calibrated on them, as training did (a trained checkpoint's factor would not give random
weights unit-scale latents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

AUDIOLDM: Final = "audioldm"
MUSICLDM: Final = "musicldm"
AUDIOLDM2: Final = "audioldm2"

# diffusers pipeline class (model_index.json `_class_name`) -> family
PIPELINE_FAMILIES: Final[dict[str, str]] = {
    "AudioLDMPipeline": AUDIOLDM,
    "MusicLDMPipeline": MUSICLDM,
    "AudioLDM2Pipeline": AUDIOLDM2,
}
FAMILY_PIPELINES: Final[dict[str, str]] = {family: cls for cls, family in PIPELINE_FAMILIES.items()}
# model_index.json entries for the two components the export loads: [library, class]
COMPONENT_CLASSES: Final[dict[str, list[str]]] = {
    "vae": ["diffusers", "AutoencoderKL"],
    "vocoder": ["transformers", "SpeechT5HifiGan"],
}


@dataclass(frozen=True)
class Published:
    """One published checkpoint: what `--random-weights --config NAME` rebuilds."""

    name: str
    """The --config name."""
    hub_id: str | None
    family: str | None
    published_scaling_factor: float | None
    """The VAE scaling factor as quoted from the checkpoint's published vae/config.json (not verified
    against the hub); None where none was quoted."""

    @property
    def pipeline_class(self) -> str | None:
        return FAMILY_PIPELINES.get(self.family) if self.family else None

    @property
    def scaling_factor_quoted_from(self) -> str | None:
        """Where `published_scaling_factor` comes from, as recon.json records it."""
        if self.published_scaling_factor is None or self.hub_id is None:
            return None
        return f"as quoted from {self.hub_id}'s published vae/config.json; not verified against the hub"


TINY: Final = "tiny"
PUBLISHED: Final[dict[str, Published]] = {
    p.name: p
    for p in (
        Published("audioldm", "cvssp/audioldm", AUDIOLDM, 0.9227914214134216),
        Published("audioldm-s-full-v2", "cvssp/audioldm-s-full-v2", AUDIOLDM, None),
        Published("audioldm-m-full", "cvssp/audioldm-m-full", AUDIOLDM, 0.9138255715370178),
        Published("audioldm-l-full", "cvssp/audioldm-l-full", AUDIOLDM, 0.9654927849769592),
        Published("musicldm", "ucsd-reach/musicldm", MUSICLDM, 1.075324296951294),
        Published("audioldm2", "cvssp/audioldm2", AUDIOLDM2, 0.4110932946205139),
        Published("audioldm2-music", "cvssp/audioldm2-music", AUDIOLDM2, None),
        Published("audioldm2-large", "cvssp/audioldm2-large", AUDIOLDM2, None),
        # the same structure with few channels, of no family: for fast tests only
        Published(TINY, None, None, None),
    )
}
