"""Every topic, action, service and node name of the SAGE graph, in one place.

Names are relative: they resolve under the graph's namespace (default `/sage`, set with
`sage up --namespace` or the `namespace` launch argument). The README lists them all.
"""

from __future__ import annotations

from typing import Tuple

DEFAULT_NAMESPACE = '/sage'

# Nodes
KERNEL = 'kernel'
TEXT_SENSOR = 'text_sensor'
LANGUAGE_BLOCK = 'language_block'
MODEL_MANAGER = 'model_manager'   # a lifecycle node
REASONING_BLOCK = 'reasoning_block'
MEMORY_BLOCK = 'memory_block'
PERCEPTION_BLOCK = 'perception_block'
MICROPHONE = 'microphone'
CAMERA = 'camera'

# Topics
TEXT_IN = 'text_in'                     # std_msgs/String, text observations (source 'text', ids by the kernel)
OBSERVATIONS_TEXT = 'observations/text'  # sage_interfaces/TextObservation: id and source by the sender
RESPONSE = 'response'                   # sage_interfaces/Response, what SAGE says
RESPONSE_STREAM = 'response/stream'     # sage_interfaces/ResponseChunk, answers while generated
SALIENCE = 'salience'                   # sage_interfaces/Salience, one per scored observation
STATE = 'state'                         # sage_interfaces/KernelState, transient-local
MODELS_STATUS = 'models/status'         # sage_interfaces/ModelStatus, transient-local
BLOCKS_DESCRIPTION = 'blocks/description'  # sage_interfaces/BlockDescription, transient-local
HEARTBEAT = 'heartbeat'                 # sage_interfaces/Heartbeat, every node, every heartbeat_period_s
MEMORY_STATUS = 'memory/status'         # sage_interfaces/MemoryStatus, transient-local
OBSERVATIONS_AUDIO = 'observations/audio'    # sage_interfaces/AudioObservation: utterances, by the microphone node
OBSERVATIONS_VISION = 'observations/vision'  # sage_interfaces/VisualObservation: per frame, by the camera node
AUDIO_LEVEL = 'audio/level'             # sage_interfaces/AudioLevel, sensor-data QoS
CAMERA_IMAGE = 'camera/image'           # sensor_msgs/Image, sensor-data QoS
CAMERA_IMAGE_COMPRESSED = 'camera/image/compressed'  # sensor_msgs/CompressedImage (optional), sensor-data QoS
PERCEPTS = 'percepts'                   # sage_interfaces/Percept: perception results, by the kernel

# Actions: one typed action per capability block, and the model manager's two.
BLOCK_LANGUAGE = 'blocks/language'
BLOCK_PERCEPTION = 'blocks/perception'
BLOCK_MEMORY = 'blocks/memory'
BLOCK_REASONING = 'blocks/reasoning'
MODEL_GENERATE = 'model_manager/generate'
MODEL_SWAP = 'model_manager/swap'
MODEL_INFER = 'model_manager/infer'     # speech, vision, omni and embedding entries

# Services
LANGUAGE_RESET = 'blocks/language/reset'
SESSION_END = 'session/end'             # sage_interfaces/EndSession, served by the kernel
KERNEL_SLEEP = 'kernel/sleep'           # sage_interfaces/Sleep: enter DREAM now, served by the kernel
MICROPHONE_PLAY = 'microphone/play'     # sage_interfaces/PlayMedia: play a WAV through the microphone node
CAMERA_PLAY = 'camera/play'             # sage_interfaces/PlayMedia: play an image or video through the camera node

# The public contract, (kind, relative name, type), checked by the graph test.
CONTRACT: Tuple[Tuple[str, str, str], ...] = (
    ('topic', TEXT_IN, 'std_msgs/msg/String'),
    ('topic', OBSERVATIONS_TEXT, 'sage_interfaces/msg/TextObservation'),
    ('topic', RESPONSE, 'sage_interfaces/msg/Response'),
    ('topic', RESPONSE_STREAM, 'sage_interfaces/msg/ResponseChunk'),
    ('topic', SALIENCE, 'sage_interfaces/msg/Salience'),
    ('topic', STATE, 'sage_interfaces/msg/KernelState'),
    ('topic', MODELS_STATUS, 'sage_interfaces/msg/ModelStatus'),
    ('topic', BLOCKS_DESCRIPTION, 'sage_interfaces/msg/BlockDescription'),
    ('topic', HEARTBEAT, 'sage_interfaces/msg/Heartbeat'),
    ('topic', MEMORY_STATUS, 'sage_interfaces/msg/MemoryStatus'),
    ('topic', OBSERVATIONS_AUDIO, 'sage_interfaces/msg/AudioObservation'),
    ('topic', OBSERVATIONS_VISION, 'sage_interfaces/msg/VisualObservation'),
    ('topic', AUDIO_LEVEL, 'sage_interfaces/msg/AudioLevel'),
    ('topic', CAMERA_IMAGE, 'sensor_msgs/msg/Image'),
    ('topic', PERCEPTS, 'sage_interfaces/msg/Percept'),
    ('action', BLOCK_LANGUAGE, 'sage_interfaces/action/Language'),
    ('action', BLOCK_PERCEPTION, 'sage_interfaces/action/Perception'),
    ('action', BLOCK_MEMORY, 'sage_interfaces/action/Memory'),
    ('action', BLOCK_REASONING, 'sage_interfaces/action/Reasoning'),
    ('action', MODEL_GENERATE, 'sage_interfaces/action/Generate'),
    ('action', MODEL_SWAP, 'sage_interfaces/action/SwapModel'),
    ('action', MODEL_INFER, 'sage_interfaces/action/Infer'),
    ('service', LANGUAGE_RESET, 'sage_interfaces/srv/ResetConversation'),
    ('service', SESSION_END, 'sage_interfaces/srv/EndSession'),
    ('service', KERNEL_SLEEP, 'sage_interfaces/srv/Sleep'),
    ('service', MICROPHONE_PLAY, 'sage_interfaces/srv/PlayMedia'),
    ('service', CAMERA_PLAY, 'sage_interfaces/srv/PlayMedia'),
)


def qualify(name: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """`'text_in', '/sage'` -> `'/sage/text_in'`."""
    ns = '/' + namespace.strip('/')
    return f'{ns.rstrip("/")}/{name}' if ns != '/' else f'/{name}'
