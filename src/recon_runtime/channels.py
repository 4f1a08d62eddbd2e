"""`--channels mix|each`: multi-channel inputs mixed to mono (the model's one channel) or run channel by channel.

`mix` (the default) leaves the input to the front end, which takes the mean of the channels, as
AudioLDM2 does; `each` runs every channel on its own and stacks the results back, so a stereo file
gives a stereo file (reconstruct, decode) or one encoded clip with a latent per channel (encode,
`EncodedAudio.stack`). Each channel is prepared on its own (its own peak and gain), so a quiet
channel keeps its level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, TypeVar

import numpy as np

from .encoded import (
    BUNDLE_FINGERPRINT,
    FORMAT_VERSION,
    FORMAT_VERSION_FIELD,
    GAIN,
    INPUT_CHANNELS,
    INPUT_SAMPLE_RATE,
    NUM_SAMPLES,
    SAMPLE_RATE_FIELD,
    SAMPLED,
    SCALING_FACTOR,
    SEED,
    SOURCE,
    EncodedAudio,
    decode_encoded,
)
from .errors import AudioInputError

if TYPE_CHECKING:
    from .contract import Contract
    from .reconstructor import Reconstructor
    from .windows import Features

MIX: Final = "mix"
EACH: Final = "each"
CHANNEL_MODES: Final = (MIX, EACH)
DEFAULT_CHANNEL_MODE: Final = MIX

T = TypeVar("T")


def check_mode(mode: str) -> str:
    if mode not in CHANNEL_MODES:
        raise ValueError(f"unknown channel mode {mode!r}; use {', '.join(CHANNEL_MODES)}")
    return mode


def channel_count(audio: np.ndarray) -> int:
    """Channels of audio as soundfile reads it: [samples] is 1, [samples, channels] is channels."""
    a = np.asarray(audio)
    if a.ndim == 1:
        return 1
    if a.ndim == 2:
        return int(a.shape[1])
    raise AudioInputError(f"audio must be [samples] or [samples, channels], got {list(a.shape)}")


def is_mixed(audio: np.ndarray, mode: str) -> bool:
    """Whether `mode` mixes this input down (for the summary's count of mixed files)."""
    return check_mode(mode) == MIX and channel_count(audio) > 1


def split_channels(audio: np.ndarray) -> list[np.ndarray]:
    """[samples] or [samples, channels] -> one float32 [samples] array per channel."""
    a = np.asarray(audio, dtype=np.float32)
    if channel_count(a) == 1:
        return [a.reshape(-1)]
    return [np.ascontiguousarray(a[:, c]) for c in range(a.shape[1])]


def stack_channels(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Per-channel [samples] arrays -> [samples] for one, [samples, channels] for several (soundfile's layout)."""
    if not channels:
        raise ValueError("stack_channels needs at least one channel")
    lengths = {int(np.shape(c)[0]) for c in channels}
    if len(lengths) > 1:
        raise ValueError(f"channels of different lengths: {sorted(lengths)}")
    if len(channels) == 1:
        return np.asarray(channels[0], dtype=np.float32)
    return np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=1)


def per_channel(audio: np.ndarray, mode: str, work: Callable[[np.ndarray], T]) -> list[T]:
    """`work` on the input as a whole (`mix`: the front end mixes it) or on each channel (`each`).

    Returns:
        One result for `mix` (or a one-channel input), one per channel in order for `each`.
    """
    if check_mode(mode) == MIX:
        return [work(audio)]
    return [work(channel) for channel in split_channels(audio)]


def map_channels(audio: np.ndarray, mode: str, process: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Audio -> audio with `process` ([samples] -> [samples']) by `mode`; `each` keeps the channel count.

    Returns:
        float32 [samples'] (mix, or one channel) or [samples', channels] (each).
    """
    return stack_channels(per_channel(audio, mode, process))


def encode_channels(audio: np.ndarray, mode: str, encode: Callable[[np.ndarray], EncodedAudio]) -> EncodedAudio:
    """Audio -> one encoded clip: the mix's latent (`mix`), or one latent per channel (`each`).

    Args:
        encode: [samples] or [samples, channels] -> a one-channel EncodedAudio (its `input_channels`
            is replaced by the input's channel count).
    """
    return replace(EncodedAudio.stack(per_channel(audio, mode, encode)), input_channels=channel_count(audio))


def encode_audio(
    rec: Reconstructor,
    audio: np.ndarray,
    sample_rate: int,
    mode: str = DEFAULT_CHANNEL_MODE,
    sample: bool = False,
    seed: int | None = None,
    source: str | None = None,
) -> EncodedAudio:
    """Audio -> one encoded clip with everything decode needs: the one builder of the encode facts
    for the CLI, the server and dataset rows.

    Args:
        audio: float32 [samples] or [samples, channels] at `sample_rate`.
        mode: MIX (one latent of the mix) or EACH (one latent and gain per channel).
        sample, seed: draw from the posterior (as `Reconstructor.encode`).
        source: the input's path, recorded in the file (None from a server).
    """

    def one(x: np.ndarray) -> EncodedAudio:
        feats = rec.features(x, sample_rate)
        latents = rec.encode_features(feats, sample=sample, seed=seed)
        return encoded_clip(rec.contract, feats, latents, sample_rate, sampled=sample, seed=seed, source=source)

    return encode_channels(audio, mode, one)


def encode_facts(
    contract: Contract,
    feats: Features,
    input_sample_rate: int,
    *,
    sampled: bool = False,
    seed: int | None = None,
    input_channels: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """One channel's encode facts by field name (`FIELDS`; gain one number): the prepared input's length
    and gain, and the bundle's fingerprint, rate and scaling factor. Every encoded clip is built from
    them (`encoded_clip`), and dataset rows carry them."""
    return {
        FORMAT_VERSION_FIELD: FORMAT_VERSION,
        NUM_SAMPLES: feats.num_samples,
        SAMPLE_RATE_FIELD: contract.mel.sample_rate,
        GAIN: feats.gain,
        BUNDLE_FINGERPRINT: contract.fingerprint,
        SAMPLED: sampled,
        SEED: seed if sampled else None,
        INPUT_SAMPLE_RATE: int(input_sample_rate),
        INPUT_CHANNELS: input_channels,
        SCALING_FACTOR: contract.scaling_factor,
        SOURCE: source,
    }


def encoded_clip(
    contract: Contract, feats: Features, latents: np.ndarray, input_sample_rate: int, **facts: Any
) -> EncodedAudio:
    """One channel's encoded clip: its latents [8, T/4, 16] with `encode_facts` (the keyword arguments are
    theirs). `encode_audio` builds every clip with it, and so does the server's /v1/encode, which runs the
    windows through its batcher instead."""
    return EncodedAudio.from_fields(
        np.asarray(latents)[None], encode_facts(contract, feats, input_sample_rate, **facts)
    )


def decode_audio(rec: Reconstructor, encoded: EncodedAudio) -> np.ndarray:
    """An encoded clip -> audio at its length and level, float32 [samples] or [samples, channels]."""
    return decode_encoded(encoded, lambda z, n: rec.decode(z, num_samples=n))


def reconstruct_audio(
    rec: Reconstructor,
    audio: np.ndarray,
    sample_rate: int,
    mode: str = DEFAULT_CHANNEL_MODE,
    output_rate: int | None = None,
) -> np.ndarray:
    """Audio -> reconstruction by `mode` (`Reconstructor.reconstruct` per channel for EACH)."""
    return map_channels(audio, mode, lambda x: rec.reconstruct(x, sample_rate, output_rate))
