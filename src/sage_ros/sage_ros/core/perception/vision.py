"""The vision model kind: OpenCV's Haar frontal-face cascade as a model-pool runner, and the
short factual scene description the perception block gives the kernel.

A model entry of kind 'vision' names a cascade XML: `opencv:haarcascade_frontalface_default.xml`
(one of the cascades bundled with opencv-python < 5; OpenCV 5 ships none) or a path. `detect`
returns one Detection('face', score, box) per face and, as text, `describe_scene(...)`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..inference import (KIND_VISION, TASK_DETECT, Detection, InferOutput, InferRequest,
                         MediaError, StopFn)
from ..models import LoadedModel, LoadError, LoadProgress, ModelError, ModelSpec, WeightInfo
from .image import brightness as image_brightness
from .image import check_rgb, grey

OPENCV_PREFIX = 'opencv:'
# [bytes] beyond the XML's size: the loaded cascade measured 0.85 MB of RSS for the 0.93 MB
# frontal-face XML; detection on a 640x480 frame allocates an image pyramid of about 1 MB.
WORKING_BYTES = 1 << 20

# detectMultiScale settings: 10 % scale steps, a face must be found at 5 neighbouring
# positions/scales (fewer false faces), and be at least 6 % of the shorter side (>= 24 px).
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
MIN_FACE_FRACTION = 0.06
MIN_FACE_PX = 24
# Score: the cascade's last-stage weight w (detectMultiScale3 levelWeights; a face passes every
# stage, so w > 0, typically 1..8) squashed to [0, 1) as 1 - exp(-w / SCORE_SCALE):
# w = 1.2 -> 0.33, w = 3.7 -> 0.71, w = 5.8 -> 0.86 (the astronaut photo's face).
SCORE_SCALE = 3.0


def opencv_cascades() -> Path:
    """The folder of the cascades bundled with opencv-python (`cv2.data`, untyped)."""
    return Path(getattr(cv2, 'data').haarcascades)


def cascade_path(path: str) -> Path:
    """The cascade XML a model entry's path names (`opencv:FILE` or a path)."""
    if path.startswith(OPENCV_PREFIX):
        return opencv_cascades() / path[len(OPENCV_PREFIX):]
    return Path(path).expanduser()


def _score(weight: float) -> float:
    return 1.0 - math.exp(-max(0.0, float(weight)) / SCORE_SCALE)


class VisionRunner:
    """Runner of kind 'vision': a Haar cascade (CPU, milliseconds to load)."""

    kind = KIND_VISION

    def inspect(self, spec: ModelSpec) -> WeightInfo:
        path = cascade_path(spec.path)
        if not path.is_file():
            if spec.path.startswith(OPENCV_PREFIX):
                shipped = sorted(p.name for p in opencv_cascades().glob('*.xml'))
                hint = (f'OpenCV {cv2.__version__} ships: {", ".join(shipped)}' if shipped else
                        f'OpenCV {cv2.__version__} ships no cascades (OpenCV 5 dropped them); '
                        'install opencv-python-headless<5')
                raise LoadError(f'model for role {spec.role!r} not found: no cascade {path.name} '
                                f'in {path.parent} ({hint})')
            raise LoadError(f'model for role {spec.role!r} not found: no cascade file {path}')
        size = path.stat().st_size
        if size == 0:
            raise LoadError(f'model for role {spec.role!r}: cascade file {path} is empty')
        return WeightInfo(directory=path.parent, files=(path,), file_bytes=size,
                          estimated_bytes=size + WORKING_BYTES)

    def load(self, spec: ModelSpec, info: WeightInfo, report: Callable[[LoadProgress], None],
             should_stop: Optional[StopFn]) -> Tuple[Any, Any]:
        path = info.files[0]
        report(LoadProgress(spec.role, 'weights', 0.0, 0, info.file_bytes, 0, 1))
        try:
            classifier = cv2.CascadeClassifier(str(path))
        except (cv2.error, SystemError) as exc:   # a parse error (SystemError wraps it)
            lines = str(exc.__cause__ or exc).strip().splitlines() or ['parse error']
            raise LoadError(f'model for role {spec.role!r}: {path} is not a cascade OpenCV can '
                            f'load ({lines[-1]})') from exc
        if classifier.empty():
            raise LoadError(f'model for role {spec.role!r}: {path} is not a cascade OpenCV can '
                            'load (corrupt or another XML)')
        report(LoadProgress(spec.role, 'done', 1.0, info.file_bytes, info.file_bytes, 1, 1))
        return classifier, None

    def tensor_bytes(self, model: Any) -> int:
        return 0   # no tensors: the pool measures the process RSS

    def run(self, loaded: LoadedModel, request: InferRequest,
            should_stop: Optional[StopFn]) -> InferOutput:
        if request.task != TASK_DETECT:
            raise ModelError(f'role {loaded.spec.role!r} (vision) cannot serve task '
                             f'{request.task!r}; it serves {TASK_DETECT!r}')
        if request.image is None:
            raise MediaError('detect needs an image')
        rgb = check_rgb(request.image)
        t0 = time.perf_counter()
        faces = detect_faces(loaded.model, rgb)
        height, width = rgb.shape[:2]
        light = image_brightness(rgb)
        text = describe_scene(faces, light, None, width, height)
        extra: Dict[str, Any] = {'faces': len(faces), 'brightness': round(light, 3),
                                 'width': width, 'height': height}
        return InferOutput(text=text, detections=faces, run_s=time.perf_counter() - t0,
                           extra=extra)


def detect_faces(classifier: Any, rgb: np.ndarray) -> List[Detection]:
    """Faces in an RGB frame, largest first."""
    g = cv2.equalizeHist(grey(rgb))
    side = max(MIN_FACE_PX, int(round(min(g.shape) * MIN_FACE_FRACTION)))
    rects, _levels, weights = classifier.detectMultiScale3(
        g, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS, minSize=(side, side),
        outputRejectLevels=True)
    found = [Detection('face', _score(w), int(x), int(y), int(bw), int(bh))
             for (x, y, bw, bh), w in zip(np.asarray(rects).reshape(-1, 4),
                                          np.asarray(weights).reshape(-1))]
    return sorted(found, key=lambda d: d.width * d.height, reverse=True)


# describe_scene thresholds.
DARK, DIM, BRIGHT = 0.2, 0.4, 0.7        # mean luminance bounds: dark < DIM ... BRIGHT < bright
MOVING = 0.02                           # motion fraction from which "something is moving"
MUCH_MOVING = 0.25                      # ... "much of the view is changing"
CLOSE = 0.4                             # a box this tall (fraction of the frame) is "close"
_NUMBERS = ('no', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten')


def _count(n: int, label: str) -> str:
    word = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
    noun = label if n == 1 else (label + 'es' if label.endswith(('s', 'sh', 'ch', 'x'))
                                 else label + 's')
    verb = 'is' if n == 1 else 'are'
    return f'{word} {noun} {verb} in view'


def _place(d: Detection, width: int, height: int) -> str:
    """Where a box is: left of centre / in the centre / right of centre (thirds of the width),
    and 'close' when it fills much of the frame's height."""
    cx = (d.x + d.width / 2.0) / max(1, width)
    where = 'left of centre' if cx < 1 / 3 else 'right of centre' if cx > 2 / 3 \
        else 'in the centre'
    if height and d.height / height >= CLOSE:
        where += ', close'
    return where


def describe_scene(detections: Sequence[Detection], brightness: float,
                   motion: Optional[float], width: int, height: int) -> str:
    """A short, factual description: what is in view (by label, with where when there is one of
    it), how lit the scene is, and whether something moves (left out when `motion` is None, as
    for a single photo). E.g. "One face is in view, left of centre; the scene is bright;
    something is moving." 'motion' detections only say where the movement is."""
    clauses: List[str] = []
    by_label: Dict[str, List[Detection]] = {}
    moving = [d for d in detections if d.label == 'motion']
    for d in detections:
        if d.label != 'motion':
            by_label.setdefault(d.label, []).append(d)
    if not by_label.get('face'):
        clauses.append('no face is in view')
    for label, found in by_label.items():
        clause = _count(len(found), label)
        if len(found) == 1:
            clause += ', ' + _place(found[0], width, height)
        clauses.append(clause)
    light = ('dark' if brightness < DARK else 'dim' if brightness < DIM else
             'bright' if brightness > BRIGHT else 'evenly lit')
    clauses.append(f'the scene is {light}')
    if motion is not None:
        if motion >= MUCH_MOVING:
            clause = 'much of the view is changing'
        elif motion >= MOVING:
            clause = 'something is moving'
        else:
            clause = 'nothing is moving'
        if motion >= MOVING and moving:
            clause += ' ' + _place(moving[0], width, height).split(',')[0]
        clauses.append(clause)
    text = '; '.join(clauses) + '.'
    return text[0].upper() + text[1:]
