"""The one description of the SAGE graph: which nodes, executables and parameters files.

`launch/*.launch.py` and `sage up` both build the running graph from `PROFILES`, so the two can
never disagree about what a profile starts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

from . import names

PACKAGE = 'sage_ros'


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


@dataclass(frozen=True)
class Profile:
    name: str
    params_file: str              # file name under config/
    nodes: Tuple[NodeSpec, ...]
    description: str


_ALL = (TEXT_SENSOR, KERNEL, LANGUAGE_BLOCK, REASONING_BLOCK, MODEL_MANAGER)
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


def params_path(profile: Profile) -> Path:
    return share_dir() / 'config' / profile.params_file


def ros_args(spec: NodeSpec, namespace: str, params_file: str | os.PathLike[str]) -> list[str]:
    """The `--ros-args` a node process gets, as `ros2 launch` would pass them."""
    return ['--ros-args', '-r', f'__node:={spec.name}', '-r', f'__ns:={namespace}',
            '--params-file', str(params_file)]
