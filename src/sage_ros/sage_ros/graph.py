"""The one description of the SAGE graph: which nodes, executables and parameters files.

`launch/*.launch.py` and `sage up` both build the running graph from `PROFILES`, so the two can
never disagree about what a profile starts. Parameters come in layers: `config/base.yaml` holds
every parameter (documented, demo values) and each profile's overlay only what differs; ROS 2
stacks parameters files, a later one overriding an earlier one, so `params_files()` is the one
place that knows the order (base, profile overlay, then any file the user adds).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple, Union

import yaml

from . import names

PACKAGE = 'sage_ros'
BASE_PARAMS = 'base.yaml'   # under config/: every parameter, first in every stack

PathLike = Union[str, 'os.PathLike[str]']


@dataclass(frozen=True)
class NodeSpec:
    name: str          # node name (namespace comes from the profile or launch argument)
    executable: str    # `ros2 run sage_ros <executable>`, and `python -m <module>`
    module: str        # module holding the node class and its main()
    node_class: str
    lifecycle: bool = False


TEXT_SENSOR = NodeSpec(names.TEXT_SENSOR, 'text_sensor', 'sage_ros.nodes.text_sensor',
                       'TextSensorNode')
KERNEL = NodeSpec(names.KERNEL, 'kernel', 'sage_ros.nodes.kernel', 'KernelNode')
LANGUAGE_BLOCK = NodeSpec(names.LANGUAGE_BLOCK, 'language_block', 'sage_ros.nodes.language_block',
                          'LanguageBlockNode')
MODEL_MANAGER = NodeSpec(names.MODEL_MANAGER, 'model_manager', 'sage_ros.nodes.model_manager',
                         'ModelManagerNode', lifecycle=True)
REASONING_BLOCK = NodeSpec(names.REASONING_BLOCK, 'reasoning_block', 'sage_ros.nodes.reasoning_block',
                           'ReasoningBlockNode')
# Cheap (SQLite and the embeddings the kernel loads anyway): in every profile.
MEMORY_BLOCK = NodeSpec(names.MEMORY_BLOCK, 'memory_block', 'sage_ros.nodes.memory_block',
                        'MemoryBlockNode')
PERCEPTION_BLOCK = NodeSpec(names.PERCEPTION_BLOCK, 'perception_block',
                            'sage_ros.nodes.perception_block', 'PerceptionBlockNode')
MICROPHONE = NodeSpec(names.MICROPHONE, 'microphone', 'sage_ros.nodes.microphone',
                      'MicrophoneNode')
CAMERA = NodeSpec(names.CAMERA, 'camera', 'sage_ros.nodes.camera', 'CameraNode')


@dataclass(frozen=True)
class Profile:
    name: str
    params_file: str              # file name of the profile's overlay under config/
    nodes: Tuple[NodeSpec, ...]
    description: str


_ALL = (TEXT_SENSOR, MICROPHONE, CAMERA, KERNEL, LANGUAGE_BLOCK, REASONING_BLOCK, MEMORY_BLOCK,
        PERCEPTION_BLOCK, MODEL_MANAGER)
# Sprout has one 0.5B model and 8 GB shared memory: decomposing through the same small model
# gains little and the block's process costs memory, so the kernel answers in plain language.
_WITHOUT_REASONING = tuple(s for s in _ALL if s is not REASONING_BLOCK)

PROFILES: Dict[str, Profile] = {
    'thor': Profile('thor', 'thor.yaml', _ALL,
                    'Jetson AGX Thor: Qwen2.5-0.5B (small) and Qwen2.5-14B (large) on CUDA'),
    'sprout': Profile('sprout', 'sprout.yaml', _WITHOUT_REASONING,
                      'Jetson Orin Nano: Qwen2.5-0.5B only'),
    'demo': Profile('demo', 'demo.yaml', _ALL,
                    'any x86_64 machine, offline: SmolLM2-135M (small), Qwen2.5-Coder-0.5B (large)'),
}


def share_dir() -> Path:
    """The package's share directory: config/ and launch/ live there.

    A source checkout (editable install, `colcon build --symlink-install`) uses its own files;
    an installed package uses the ament index, as `ros2 launch` does.
    """
    source = Path(__file__).resolve().parents[1]
    if (source / 'package.xml').is_file() and (source / 'config').is_dir():
        return source
    try:
        from ament_index_python.packages import get_package_share_directory
        return Path(get_package_share_directory(PACKAGE))
    except (ImportError, LookupError, ValueError):
        pass
    installed = Path(sys.prefix) / 'share' / PACKAGE
    if (installed / 'config').is_dir():
        return installed
    raise FileNotFoundError(f'cannot find the {PACKAGE} share directory (config/, launch/)')


def config_dir() -> Path:
    return share_dir() / 'config'


def overlay_path(profile: Profile) -> Path:
    """The profile's own parameters file: only what differs from `base.yaml`."""
    return config_dir() / profile.params_file


def params_files(profile: Profile, extra: Iterable[PathLike] = ()) -> List[Path]:
    """The parameters files of a profile, in the order ROS applies them (later overrides).

    `extra` (e.g. `sage up --params-file X`) goes on top of the base and the profile's overlay.
    """
    return [config_dir() / BASE_PARAMS, overlay_path(profile),
            *(Path(p).expanduser() for p in extra)]


def _merge(into: Dict[str, Any], layer: Dict[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value   # scalars and lists replace, as a later ROS params file does


def load_params(files: Union[Profile, Sequence[PathLike]]) -> Dict[str, Any]:
    """The parameters a stack of files gives, merged into one dict (`{node key: {ros__parameters: ...}}`).

    Like ROS, a later file overrides an earlier one parameter by parameter; node keys merge when
    spelled the same (`/**/kernel` in base and overlay), which is how the overlays are written.
    """
    paths = params_files(files) if isinstance(files, Profile) else [Path(p) for p in files]
    merged: Dict[str, Any] = {}
    for path in paths:
        layer = yaml.safe_load(Path(path).expanduser().read_text(encoding='utf-8'))
        if layer is None:
            continue
        if not isinstance(layer, dict):
            raise ValueError(f'parameters file {path} is not a mapping of node names')
        _merge(merged, layer)
    return merged


def merged_params_file(profile: Profile, extra: Iterable[PathLike] = ()) -> Path:
    """One complete parameters file for the profile (base + overlay + `extra`, merged).

    For tools that take a single file; nodes get the stack itself (`params_files`). Written
    atomically under the temporary directory, so concurrent callers never read half a file.
    """
    text = yaml.safe_dump(load_params(params_files(profile, extra)), sort_keys=False)
    out_dir = Path(tempfile.gettempdir()) / f'sage_ros-params-{os.getuid()}'
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f'{profile.name}-{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml'
    if not path.is_file() or path.read_text(encoding='utf-8') != text:
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix='.yaml')
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def params_path(profile: Profile) -> Path:
    """Compatibility: the profile's complete parameters as one file (`merged_params_file`).

    New code passes `params_files(profile)` to nodes and reads `load_params(profile)`.
    """
    return merged_params_file(profile)


def ros_args(spec: NodeSpec, namespace: str,
             params_file: Union[PathLike, Sequence[PathLike]]) -> list[str]:
    """The `--ros-args` a node process gets, as `ros2 launch` would pass them (one
    `--params-file` per file of the stack, in order)."""
    files = [params_file] if isinstance(params_file, (str, os.PathLike)) else list(params_file)
    args = ['--ros-args', '-r', f'__node:={spec.name}', '-r', f'__ns:={namespace}']
    for f in files:
        args += ['--params-file', str(f)]
    return args
