"""Images without ROS: decoding, JPEG encoding, motion, brightness and appearance features, and
the per-frame summary the camera node publishes (keyframe policy included).

    decode_image(format, width, height, data)   jpeg | png | rgb8 | bgr8 | mono8 -> RGB uint8
    read_image_file(path_or_bytes)              an image file (sniffed: JPEG, PNG, BMP, ...)
    encode_jpeg(rgb, quality)                   RGB uint8 -> JPEG bytes
    MotionDetector                              grey -> Gaussian 5x5 -> |diff| with the previous
                                                frame -> threshold -> fraction changed (+ box)
    frame_features(rgb)                         32 floats, unit norm (salience novelty)
    brightness(rgb)                             mean luminance in [0, 1]
    FrameAnalyzer                               all of the above per frame, and whether the
                                                frame is a keyframe and why
    FrameSlot                                   newest-frame handoff, counting dropped frames
    VideoReader, load_media                     video files, capture devices, files to play

Every payload that cannot be used raises `MediaError` with a message fit for one log line.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Union

import cv2
import numpy as np

from ..inference import Detection, MediaError, read_media_file

FORMATS = ('jpeg', 'png', 'rgb8', 'bgr8', 'mono8')
_ALIASES = {'jpg': 'jpeg', 'mono': 'mono8', 'gray': 'mono8', 'grey': 'mono8', 'rgb': 'rgb8',
            'bgr': 'bgr8'}
_CHANNELS = {'rgb8': 3, 'bgr8': 3, 'mono8': 1}
MAX_SIDE = 16384   # [px] larger sides are refused (a corrupt header, or memory we do not have)

Box = Tuple[int, int, int, int]   # x, y, width, height [px]
Payload = Union[bytes, bytearray, memoryview, np.ndarray, Any]   # Any: array.array, list of int


def _as_bytes(data: Payload) -> np.ndarray:
    """A payload (bytes, array.array('B') from a ROS message, numpy) as a flat uint8 array,
    without a copy where the buffer allows it."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    try:
        return np.frombuffer(memoryview(data), dtype=np.uint8)
    except TypeError:
        return np.asarray(list(data), dtype=np.uint8)


def sniff_format(data: Payload) -> str:
    """'jpeg' or 'png' from the first bytes, else ''."""
    head = bytes(_as_bytes(data)[:8])
    if head.startswith(b'\xff\xd8\xff'):
        return 'jpeg'
    if head.startswith(b'\x89PNG\r\n\x1a\n'):
        return 'png'
    return ''


def _check_complete(fmt: str, raw: np.ndarray) -> None:
    """libjpeg decodes a truncated JPEG into a grey-bottomed image with only a warning on
    stderr: refuse it here. A JPEG ends with EOI (FF D9) after its last scan (FF DA); neither
    marker can occur inside entropy-coded data. A PNG ends with its IEND chunk."""
    buf = raw.tobytes()
    if fmt == 'jpeg':
        if not buf.startswith(b'\xff\xd8'):
            raise MediaError('not a JPEG (no start-of-image marker)')
        if buf.rfind(b'\xff\xd9') < buf.rfind(b'\xff\xda'):
            raise MediaError(f'truncated JPEG ({len(buf)} bytes, no end-of-image marker '
                             'after the last scan)')
    elif fmt == 'png':
        if not buf.startswith(b'\x89PNG\r\n\x1a\n'):
            raise MediaError('not a PNG (bad signature)')
        if b'IEND' not in buf[-32:]:
            raise MediaError(f'truncated PNG ({len(buf)} bytes, no IEND chunk)')


def _decode_compressed(raw: np.ndarray, what: str) -> np.ndarray:
    bgr = cv2.imdecode(raw, cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise MediaError(f'cannot decode {what} ({raw.size} bytes)')
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def decode_image(fmt: str, width: int, height: int, data: Payload) -> np.ndarray:
    """An image payload as RGB uint8 (H, W, 3).

    `fmt` is jpeg/png (width and height are then taken from the data; 0 is fine) or a raw
    encoding, rgb8/bgr8/mono8, whose byte length must be exactly width * height * channels.
    """
    name = _ALIASES.get(fmt.strip().lower(), fmt.strip().lower())
    if name not in FORMATS:
        raise MediaError(f'unknown image format {fmt!r}; expected one of {", ".join(FORMATS)}')
    raw = _as_bytes(data)
    if raw.size == 0:
        raise MediaError(f'empty {name} image (0 bytes)')
    if name in ('jpeg', 'png'):
        _check_complete(name, raw)
        return _decode_compressed(raw, name.upper())
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise MediaError(f'{name} image of size {width}x{height}: width and height must be '
                         'positive')
    if width > MAX_SIDE or height > MAX_SIDE:
        raise MediaError(f'{name} image of size {width}x{height}: larger than {MAX_SIDE} px')
    channels = _CHANNELS[name]
    expected = width * height * channels
    if raw.size != expected:
        raise MediaError(f'{name} image {width}x{height} needs {expected} bytes, got {raw.size}')
    pixels = raw.reshape(height, width, channels) if channels > 1 else raw.reshape(height, width)
    if name == 'rgb8':
        return pixels.copy()
    if name == 'bgr8':
        return np.ascontiguousarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB))
    return np.ascontiguousarray(cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB))


def read_image_file(source: Union[str, Path, bytes, bytearray, memoryview]) -> np.ndarray:
    """An image file (a path, or the file's bytes) as RGB uint8 (H, W, 3). JPEG and PNG are
    checked for truncation; other formats OpenCV reads (BMP, TIFF, WebP, ...) are accepted."""
    if isinstance(source, (str, Path)):
        data = read_media_file(source)
        what = Path(source).name
    else:
        data = bytes(source)
        what = 'image data'
    if not data:
        raise MediaError(f'{what}: empty file (0 bytes)')
    fmt = sniff_format(data)
    raw = np.frombuffer(data, dtype=np.uint8)
    try:
        if fmt:
            _check_complete(fmt, raw)
            return _decode_compressed(raw, fmt.upper())
        bgr = cv2.imdecode(raw, cv2.IMREAD_COLOR)   # BMP, TIFF, WebP, ...
        if bgr is None or bgr.size == 0:
            raise MediaError('not an image file OpenCV can read')
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    except MediaError as exc:
        raise MediaError(f'{what}: {exc}') from None


def check_rgb(rgb: Any, what: str = 'image') -> np.ndarray:
    """`rgb` if it is an RGB uint8 (H, W, 3) array with pixels, else MediaError."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 \
            or rgb.shape[2] != 3:
        shape = getattr(rgb, 'shape', None)
        dtype = getattr(rgb, 'dtype', type(rgb).__name__)
        raise MediaError(f'{what} must be an RGB uint8 array (H, W, 3); got {dtype} {shape}')
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise MediaError(f'{what} has no pixels ({rgb.shape[1]}x{rgb.shape[0]})')
    return rgb


def encode_jpeg(rgb: np.ndarray, quality: int = 80) -> bytes:
    """RGB uint8 (H, W, 3) as JPEG bytes, quality 1..100."""
    check_rgb(rgb)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f'JPEG quality {quality} is outside 1..100')
    ok, buf = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise MediaError('JPEG encoding failed')
    return buf.tobytes()


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """`rgb` at exactly width x height (0 keeps that side's size; area averaging when
    shrinking)."""
    h, w = rgb.shape[:2]
    width, height = width or w, height or h
    if (w, h) == (width, height):
        return rgb
    shrink = width * height < w * h
    return cv2.resize(rgb, (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def brightness(rgb: np.ndarray) -> float:
    """Mean luminance (Rec. 601 grey) in [0, 1]."""
    return float(np.mean(grey(check_rgb(rgb)))) / 255.0


@dataclass(frozen=True)
class Motion:
    """What changed since the previous frame: the fraction of pixels, and where (None when
    nothing did). `box_fill` is the changed fraction of the box's own pixels."""

    fraction: float
    box: Optional[Box] = None
    box_fill: float = 0.0

    def detection(self) -> Optional[Detection]:
        """The changed region as a 'motion' Detection (score: how much of the box changed)."""
        if self.box is None:
            return None
        x, y, w, h = self.box
        return Detection('motion', self.box_fill, x, y, w, h)


class MotionDetector:
    """Frame differencing: grey -> Gaussian blur 5x5 -> |difference| with the previous frame ->
    threshold (grey levels, 0..255) -> the fraction of pixels that changed. The first frame, and
    a frame whose size differs from the previous one, have no motion."""

    def __init__(self, threshold: int = 25, blur: int = 5) -> None:
        if not 0 <= threshold <= 255:
            raise ValueError(f'motion threshold {threshold} is outside 0..255')
        if blur < 1 or blur % 2 == 0:
            raise ValueError(f'blur kernel {blur} must be odd and positive')
        self.threshold = int(threshold)
        self.blur = int(blur)
        self._previous: Optional[np.ndarray] = None

    def reset(self) -> None:
        self._previous = None

    def update(self, rgb: np.ndarray) -> Motion:
        smooth = cv2.GaussianBlur(grey(check_rgb(rgb)), (self.blur, self.blur), 0)
        previous, self._previous = self._previous, smooth
        if previous is None or previous.shape != smooth.shape:
            return Motion(0.0)
        diff = cv2.absdiff(smooth, previous)
        _, mask = cv2.threshold(diff, self.threshold, 255, cv2.THRESH_BINARY)
        changed = int(cv2.countNonZero(mask))
        if changed == 0:
            return Motion(0.0)
        x, y, w, h = (int(v) for v in cv2.boundingRect(mask))
        return Motion(changed / mask.size, (x, y, w, h), changed / float(w * h))


FEATURE_THUMB = 4      # grey thumbnail side: 16 values
FEATURE_BINS = 8       # hue bins and brightness bins: 8 + 8 values
FEATURE_SIZE = FEATURE_THUMB * FEATURE_THUMB + 2 * FEATURE_BINS   # 32


def frame_features(rgb: np.ndarray) -> Tuple[float, ...]:
    """A compact appearance vector of 32 floats, unit norm, for salience (novelty by cosine):
    a 4x4 grey thumbnail (layout), a hue histogram weighted by saturation and value (colour;
    zero for a grey image) and a brightness histogram (exposure), each part in [0, 1] before
    the whole is normalised. Computed on a 64x48 copy, so it costs the same for any frame."""
    small = cv2.resize(check_rgb(rgb), (64, 48), interpolation=cv2.INTER_AREA)
    g = grey(small)
    thumb = cv2.resize(g, (FEATURE_THUMB, FEATURE_THUMB), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)   # H in 0..179, S and V in 0..255
    weight = (hsv[..., 1].astype(np.float64) / 255.0) * (hsv[..., 2].astype(np.float64) / 255.0)
    hue_bins = np.minimum(hsv[..., 0].astype(np.int64) * FEATURE_BINS // 180, FEATURE_BINS - 1)
    hue = np.bincount(hue_bins.reshape(-1), weights=weight.reshape(-1),
                      minlength=FEATURE_BINS).astype(np.float64) / float(g.size)
    light_bins = np.minimum(g.astype(np.int64) * FEATURE_BINS // 256, FEATURE_BINS - 1)
    light = np.bincount(light_bins.reshape(-1), minlength=FEATURE_BINS).astype(np.float64)
    light /= float(g.size)
    vec = np.concatenate([thumb.reshape(-1).astype(np.float64) / 255.0, hue, light])
    # The brightness histogram sums to 1, so the norm is never 0.
    vec /= float(np.linalg.norm(vec))
    return tuple(float(v) for v in vec)


# Keyframe reasons (VisualObservation.reason).
REASON_FIRST = 'first frame'
REASON_MOTION = 'motion onset'
REASON_PERIODIC = 'periodic'
REASON_PLAYED = 'played'


@dataclass
class FrameSummary:
    """One processed frame: what the camera node publishes about it."""

    frame: int                 # number since the source opened (0 = first)
    rgb: np.ndarray            # the frame, resized
    motion: Motion
    brightness: float
    features: Tuple[float, ...]
    keyframe: bool
    reason: str                # '' unless keyframe
    jpeg: bytes                # the encoded frame on keyframes, else b''
    process_s: float           # [s] this frame's cost (resize, motion, features, JPEG)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


class FrameAnalyzer:
    """Per-frame analysis for one camera: resize, motion, brightness, features, and the keyframe
    decision. Keyframes: the first frame of a source (`reset` starts one), motion onset (motion
    crosses `motion_onset` upward), every `keyframe_period_s` since the last keyframe (0: never)
    and a frame given a reason (`force`, e.g. 'played'). Not thread-safe: one caller at a time.
    """

    def __init__(self, width: int = 640, height: int = 480, motion_threshold: int = 25,
                 motion_onset: float = 0.02, keyframe_period_s: float = 5.0,
                 jpeg_quality: int = 80, clock: Callable[[], float] = time.monotonic) -> None:
        if width < 0 or height < 0:
            raise ValueError(f'frame size {width}x{height} must not be negative')
        if not 0.0 < motion_onset <= 1.0:
            raise ValueError(f'motion_onset {motion_onset} is outside (0, 1]')
        if keyframe_period_s < 0 or not math.isfinite(keyframe_period_s):
            raise ValueError(f'keyframe_period_s {keyframe_period_s} must be >= 0')
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f'jpeg_quality {jpeg_quality} is outside 1..100')
        self.width, self.height = int(width), int(height)
        self.motion_onset = float(motion_onset)
        self.keyframe_period_s = float(keyframe_period_s)
        self.jpeg_quality = int(jpeg_quality)
        self._clock = clock
        self._motion = MotionDetector(motion_threshold)
        self._frame = -1
        self._last_motion = 0.0
        self._last_keyframe_t: Optional[float] = None

    def reset(self) -> None:
        """A new source (or a played file): the next frame is frame 0 and a keyframe."""
        self._motion.reset()
        self._frame = -1
        self._last_motion = 0.0
        self._last_keyframe_t = None

    def forget_previous(self) -> None:
        """No motion against the frame before this call (the source paused meanwhile)."""
        self._motion.reset()
        self._last_motion = 0.0

    def process(self, rgb: np.ndarray, force: str = '') -> FrameSummary:
        t0 = time.perf_counter()
        frame = resize(check_rgb(rgb, 'frame'), self.width, self.height)
        motion = self._motion.update(frame)
        self._frame += 1
        now = self._clock()
        reason = force
        if not reason and self._frame == 0:
            reason = REASON_FIRST
        if not reason and motion.fraction >= self.motion_onset > self._last_motion:
            reason = REASON_MOTION
        if not reason and self.keyframe_period_s > 0 and self._last_keyframe_t is not None \
                and now - self._last_keyframe_t >= self.keyframe_period_s:
            reason = REASON_PERIODIC
        self._last_motion = motion.fraction
        if reason:
            self._last_keyframe_t = now
        summary = FrameSummary(
            frame=self._frame, rgb=frame, motion=motion, brightness=brightness(frame),
            features=frame_features(frame), keyframe=bool(reason), reason=reason,
            jpeg=encode_jpeg(frame, self.jpeg_quality) if reason else b'', process_s=0.0)
        summary.process_s = time.perf_counter() - t0
        return summary


class FrameSlot:
    """The newest frame, handed from a capture thread to a processing thread. A frame put
    while the previous one is still waiting replaces it and counts as dropped: the processing
    side always takes the newest frame and never queues behind the camera."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Optional[Tuple[np.ndarray, Any]] = None
        self._closed = False
        self.dropped = 0      # frames replaced before they were taken
        self.put_count = 0

    def put(self, frame: np.ndarray, stamp: Any = None) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = (frame, stamp)
            self.put_count += 1
            self._cond.notify_all()

    def take(self, timeout: Optional[float] = None) -> Optional[Tuple[np.ndarray, Any]]:
        """The newest frame and its stamp; None after `timeout` or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._frame is not None or self._closed, timeout)
            got, self._frame = self._frame, None
            return got

    def clear(self) -> None:
        """Forget a waiting frame (not counted as dropped: nobody was behind)."""
        with self._cond:
            self._frame = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _quiet_opencv() -> None:
    """OpenCV's own warnings (V4L2 'can't open camera by index', FFMPEG probing) go to stderr
    beside our one clear log line; keep only its errors."""
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # a build without the logging utilities
        pass


VIDEO_CONTAINERS = ('AVI', 'MP4/MOV', 'Matroska/WebM', 'MPEG-PS/TS', 'Ogg', 'FLV', 'ASF/WMV',
                    'GIF', 'Y4M')


def sniff_video(head: bytes) -> str:
    """The container of a video file from its first bytes (at least 376 for MPEG-TS), or ''."""
    if head[:4] == b'RIFF' and head[8:12] == b'AVI ':
        return 'AVI'
    if head[4:8] in (b'ftyp', b'moov', b'mdat', b'wide', b'free', b'skip'):
        return 'MP4/MOV'
    if head.startswith(b'\x1a\x45\xdf\xa3'):
        return 'Matroska/WebM'
    if head.startswith((b'\x00\x00\x01\xba', b'\x00\x00\x01\xb3')) or \
            (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47):
        return 'MPEG-PS/TS'
    if head.startswith(b'OggS'):
        return 'Ogg'
    if head.startswith(b'FLV'):
        return 'FLV'
    if head.startswith(b'\x30\x26\xb2\x75\x8e\x66\xcf\x11'):
        return 'ASF/WMV'
    if head.startswith((b'GIF87a', b'GIF89a')):
        return 'GIF'
    if head.startswith(b'YUV4MPEG2'):
        return 'Y4M'
    return ''


class VideoReader:
    """RGB frames of a video file or a capture device (cv2.VideoCapture)."""

    def __init__(self, capture: Any, what: str, live: bool) -> None:
        self._cap = capture
        self.what = what
        self.live = live
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if math.isfinite(fps) and 0.0 < fps <= 1000.0 else 0.0
        count = float(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
        self.frame_count = int(count) if math.isfinite(count) and count > 0 else 0

    @classmethod
    def open_file(cls, path: Union[str, Path]) -> 'VideoReader':
        """A video file; MediaError when it is missing, empty or not a video OpenCV reads."""
        _quiet_opencv()
        p = Path(path).expanduser()
        if not sniff_video(read_media_file(p, 512)):
            # FFmpeg would "play" almost anything (a text file renders as a video), so only
            # known containers count as video.
            raise MediaError(f'{p.name}: not an image or a video OpenCV can read (video: '
                             f'{", ".join(VIDEO_CONTAINERS)})')
        cap = cv2.VideoCapture(str(p))
        if not cap.isOpened():
            cap.release()
            raise MediaError(f'{p.name}: not an image or a video OpenCV can read')
        return cls(cap, p.name, live=False)

    @classmethod
    def open_device(cls, device: str, width: int = 0, height: int = 0) -> 'VideoReader':
        """A capture device: an index ('0') or a device path ('/dev/video2'); MediaError when
        it does not open (no such device, busy, no permission)."""
        _quiet_opencv()
        target: Union[int, str] = int(device) if device.strip().isdigit() else device.strip()
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            raise MediaError(f'camera device {device!r} did not open (no such device, busy, '
                             'or no permission)')
        if width and height:   # a request; the device may deliver another size (we resize)
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        return cls(cap, f'device {device}', live=True)

    def read(self) -> Optional[np.ndarray]:
        """The next frame (RGB), or None at the end or on a read failure."""
        ok, bgr = self._cap.read()
        if not ok or bgr is None or bgr.size == 0:
            return None
        if bgr.ndim == 2:
            return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB))
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def rewind(self) -> bool:
        return bool(self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0))

    def release(self) -> None:
        self._cap.release()


@dataclass
class Media:
    """A file to play: an image (`image` set) or a video (`video_path` set; `temporary` when it
    was written from bytes and must be deleted after)."""

    name: str
    image: Optional[np.ndarray] = None
    video_path: Optional[Path] = None
    temporary: bool = False

    def discard(self) -> None:
        if self.temporary and self.video_path is not None:
            try:
                self.video_path.unlink()
            except OSError:
                pass


def _is_image_data(head: bytes) -> bool:
    return bool(sniff_format(head)) or head.startswith((b'BM', b'II*\x00', b'MM\x00*')) or \
        (head[:4] == b'RIFF' and head[8:12] == b'WEBP')


def load_media(path: str = '', data: Optional[Payload] = None,
               tmp_dir: Optional[str] = None) -> Media:
    """An image or a video to play, from a path or from the file's bytes (a video's bytes are
    written to a temporary file: OpenCV reads video from files only). Images are decoded here;
    a video is checked to open. Anything else raises MediaError."""
    if path:
        p = Path(path).expanduser()
        if _is_image_data(read_media_file(p, 16)):
            return Media(p.name, image=read_image_file(p))
        VideoReader.open_file(p).release()
        return Media(p.name, video_path=p)
    raw = bytes(_as_bytes(data if data is not None else b''))
    if not raw:
        raise MediaError('nothing to play: no path and no data')
    if _is_image_data(raw[:16]):
        return Media('data', image=read_image_file(raw))
    with tempfile.NamedTemporaryFile(prefix='sage_play_', suffix='.video', dir=tmp_dir,
                                     delete=False) as f:
        f.write(raw)
        tmp = Path(f.name)
    media = Media('data', video_path=tmp, temporary=True)
    try:
        VideoReader.open_file(tmp).release()
    except MediaError:
        media.discard()
        raise MediaError(f'data ({len(raw)} bytes): not an image or a video OpenCV can read') \
            from None
    return media
