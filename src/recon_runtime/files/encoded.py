"""The encoded-audio file: latents and what decode needs to give the audio back, in one safetensors file.

`EncodedAudio` holds the scaled latents of one clip, one `[8, T/4, 16]` latent per channel
(`[channels, 8, T/4, 16]`; one channel for the default `--channels mix`), the length and sample rate
to decode to, the gain that restores the input's level (one per channel), the fingerprint of the
decoding weights, and whether the latents are a posterior draw (and its seed).

Why safetensors (with its string metadata) and not an .npz with a JSON member:
- no pickle by construction: the format has tensors and a flat string map only, where `np.load`
  of an .npz is safe only as long as every caller remembers `allow_pickle=False`;
- the header (8-byte length + JSON) is read and checked before any tensor is touched, and the
  reader refuses a file whose tensors do not exactly cover it, so a truncated, padded or
  re-declared file fails in one line instead of allocating what a hostile header claims;
- the latents are a plain `[C, 8, T, 16]` float32 tensor that a GPU host opens with the same
  library its diffusers pipeline already uses (`safetensors.torch.load_file`), and the metadata is
  readable by any safetensors tool;
- the `safetensors` wheel is small, has no dependencies and its numpy API imports no torch
  (tests/test_encoded.py checks that in a fresh interpreter).
An .npz would cost no dependency but needs a zip reader's checks and a convention for the JSON
member; the format is documented in docs/files.md.

Field names (`FIELDS`) are defined once here: the file's metadata keys, the HTTP headers
(`header_name`: ``X-Recon-`` + the name in title case, as `protocol.py` spells them today) and
the dataset's Parquet columns use the same names.

Older encodes (`.npy` + JSON sidecar) and bare `.npy` latents from a diffusers pipeline are read
by `read_latents`, which returns the same object.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..contract import (
    LATENT_CHANNELS,
    LATENT_FREQ_BINS,
    SAMPLE_RATE,
    SAMPLES_PER_LATENT_FRAME,
    VOCODER_EXTRA_SAMPLES,
    latent_shape_problem,
)
from ..errors import AudioInputError, BundleError, NumericalError
from .audio import atomic_path, load_array, read_array_bytes, read_npy_header
from .latents import SIDECAR, read_sidecar

FORMAT_VERSION: Final = 1
"""The version this build writes."""
SUPPORTED_VERSIONS: Final = (1,)
"""The versions this build reads; any other is refused, naming these."""
FORMAT_MARKER: Final = "audioldm2-recon encoded audio"
"""The value of the `format` metadata key: a safetensors file without it is not an encoded clip."""
ENCODED_SUFFIX: Final = ".safetensors"
LEGACY_SUFFIX: Final = ".npy"
"""Latents of older encodes (beside a JSON sidecar) and of diffusers pipelines (bare)."""
LATENTS_TENSOR: Final = "latents"
ENCODED_MEDIA_TYPE: Final = "application/vnd.audioldm2-recon.encoded+safetensors"
"""The content type of an encoded file in an HTTP body (the server's encode answer, a decode upload)."""
MAX_HEADER_BYTES: Final = 1 << 20
"""A header is about 700 bytes; a larger one is not ours (safetensors itself accepts up to 100 MB)."""

# Field names, one spelling for the file's metadata, the HTTP headers and the dataset rows.
FORMAT: Final = "format"
FORMAT_VERSION_FIELD: Final = "format_version"
NUM_SAMPLES: Final = "num_samples"
SAMPLE_RATE_FIELD: Final = "sample_rate"
GAIN: Final = "gain"
BUNDLE_FINGERPRINT: Final = "bundle_fingerprint"
SAMPLED: Final = "sampled"
SEED: Final = "seed"
INPUT_SAMPLE_RATE: Final = "input_sample_rate"
INPUT_CHANNELS: Final = "input_channels"
SCALING_FACTOR: Final = "scaling_factor"
SOURCE: Final = "source"
CONTENT_SHA256: Final = "sha256"
"""Metadata key: `content_sha256` of the latents and the fields, so an edit to either is refused."""
FIELDS: Final = (
    FORMAT_VERSION_FIELD,
    NUM_SAMPLES,
    SAMPLE_RATE_FIELD,
    GAIN,
    BUNDLE_FINGERPRINT,
    SAMPLED,
    SEED,
    INPUT_SAMPLE_RATE,
    INPUT_CHANNELS,
    SCALING_FACTOR,
    SOURCE,
)
"""The facts of an encoded clip besides its latents, in this order in files, headers and rows; each is
also the name of its `EncodedAudio` attribute."""
HEADER_PREFIX: Final = "X-Recon-"


def header_name(name: str) -> str:
    """The HTTP header of a field: `num_samples` -> `X-Recon-Num-Samples`."""
    return HEADER_PREFIX + "-".join(part.capitalize() for part in name.split("_"))


def file_seed(seed: int, name: str) -> int:
    """The seed of one file's posterior draw in a run of many (`dataset encode --sample --seed S`):
    derived from S and the file's path, so every file gets its own noise (one seed for all would give
    equal-length files the same noise) and a rerun gives each file the same draw. 63 bits, as a
    server's seed."""
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def max_samples(latent_frames: int) -> int:
    """The most samples `latent_frames` latent frames decode to: 640 per frame, plus the vocoder's 32 past the last."""
    return latent_frames * SAMPLES_PER_LATENT_FRAME + VOCODER_EXTRA_SAMPLES


def content_sha256(latents: np.ndarray, fields: Mapping[str, Any]) -> str:
    """SHA-256 of the latents as stored (C-order little-endian float32) and of the fields (`FIELDS`,
    None where absent) as sorted compact JSON."""
    digest = hashlib.sha256(np.ascontiguousarray(latents, dtype="<f4").tobytes())
    canonical = {name: fields.get(name) for name in FIELDS}
    digest.update(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class EncodedAudio:
    """One encoded clip: everything `decode` needs to give back the audio at its length and level.

    Construction checks every field (AudioInputError on a bad one), so an object that exists is
    one that decodes.
    """

    latents: np.ndarray
    """float32 [channels, 8, T/4, 16]: scaled latents, one per channel (channels 1 for a mono or mixed input)."""
    num_samples: int
    """Length of the decoded audio at `sample_rate` (at most 640 * T/4 + 32)."""
    gain: tuple[float, ...]
    """Per channel: multiply the decoded audio by it to restore the input's level."""
    bundle_fingerprint: str | None
    """The decoding weights that made the latents (`Contract.fingerprint`); None for bare pipeline latents."""
    sample_rate: int = SAMPLE_RATE
    sampled: bool = False
    """True when the latents are a posterior draw (`--sample`), False for the posterior mean."""
    seed: int | None = None
    """The seed of the draw; None unless `sampled`."""
    input_sample_rate: int | None = None
    """The sample rate of the audio that was encoded (None when unknown)."""
    input_channels: int | None = None
    """The channel count of the audio that was encoded (more than `channels` when it was mixed)."""
    scaling_factor: float | None = None
    """The VAE scaling factor baked into the bundle (for information: decode needs no division)."""
    source: str | None = None
    """The input file's path as given to encode (None from a server or a pipeline)."""
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        z = np.asarray(self.latents)
        if z.ndim != 4 or z.shape[1] != LATENT_CHANNELS or z.shape[3] != LATENT_FREQ_BINS or 0 in z.shape:
            raise AudioInputError(
                f"latents must be [channels, {LATENT_CHANNELS}, frames, {LATENT_FREQ_BINS}], got {list(z.shape)}"
            )
        if not np.issubdtype(z.dtype, np.floating):
            raise AudioInputError(f"latents must be floating point, got {z.dtype}")
        z = z.astype(np.float32, copy=False)
        if not np.isfinite(z).all():
            raise AudioInputError("latents contain NaN or inf")
        object.__setattr__(self, "latents", z)
        gain = tuple(float(g) for g in np.atleast_1d(np.asarray(self.gain, dtype=np.float64)))
        if len(gain) != z.shape[0]:
            raise AudioInputError(f"{len(gain)} gain(s) for {z.shape[0]} channel(s) of latents")
        if not all(math.isfinite(g) and g > 0 for g in gain):
            raise AudioInputError(f"gain must be finite and positive, got {list(gain)}")
        object.__setattr__(self, "gain", gain)
        _check_int(NUM_SAMPLES, self.num_samples, 1)
        most = max_samples(z.shape[2])
        if self.num_samples > most:
            raise AudioInputError(
                f"num_samples {self.num_samples} is longer than {z.shape[2]} latent frames decode to (at most {most})"
            )
        _check_int(SAMPLE_RATE_FIELD, self.sample_rate, 1)
        for name in (INPUT_SAMPLE_RATE, INPUT_CHANNELS):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.seed is not None:
            _check_int(SEED, self.seed, None)
        if not isinstance(self.sampled, bool):
            raise AudioInputError(f"{SAMPLED} must be true or false, got {self.sampled!r}")
        if self.bundle_fingerprint is not None and not isinstance(self.bundle_fingerprint, str):
            raise AudioInputError(f"{BUNDLE_FINGERPRINT} must be a string, got {self.bundle_fingerprint!r}")
        if self.scaling_factor is not None and not (
            isinstance(self.scaling_factor, (int, float)) and math.isfinite(self.scaling_factor)
        ):
            raise AudioInputError(f"{SCALING_FACTOR} must be a finite number, got {self.scaling_factor!r}")
        if self.source is not None and not isinstance(self.source, str):
            raise AudioInputError(f"{SOURCE} must be a string, got {self.source!r}")
        if self.format_version not in SUPPORTED_VERSIONS:
            raise AudioInputError(_version_message(self.format_version))

    # ------------------------------------------------------------------ shape
    @property
    def channels(self) -> int:
        return int(self.latents.shape[0])

    @property
    def latent_frames(self) -> int:
        return int(self.latents.shape[2])

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    @classmethod
    def stack(cls, parts: Sequence[EncodedAudio]) -> EncodedAudio:
        """One clip from per-channel encodes (`--channels each`): latents and gains stacked in channel order.

        The parts must agree on everything but latents and gain (they are one input's channels).
        """
        if not parts:
            raise ValueError("stack needs at least one part")
        first = parts[0]
        for name in (NUM_SAMPLES, SAMPLE_RATE_FIELD, BUNDLE_FINGERPRINT, SAMPLED, SEED):
            values = {getattr(p, name) for p in parts}
            if len(values) > 1:
                raise ValueError(f"the channels disagree on {name}: {sorted(map(str, values))}")
        return replace(
            first,
            latents=np.concatenate([p.latents for p in parts]),
            gain=tuple(g for p in parts for g in p.gain),
        )

    def split(self) -> list[EncodedAudio]:
        """One single-channel clip per channel (the inverse of `stack`)."""
        return [replace(self, latents=self.latents[c : c + 1], gain=(self.gain[c],)) for c in range(self.channels)]

    # ------------------------------------------------------------------ fields
    def fields(self) -> dict[str, Any]:
        """The facts besides the latents, by field name, as JSON values (gain: a list, one per channel)."""
        return {
            FORMAT_VERSION_FIELD: self.format_version,
            NUM_SAMPLES: self.num_samples,
            SAMPLE_RATE_FIELD: self.sample_rate,
            GAIN: list(self.gain),
            BUNDLE_FINGERPRINT: self.bundle_fingerprint,
            SAMPLED: self.sampled,
            SEED: self.seed,
            INPUT_SAMPLE_RATE: self.input_sample_rate,
            INPUT_CHANNELS: self.input_channels,
            SCALING_FACTOR: self.scaling_factor,
            SOURCE: self.source,
        }

    @classmethod
    def from_fields(cls, latents: np.ndarray, values: Mapping[str, Any]) -> EncodedAudio:
        """An encoded clip from latents and its fields by name (as `fields` gives them: a file's
        metadata, a dataset row); unknown names are ignored, a missing `num_samples` or `gain` refused."""
        for name in (NUM_SAMPLES, GAIN):
            if values.get(name) is None:
                raise AudioInputError(f"lacks {name}")
        gain = values[GAIN]
        if isinstance(gain, (int, float)) and not isinstance(gain, bool):
            gain = [gain]  # one channel: a plain number, as a mono dataset row or header carries it
        if not isinstance(gain, (list, tuple)) or not all(
            isinstance(g, (int, float)) and not isinstance(g, bool) for g in gain
        ):
            raise AudioInputError(f"{GAIN} must be a number or a list of numbers, got {gain!r}")
        known = {name: values[name] for name in FIELDS if name in values and values[name] is not None}
        known[GAIN] = tuple(gain)
        known.setdefault(BUNDLE_FINGERPRINT, None)
        known.setdefault(SAMPLED, False)
        known[FORMAT_VERSION_FIELD] = values.get(FORMAT_VERSION_FIELD, FORMAT_VERSION)
        try:
            return cls(latents=latents, **known)
        except TypeError as e:
            raise AudioInputError(str(e)) from None

    def headers(self) -> dict[str, str]:
        """The fields as HTTP headers (`header_name`), those that are None left out; the source never
        (a server's path means nothing to its client). A gain list is comma-separated: one channel
        gives one number, as the server's encode headers have always carried it."""
        out = {}
        for name, value in self.fields().items():
            if value is None or name == SOURCE:
                continue
            if name == GAIN:
                text = ",".join(repr(g) for g in value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            out[header_name(name)] = text
        return out

    # ------------------------------------------------------------------ file
    def to_bytes(self) -> bytes:
        """The encoded file's bytes (safetensors: one float32 tensor `latents`, the fields as JSON strings)."""
        from safetensors.numpy import save

        values = self.fields()
        metadata = {FORMAT: FORMAT_MARKER, CONTENT_SHA256: content_sha256(self.latents, values)}
        metadata.update({name: json.dumps(value) for name, value in values.items()})
        return save({LATENTS_TENSOR: np.ascontiguousarray(self.latents, dtype="<f4")}, metadata)

    def save(self, path: Path) -> None:
        """Write the file atomically: on failure the old file (or none) stays."""
        with atomic_path(Path(path)) as tmp:
            tmp.write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "encoded audio") -> EncodedAudio:
        """Read an encoded file's bytes; any problem is one AudioInputError naming `what`.

        Refused: anything that is not a safetensors file with this format's marker, a version
        outside SUPPORTED_VERSIONS, a truncated or padded file, latents that do not match the
        SHA-256 recorded with them (an edited field too), a field of the wrong type.
        """
        metadata = _check_header(data, what)
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            tensors = load(bytes(data))
        except (SafetensorError, ValueError) as e:
            raise AudioInputError(f"{what}: damaged encoded file ({_one_line(e)})") from None
        if set(tensors) != {LATENTS_TENSOR}:
            raise AudioInputError(f"{what}: holds tensors {sorted(tensors)}, expected only {LATENTS_TENSOR!r}")
        z = tensors[LATENTS_TENSOR]
        if z.dtype != np.float32:
            raise AudioInputError(f"{what}: latents are {z.dtype}, expected float32")
        values = {name: _json_field(metadata[name], name, what) for name in FIELDS if name in metadata}
        if content_sha256(z, values) != metadata.get(CONTENT_SHA256):
            raise AudioInputError(
                f"{what}: its latents or fields do not match the SHA-256 recorded with them (modified or damaged)"
            )
        try:
            return cls.from_fields(z.copy(), values)
        except AudioInputError as e:
            raise AudioInputError(f"{what}: {e}") from None

    @classmethod
    def load(cls, path: Path) -> EncodedAudio:
        """Read an encoded file; errors are one line naming it."""
        path = Path(path)
        return cls.from_bytes(_read_file(path), str(path))


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise AudioInputError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise AudioInputError(f"{name} must be at least {minimum}, got {value}")


def _version_message(version: Any) -> str:
    readable = ", ".join(map(str, SUPPORTED_VERSIONS))
    return (
        f"encoded-audio format version {version}; this build reads version {readable} "
        "(a newer recon-run wrote it: upgrade, or encode the audio again)"
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_header(data: bytes, what: str) -> dict[str, str]:
    """The metadata of an encoded file's header (`data` may be the file's first bytes only), refused
    unless it has this format's marker and a version this build reads."""
    metadata = _read_metadata(data, what)
    if metadata.get(FORMAT) != FORMAT_MARKER:
        raise AudioInputError(f"{what}: a safetensors file, but not encoded audio (no {FORMAT!r} marker)")
    raw_version = metadata.get(FORMAT_VERSION_FIELD)
    version = _json_field(raw_version, FORMAT_VERSION_FIELD, what) if raw_version is not None else None
    if version not in SUPPORTED_VERSIONS:
        raise AudioInputError(f"{what}: {_version_message(version)}")
    return metadata


def _read_metadata(data: bytes, what: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors header, checked before any tensor is read."""
    if len(data) < 8:
        raise AudioInputError(f"{what}: not an encoded-audio file ({len(data)} bytes; truncated?)")
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise AudioInputError(
            f"{what}: not an encoded-audio file (its first 8 bytes declare a {size}-byte header in a "
            f"{len(data)}-byte file; truncated, or another format)"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
    except (UnicodeDecodeError, ValueError):
        raise AudioInputError(f"{what}: not an encoded-audio file (its header is not JSON)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AudioInputError(f"{what}: not encoded audio (a safetensors header without string metadata)")
    return metadata


def _json_field(text: str, name: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise AudioInputError(f"{what}: field {name} is not valid JSON ({text[:40]!r})") from None


def _read_file(path: Path) -> bytes:
    """An encoded file's bytes; its header is checked before the rest is read (a multi-GB safetensors
    file of model weights given by mistake is refused after its header, not read whole)."""
    if not path.is_file():
        raise AudioInputError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            head += f.read(min(size, MAX_HEADER_BYTES))
            _check_header(head, str(path))
            return head + f.read()
    except OSError as e:
        raise AudioInputError(f"{path}: cannot be read ({e.strerror or e})") from None


# ---------------------------------------------------------------------- any latents file
def check_fingerprint(encoded: EncodedAudio, fingerprint: str, where: str) -> None:
    """Refuse latents made with other decoding weights (BundleError naming both); bare latents pass."""
    if encoded.bundle_fingerprint not in (None, fingerprint):
        raise BundleError(
            f"{where}: latents come from another model (bundle {encoded.bundle_fingerprint}, this bundle "
            f"{fingerprint}); decode them with the bundle that encoded them"
        )


def bare_num_samples(
    latent_frames: int, seconds: float | None, num_samples: int | None, sample_rate: int = SAMPLE_RATE
) -> int:
    """The decode length of bare latents: `num_samples`, or `seconds` at `sample_rate` (truncated, as
    the diffusers pipelines compute it), or without either every sample the latents hold (640 per frame).

    Raises AudioInputError for both given, a length below one sample, or longer than the latents decode to.
    """
    if seconds is not None and num_samples is not None:
        raise AudioInputError("give the length once: --seconds or --num-samples, not both")
    if seconds is not None:
        if not math.isfinite(seconds) or seconds <= 0:
            raise AudioInputError(f"--seconds must be a positive number, got {seconds}")
        n = int(seconds * sample_rate)
        asked = f"--seconds {seconds:g} ({n} samples)"
    elif num_samples is not None:
        n, asked = int(num_samples), f"--num-samples {num_samples}"
    else:
        return latent_frames * SAMPLES_PER_LATENT_FRAME
    if n < 1:
        raise AudioInputError(f"{asked} is shorter than one sample")
    if n > max_samples(latent_frames):
        raise AudioInputError(
            f"{asked} is longer than {latent_frames} latent frames decode to "
            f"(at most {max_samples(latent_frames)} samples, {max_samples(latent_frames) / sample_rate:.2f} s)"
        )
    return n


def read_latents(
    path: Path,
    fingerprint: str,
    *,
    seconds: float | None = None,
    num_samples: int | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> list[EncodedAudio]:
    """Any latents file as encoded clips, checked against the decoding bundle's `fingerprint`.

    - `.safetensors`: an encoded file (one clip, any channel count);
    - `.npy` with its JSON sidecar (older encodes): one mono clip, the sidecar's length and level;
    - bare `.npy` (a diffusers pipeline's latents): `[8, T, 16]` is one clip, `[B, 8, T, 16]` B clips,
      each gain 1 and of the length `seconds` / `num_samples` give (`bare_num_samples`).

    `seconds` and `num_samples` apply to bare latents only: a file that records its length refuses them.

    Returns:
        The clips in file order (several only for a bare batch).
    Raises:
        AudioInputError: unreadable file, wrong shape (naming the shapes expected), a bad length.
        BundleError: latents of another bundle.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ENCODED_SUFFIX:
        clips = [_recorded(EncodedAudio.load(path), str(path), seconds, num_samples)]
    elif suffix == LEGACY_SUFFIX:
        clips = _read_npy(path, fingerprint, seconds, num_samples, sample_rate)
    else:
        raise AudioInputError(f"{path}: not a latents file (expected {ENCODED_SUFFIX} or {LEGACY_SUFFIX})")
    for clip in clips:
        check_fingerprint(clip, fingerprint, str(path))
    return clips


NPY_MAGIC: Final = b"\x93NUMPY"


def read_latents_data(
    data: bytes,
    fingerprint: str,
    what: str = "-",
    *,
    seconds: float | None = None,
    num_samples: int | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> list[EncodedAudio]:
    """`read_latents` of a file's bytes (stdin): an encoded file, or a bare `.npy` of latents (told
    apart by the .npy magic bytes; a sidecar has no place in a pipe). Errors name `what`."""
    if data[: len(NPY_MAGIC)] == NPY_MAGIC:
        clips = _bare_clips(read_array_bytes(data, what), what, seconds, num_samples, sample_rate)
    else:
        clips = [_recorded(EncodedAudio.from_bytes(data, what), what, seconds, num_samples)]
    for clip in clips:
        check_fingerprint(clip, fingerprint, what)
    return clips


def clip_count(path: Path) -> int:
    """How many clips `read_latents` will give for `path`, from the .npy header alone (planning names
    a batch's outputs before anything is decoded): B for bare `[B, 8, T, 16]` latents, else 1.
    A file that cannot be read counts 1 (reading it then gives its one-line error)."""
    path = Path(path)
    if path.suffix.lower() != LEGACY_SUFFIX or path.with_suffix(SIDECAR).is_file():
        return 1
    try:
        with open(path, "rb") as f:
            shape, _, dtype = read_npy_header(f)
            data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    except Exception:  # noqa: BLE001 - numpy's header parser raises many kinds; the read reports the file
        return 1
    # a header that lies (a huge batch in a few bytes) must not make planning name B outputs
    if len(shape) != 4 or latent_shape_problem(shape, batched=True) or shape[0] < 1:
        return 1
    if math.prod(int(n) for n in shape) * dtype.itemsize != data_bytes:
        return 1
    return int(shape[0])


def _recorded(clip: EncodedAudio, what: str, seconds: float | None, num_samples: int | None) -> EncodedAudio:
    """An encoded file's clip; refused with --seconds or --num-samples, since it records its own length."""
    if seconds is not None or num_samples is not None:
        raise AudioInputError(
            f"{what}: records its own length ({clip.num_samples} samples); "
            "--seconds and --num-samples are for bare latents"
        )
    return clip


def _read_npy(
    path: Path, fingerprint: str, seconds: float | None, num_samples: int | None, sample_rate: int
) -> list[EncodedAudio]:
    z = load_array(path)
    side = read_sidecar(path, fingerprint)
    if side:
        problem = latent_shape_problem(z.shape)
        if problem:
            raise AudioInputError(f"{path}: beside a sidecar, {problem}")
        if seconds is not None or num_samples is not None:
            raise AudioInputError(
                f"{path}: its sidecar records the length ({side.get(NUM_SAMPLES)} samples); "
                "--seconds and --num-samples are for bare latents"
            )
        try:
            return [
                EncodedAudio(
                    latents=z[None],
                    num_samples=side.get(NUM_SAMPLES) or z.shape[1] * SAMPLES_PER_LATENT_FRAME,
                    gain=(side.get(GAIN, 1.0),),
                    bundle_fingerprint=side.get(BUNDLE_FINGERPRINT),
                    sample_rate=side.get(SAMPLE_RATE_FIELD) or sample_rate,
                    sampled=bool(side.get(SAMPLED, False)),
                    seed=side.get(SEED),
                    input_sample_rate=side.get(INPUT_SAMPLE_RATE),
                    scaling_factor=side.get(SCALING_FACTOR),
                    source=side.get(SOURCE),
                )
            ]
        except AudioInputError as e:
            raise AudioInputError(f"{path}: {e}") from None
    return _bare_clips(z, str(path), seconds, num_samples, sample_rate)


def _bare_clips(
    z: np.ndarray, what: str, seconds: float | None, num_samples: int | None, sample_rate: int
) -> list[EncodedAudio]:
    """Bare pipeline latents `[8, T, 16]` (one clip) or `[B, 8, T, 16]` (B clips) of gain 1."""
    problem = latent_shape_problem(z.shape, batched=True)
    if problem:
        raise AudioInputError(f"{what}: {problem}")
    batch = z[None] if z.ndim == 3 else z
    if not len(batch):
        raise AudioInputError(f"{what}: a batch of no latents, shape {list(z.shape)}")
    try:
        n = bare_num_samples(batch.shape[2], seconds, num_samples, sample_rate)
        return [
            EncodedAudio(
                latents=item[None], num_samples=n, gain=(1.0,), bundle_fingerprint=None, sample_rate=sample_rate
            )
            for item in batch
        ]
    except AudioInputError as e:
        raise AudioInputError(f"{what}: {e}") from None


def decode_encoded(encoded: EncodedAudio, decode: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """Decode a clip to audio at its length and level.

    Args:
        decode: one channel's latents [8, T, 16] and num_samples -> float32 [num_samples], e.g.
            `lambda z, n: rec.decode(z, num_samples=n)` or a server client's decode.
    Returns:
        float32 [num_samples] for one channel, [num_samples, channels] for several (soundfile's layout).
    """
    waves = []
    for c in range(encoded.channels):
        with np.errstate(over="ignore"):
            waves.append(
                np.asarray(decode(encoded.latents[c], encoded.num_samples), np.float32) * np.float32(encoded.gain[c])
            )
    out = waves[0] if len(waves) == 1 else np.stack(waves, axis=1)
    if not np.isfinite(out).all():
        raise NumericalError(
            f"the decoded audio at the recorded level (gain {list(encoded.gain)}) is past float32's range",
            input_caused=True,
        )
    return out
