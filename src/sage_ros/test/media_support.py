"""Test media made on the fly: spoken WAVs (espeak-ng), and (below) video and photos.

Real files, no fixtures checked in: speech is synthesised with espeak-ng (22050 Hz mono s16),
resampled and padded with silence here, and written as 16-bit PCM WAV.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from math import gcd
from pathlib import Path
from typing import Union

import numpy as np
import pytest


def speak(text: str, path: Union[str, Path], voice: str = 'en-us', rate: int = 150,
          pad_s: float = 1.0, sample_rate: int = 16000) -> Path:
    """Writes `text` spoken by espeak-ng to `path` (mono 16-bit WAV at `sample_rate`, with
    `pad_s` seconds of silence before and after) and returns the path. Skips the calling test
    with a clear reason when espeak-ng is not installed."""
    import soundfile as sf
    # scipy (a dependency of scikit-image): test speech is resampled independently of the code
    # under test (core.perception.audio).
    from scipy.signal import resample_poly

    exe = shutil.which('espeak-ng')
    if exe is None:
        pytest.skip('espeak-ng is not installed (apt-get install espeak-ng): no test speech')
    out = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / 'espeak.wav'
        subprocess.run([exe, '-v', voice, '-s', str(rate), '-w', str(raw), text],
                       check=True, capture_output=True, timeout=60)
        samples, src_rate = sf.read(str(raw), dtype='float32', always_2d=True)
    mono = samples.mean(axis=1)
    if src_rate != sample_rate:
        g = gcd(int(src_rate), int(sample_rate))
        mono = resample_poly(mono, sample_rate // g, int(src_rate) // g).astype(np.float32)
    pad = np.zeros(int(round(pad_s * sample_rate)), dtype=np.float32)
    signal = np.clip(np.concatenate([pad, mono, pad]), -1.0, 1.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), signal, sample_rate, subtype='PCM_16')
    return out


# --- video and photos -----------------------------------------------------------------------


def moving_square_video(path: Union[str, Path], frames: int = 60, start_moving: int = 30,
                        size: tuple = (640, 480), fps: float = 15.0, side: int = 128,
                        step: int = 48) -> Path:
    """Writes a synthetic clip to `path` and returns the path: a static textured background
    (smooth blobs, stripes and text, from a fixed seed) with a red square (`side` px) that stands
    still until frame `start_moving`, then moves `step` px per frame (bouncing off the sides):
    at the defaults about 3 % of a 640x480 frame changes per moving frame (the camera node's
    default motion onset is 2 %).
    The codec follows the suffix: `.avi` MJPG (every frame intra-coded: static frames decode
    identically), `.mp4` mp4v."""
    import cv2

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    width, height = int(size[0]), int(size[1])
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    background = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    background = cv2.GaussianBlur(background, (0, 0), 3)
    for x in range(0, width, 64):
        cv2.line(background, (x, 0), (x, height - 1), (40, 40, 40), 2)
    cv2.putText(background, 'sage_ros test clip', (20, height - 30), cv2.FONT_HERSHEY_SIMPLEX,
                1.0, (255, 255, 255), 2)
    fourcc = cv2.VideoWriter.fourcc(*('mp4v' if out.suffix.lower() == '.mp4' else 'MJPG'))
    writer = cv2.VideoWriter(str(out), fourcc, float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(f'OpenCV cannot write {out}')
    x, y, direction = 40, (height - side) // 2, 1
    try:
        for i in range(frames):
            if i >= start_moving:
                x += direction * step
                if x < 0 or x + side > width:
                    direction = -direction
                    x += 2 * direction * step
            frame = background.copy()
            cv2.rectangle(frame, (x, y), (x + side - 1, y + side - 1), (0, 0, 255), -1)  # BGR red
            writer.write(frame)
    finally:
        writer.release()
    return out


def astronaut_jpeg(path: Union[str, Path], quality: int = 90) -> Path:
    """Writes scikit-image's bundled astronaut photo (512x512, one frontal face at about
    [177, 66, 95, 95]) as a JPEG to `path` and returns the path."""
    import cv2
    from skimage import data

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode('.jpg', cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError('JPEG encoding of the astronaut photo failed')
    out.write_bytes(buf.tobytes())
    return out
