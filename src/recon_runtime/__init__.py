"""recon_runtime: AudioLDM2's VAE and HiFi-GAN vocoder on ONNX Runtime, without torch."""

from .channels import decode_audio, encode_audio
from .contract import Contract, MelSpec, read_contract
from .errors import AudioInputError, BundleError, NumericalError, OutputError, ProviderError, ReconError
from .files.encoded import EncodedAudio
from .frontend import log_mel, prepare_waveform
from .reconstructor import Reconstructor

__version__ = "0.1.0"
__all__ = [
    "Reconstructor",
    "EncodedAudio",
    "encode_audio",
    "decode_audio",
    "Contract",
    "MelSpec",
    "read_contract",
    "log_mel",
    "prepare_waveform",
    "ReconError",
    "BundleError",
    "AudioInputError",
    "OutputError",
    "ProviderError",
    "NumericalError",
]
