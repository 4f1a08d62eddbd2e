"""`bucket_frames`: one-window inputs padded to shared lengths (what `recon-run serve` batches on),
cropped back to the input's length; the default keeps the runtime's multiple-of-4 padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .conftest import tone


@pytest.fixture(scope="module")
def recs(tiny_bundle: Path) -> tuple:
    from recon_runtime import Reconstructor

    kw = {"provider": "cpu", "precision": "fp32", "threads": 1}
    return Reconstructor.load(tiny_bundle, **kw), Reconstructor.load(tiny_bundle, bucket_frames=128, **kw)


def test_padded_lengths(recs: tuple) -> None:
    default, bucketed = recs
    cases = {1: (4, 128), 5: (8, 128), 128: (128, 128), 129: (132, 256), 1000: (1000, 1024), 1024: (1024, 1024)}
    cases |= {1025: (1028, 1028), 1088: (1088, 1088), 3001: (3004, 3004)}  # past the window: own length / windows
    for frames, (want_default, want_bucketed) in cases.items():
        assert (default.padded_frames(frames), bucketed.padded_frames(frames)) == (want_default, want_bucketed), frames


def test_short_clips_share_a_window_shape_and_keep_their_length(recs: tuple) -> None:
    default, bucketed = recs
    a, b = tone(0.5, 16000, 300.0), tone(1.1, 16000, 500.0)
    fa, fb = bucketed.features(a, 16000), bucketed.features(b, 16000)
    ja, jb = bucketed.reconstruction_job(fa), bucketed.reconstruction_job(fb)
    assert ja.key(0) == jb.key(0) and ja.windows[0].shape == (1, 128, 64)
    assert default.reconstruction_job(fa).key(0) != default.reconstruction_job(fb).key(0)
    pad = ja.windows[0][0, fa.log_mel.shape[0] :]
    assert np.all(pad == bucketed.contract.mel.silence)
    for rec in recs:
        assert rec.reconstruct(a, 16000).shape == a.shape
        z = rec.encode(b, 16000)
        assert z.shape == (8, -(-fb.log_mel.shape[0] // 4), 16)
        assert rec.decode(z, num_samples=b.size).shape == b.shape
    # batched together or alone, a clip's output is the same
    (wa,), (wb,) = bucketed.run_jobs([ja, jb])
    (alone,) = bucketed.run_jobs([ja])[0]
    assert np.linalg.norm(wa - alone) <= 1e-5 * np.linalg.norm(alone)


@pytest.mark.parametrize("bucket", [0, 2, 130])
def test_bucket_must_be_a_multiple_of_4(tiny_bundle: Path, bucket: int) -> None:
    from recon_runtime import Reconstructor

    with pytest.raises(ValueError, match="bucket_frames"):
        Reconstructor.load(tiny_bundle, provider="cpu", precision="fp32", bucket_frames=bucket)
