"""The HTTP protocol's names, shared by the server and the client (neither imports the other).

The headers of an encoded clip's facts are the encoded-audio fields' names (`encoded.header_name`:
`num_samples` -> `X-Recon-Num-Samples`), so the file, the headers and the dataset rows spell each
fact one way.
"""

from __future__ import annotations

from typing import Final

from ..encoded import (
    BUNDLE_FINGERPRINT,
    FORMAT_VERSION_FIELD,
    GAIN,
    INPUT_CHANNELS,
    INPUT_SAMPLE_RATE,
    NUM_SAMPLES,
    SAMPLE_RATE_FIELD,
    SAMPLED,
    SCALING_FACTOR,
    SEED,
    header_name,
)
from ..files.audio import FLOAT32, PCM16

# response and request headers: an encoded clip's facts (`EncodedAudio.headers`)
H_FORMAT_VERSION: Final = header_name(FORMAT_VERSION_FIELD)
H_NUM_SAMPLES: Final = header_name(NUM_SAMPLES)
H_GAIN: Final = header_name(GAIN)
H_SAMPLE_RATE: Final = header_name(SAMPLE_RATE_FIELD)
H_INPUT_RATE: Final = header_name(INPUT_SAMPLE_RATE)
H_INPUT_CHANNELS: Final = header_name(INPUT_CHANNELS)
H_SAMPLED: Final = header_name(SAMPLED)
H_SEED: Final = header_name(SEED)
H_FINGERPRINT: Final = header_name(BUNDLE_FINGERPRINT)
H_SCALING: Final = header_name(SCALING_FACTOR)
# and those of the answers themselves
H_LATENT_SHAPE: Final = header_name("latent_shape")
H_CHANNELS: Final = header_name("channels")
H_FORMAT: Final = header_name("sample_format")
H_WINDOWS: Final = header_name("windows")

NPY_MEDIA_TYPE: Final = "application/x-npy"
"""Latents as a .npy: /v1/encode's default answer and /v1/decode's default upload."""
ENCODE_FILE: Final = "encoded"
"""/v1/encode's `format`: the .npy with the facts in headers (the default), or the encoded-audio file
(`encoded.ENCODED_MEDIA_TYPE`, also asked for by `Accept`), which /v1/decode takes back as it is."""

DEFAULT_CONCURRENCY: Final = 4
"""Requests a remote file job (`recon-run ... --server URL --concurrency N`) keeps in flight at once:
the largest that never failed a file against a local server and as fast as the best within the
noise (docs/files.md). Here, not in `retry`, so the CLI's option needs no httpx to show it."""

SUBTYPES: Final = {"float": FLOAT32, "pcm16": PCM16}
"""The `subtype` query parameter (WAV answers and streams) -> its sample format (`files.audio`)."""
SUBTYPE_OF: Final = {fmt: subtype for subtype, fmt in SUBTYPES.items()}
"""A sample format -> the `subtype` that asks for it."""
STREAM_FORMATS: Final = {"float": "f32le", "pcm16": "s16le"}
"""The raw PCM of a streamed decode (the X-Recon-Sample-Format header) per `subtype`."""

WINDOW_BUDGET_OPTION: Final = "--max-windows"
"""Named in the 413 a request gets when it alone needs more windows than the server's budget; the
client then decodes as a stream (one window at a time), which that budget never refuses."""
