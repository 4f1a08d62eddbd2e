"""The HTTP protocol's names, shared by the server and the client (neither imports the other)."""

from __future__ import annotations

from typing import Final

from ..files.audio import FLOAT32, PCM16

# response and request headers (the facts the CLI's encode sidecar holds)
H_NUM_SAMPLES: Final = "X-Recon-Num-Samples"
H_GAIN: Final = "X-Recon-Gain"
H_SAMPLE_RATE: Final = "X-Recon-Sample-Rate"
H_INPUT_RATE: Final = "X-Recon-Input-Sample-Rate"
H_LATENT_SHAPE: Final = "X-Recon-Latent-Shape"
H_SAMPLED: Final = "X-Recon-Sampled"
H_SEED: Final = "X-Recon-Seed"
H_FINGERPRINT: Final = "X-Recon-Bundle-Fingerprint"
H_SCALING: Final = "X-Recon-Scaling-Factor"
H_CHANNELS: Final = "X-Recon-Channels"
H_FORMAT: Final = "X-Recon-Sample-Format"
H_WINDOWS: Final = "X-Recon-Windows"

SUBTYPES: Final = {"float": FLOAT32, "pcm16": PCM16}
"""The `subtype` query parameter (WAV answers and streams) -> its sample format (`files.audio`)."""
SUBTYPE_OF: Final = {fmt: subtype for subtype, fmt in SUBTYPES.items()}
"""A sample format -> the `subtype` that asks for it."""
STREAM_FORMATS: Final = {"float": "f32le", "pcm16": "s16le"}
"""The raw PCM of a streamed decode (the X-Recon-Sample-Format header) per `subtype`."""

WINDOW_BUDGET_OPTION: Final = "--max-windows"
"""Named in the 413 a request gets when it alone needs more windows than the server's budget; the
client then decodes as a stream (one window at a time), which that budget never refuses."""
