"""Images without ROS: decoding and garbage, motion, features, the keyframe policy, the frame
slot's drop count, and files to play."""

from __future__ import annotations

from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
from skimage import data

from media_support import astronaut_jpeg, moving_square_video
from sage_ros.core.inference import MediaError
from sage_ros.core.perception.image import (FEATURE_SIZE, REASON_FIRST, REASON_MOTION,
                                            REASON_PERIODIC, REASON_PLAYED, FrameAnalyzer,
                                            FrameSlot, MotionDetector, VideoReader, brightness,
                                            decode_image, encode_jpeg, frame_features,
                                            load_media, read_image_file, resize)


def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut())


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def video_frames(path: Path) -> List[np.ndarray]:
    reader = VideoReader.open_file(path)
    frames = []
    while (f := reader.read()) is not None:
        frames.append(f)
    reader.release()
    return frames


# -- decoding ------------------------------------------------------------------------------

def test_decode_raw_encodings_round_trip() -> None:
    rgb = astronaut()[:48, :64]
    h, w = rgb.shape[:2]
    assert np.array_equal(decode_image('rgb8', w, h, rgb.tobytes()), rgb)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    assert np.array_equal(decode_image('bgr8', w, h, bgr.tobytes()), rgb)
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    mono = decode_image('mono8', w, h, g.tobytes())
    assert mono.shape == (h, w, 3) and np.array_equal(mono[..., 0], g)
    # ROS messages carry uint8[] as array.array('B')
    import array
    assert np.array_equal(decode_image('RGB8', w, h, array.array('B', rgb.tobytes())), rgb)


def test_decode_jpeg_and_png() -> None:
    rgb = astronaut()
    jpeg = decode_image('jpeg', 0, 0, encode_jpeg(rgb, 95))
    assert jpeg.shape == rgb.shape and jpeg.dtype == np.uint8
    assert float(np.mean(np.abs(jpeg.astype(int) - rgb.astype(int)))) < 6.0
    assert np.array_equal(decode_image('png', 0, 0, png_bytes(rgb)), rgb)
    assert decode_image('jpg', 512, 512, encode_jpeg(rgb)).shape == (512, 512, 3)


@pytest.mark.parametrize('fmt, width, height, payload, words', [
    ('rgb8', 4, 4, b'', 'empty'),
    ('jpeg', 0, 0, b'', 'empty'),
    ('rgb8', 4, 4, bytes(47), 'needs 48 bytes, got 47'),
    ('mono8', 4, 4, bytes(17), 'needs 16 bytes, got 17'),
    ('bgr8', 0, 4, bytes(12), 'must be positive'),
    ('rgb8', 20000, 1, bytes(60000), 'larger than'),
    ('tiff', 4, 4, bytes(48), 'unknown image format'),
    ('jpeg', 0, 0, b'hello, not a picture', 'not a JPEG'),
    ('png', 0, 0, b'hello, not a picture', 'not a PNG'),
])
def test_decode_garbage_is_a_clear_media_error(fmt: str, width: int, height: int,
                                               payload: bytes, words: str) -> None:
    with pytest.raises(MediaError, match=words):
        decode_image(fmt, width, height, payload)


def test_truncated_and_corrupt_compressed_images_are_refused() -> None:
    jpeg = encode_jpeg(astronaut())
    with pytest.raises(MediaError, match='truncated JPEG'):
        decode_image('jpeg', 0, 0, jpeg[:len(jpeg) // 2])
    png = png_bytes(astronaut())
    with pytest.raises(MediaError, match='truncated PNG'):
        decode_image('png', 0, 0, png[:len(png) // 2])
    # A PNG signature and end with garbage between: libpng refuses it.
    with pytest.raises(MediaError, match='cannot decode PNG'):
        decode_image('png', 0, 0, png[:16] + bytes(200) + png[-12:])


def test_read_image_file(tmp_path: Path) -> None:
    path = astronaut_jpeg(tmp_path / 'astronaut.jpg')
    assert read_image_file(path).shape == (512, 512, 3)
    assert read_image_file(path.read_bytes()).shape == (512, 512, 3)
    text = tmp_path / 'notes.txt'
    text.write_text('this is not an image\n' * 10)
    with pytest.raises(MediaError, match='notes.txt: not an image file'):
        read_image_file(text)
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    with pytest.raises(MediaError, match='empty file'):
        read_image_file(empty)
    cut = tmp_path / 'cut.jpg'
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(MediaError, match='cut.jpg: truncated JPEG'):
        read_image_file(cut)
    with pytest.raises(MediaError, match='no such file: .*missing.png'):
        read_image_file(tmp_path / 'missing.png')


def test_encode_jpeg_checks_its_input() -> None:
    with pytest.raises(MediaError, match='RGB uint8'):
        encode_jpeg(np.zeros((4, 4), np.uint8))
    with pytest.raises(MediaError, match='no pixels'):
        encode_jpeg(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match='quality'):
        encode_jpeg(astronaut(), 0)


def test_brightness_and_resize() -> None:
    assert brightness(np.zeros((8, 8, 3), np.uint8)) == 0.0
    assert brightness(np.full((8, 8, 3), 255, np.uint8)) == pytest.approx(1.0)
    assert 0.3 < brightness(astronaut()) < 0.6
    assert resize(astronaut(), 640, 480).shape == (480, 640, 3)
    assert resize(astronaut(), 0, 0).shape == (512, 512, 3)


# -- motion --------------------------------------------------------------------------------

def test_motion_is_zero_on_static_frames_and_positive_once_the_square_moves(
        tmp_path: Path) -> None:
    frames = video_frames(moving_square_video(tmp_path / 'clip.avi', frames=40, start_moving=20))
    assert len(frames) == 40
    detector = MotionDetector()
    motions = [detector.update(f) for f in frames]
    assert all(m.fraction == 0.0 and m.box is None for m in motions[:20])
    assert all(0.01 < m.fraction < 0.1 for m in motions[20:])
    # The changed region is where the square was and is now: on the square's row band.
    m = motions[25]
    assert m.box is not None
    x, y, w, h = m.box
    assert y <= (480 - 128) // 2 + 5 and y + h >= (480 + 128) // 2 - 5 and w >= 48
    det = m.detection()
    assert det is not None and det.label == 'motion' and 0.0 < det.score <= 1.0


def test_motion_first_frame_and_size_change_have_none() -> None:
    detector = MotionDetector()
    assert detector.update(astronaut()).fraction == 0.0
    assert detector.update(np.zeros((100, 100, 3), np.uint8)).fraction == 0.0   # new size
    assert detector.update(np.full((100, 100, 3), 255, np.uint8)).fraction == 1.0
    with pytest.raises(ValueError):
        MotionDetector(threshold=300)


# -- features ------------------------------------------------------------------------------

def test_features_are_unit_norm_and_stable() -> None:
    rgb = astronaut()
    f = np.array(frame_features(rgb))
    assert f.shape == (FEATURE_SIZE,) == (32,)
    assert np.linalg.norm(f) == pytest.approx(1.0)
    assert np.array_equal(f, np.array(frame_features(rgb.copy())))
    rng = np.random.default_rng(0)
    noisy = np.clip(rgb.astype(int) + rng.integers(-4, 5, rgb.shape), 0, 255).astype(np.uint8)
    assert float(f @ np.array(frame_features(noisy))) > 0.995
    dark = (rgb // 4).astype(np.uint8)
    assert float(f @ np.array(frame_features(dark))) < 0.9
    for flat in (np.zeros((10, 10, 3), np.uint8), np.full((10, 10, 3), 128, np.uint8)):
        assert np.linalg.norm(frame_features(flat)) == pytest.approx(1.0)


# -- keyframes -----------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_keyframe_policy_first_motion_onset_periodic_and_played() -> None:
    clock = FakeClock()
    analyzer = FrameAnalyzer(64, 48, motion_onset=0.05, keyframe_period_s=5.0, clock=clock)
    black = np.zeros((96, 128, 3), np.uint8)
    white_box = black.copy()
    white_box[:, :64] = 255   # half the frame changes
    reasons = []
    for frame in (black, black, white_box, black, black):
        s = analyzer.process(frame)
        reasons.append(s.reason)
        assert s.keyframe == bool(s.reason) and bool(s.jpeg) == s.keyframe
        assert (s.width, s.height) == (64, 48) and s.process_s > 0.0
    # the square appears: onset; it vanishes again while motion is still high: no new onset
    assert reasons == [REASON_FIRST, '', REASON_MOTION, '', '']
    clock.t += 5.0
    assert analyzer.process(black).reason == REASON_PERIODIC
    assert analyzer.process(black).reason == ''
    assert analyzer.process(black, REASON_PLAYED).reason == REASON_PLAYED
    assert decode_image('jpeg', 0, 0, analyzer.process(black, 'x').jpeg).shape == (48, 64, 3)
    analyzer.reset()
    s = analyzer.process(black)
    assert (s.frame, s.reason) == (0, REASON_FIRST)


def test_keyframe_period_zero_means_never() -> None:
    clock = FakeClock()
    analyzer = FrameAnalyzer(0, 0, keyframe_period_s=0.0, clock=clock)
    analyzer.process(astronaut())
    clock.t += 1e6
    assert analyzer.process(astronaut()).reason == ''


def test_frame_slot_keeps_the_newest_and_counts_what_it_replaced() -> None:
    slot = FrameSlot()
    assert slot.take(timeout=0.0) is None
    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(5)]
    for i, f in enumerate(frames[:3]):
        slot.put(f, i)
    got = slot.take(timeout=0.0)
    assert got is not None and got[1] == 2 and slot.dropped == 2
    slot.put(frames[3], 3)
    assert slot.take(timeout=0.0) is not None and slot.dropped == 2   # taken in time
    slot.put(frames[4], 4)
    slot.clear()
    assert slot.dropped == 2 and slot.take(timeout=0.0) is None
    slot.close()
    assert slot.take(timeout=None) is None   # closed: no wait


# -- files to play -------------------------------------------------------------------------

def test_load_media_images_videos_and_garbage(tmp_path: Path) -> None:
    photo = astronaut_jpeg(tmp_path / 'astronaut.jpg')
    media = load_media(str(photo))
    assert media.image is not None and media.name == 'astronaut.jpg'
    assert load_media(data=photo.read_bytes()).image is not None
    clip = moving_square_video(tmp_path / 'clip.avi', frames=5, start_moving=2)
    media = load_media(str(clip))
    assert media.video_path == clip and not media.temporary
    media = load_media(data=clip.read_bytes(), tmp_dir=str(tmp_path))
    assert media.video_path is not None and media.temporary and media.video_path.is_file()
    assert len(video_frames(media.video_path)) == 5
    media.discard()
    assert not media.video_path.exists()
    text = tmp_path / 'notes.txt'
    text.write_text('not a video\n' * 100)
    empty = tmp_path / 'empty.avi'
    empty.write_bytes(b'')
    cut = tmp_path / 'cut.jpg'
    cut.write_bytes(photo.read_bytes()[:3000])
    for path, words in ((text, 'not an image or a video'), (empty, 'empty file'),
                        (cut, 'truncated JPEG'), (tmp_path / 'missing.mp4', 'no such file')):
        with pytest.raises(MediaError, match=words):
            load_media(str(path))
    with pytest.raises(MediaError, match='not an image or a video'):
        load_media(data=b'\x00\x01garbage' * 100, tmp_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('sage_play_')) == []
    with pytest.raises(MediaError, match='nothing to play'):
        load_media()


def test_a_device_that_does_not_exist_is_a_media_error() -> None:
    with pytest.raises(MediaError, match='did not open'):
        VideoReader.open_device('/dev/video-sage-test-none')
