"""Build a `ros2 launch` description of a profile from `sage_ros.graph`.

Imported only by the launch files: `launch` and `launch_ros` come with a ROS install (or
`make ros2-tools`), not with the PyPI wheels the nodes need.

Every node gets `config/base.yaml` first, then the `params_file` launch argument (default: the
profile's overlay), so a robot's own file only has to say what differs. Every node is respawned
when it dies (`respawn`, `respawn_delay`). The model manager is a lifecycle node driven the ROS
way: launch turns its `autostart` off, asks it to configure as soon as its process starts (again
after each respawn: `ProcessStarted` is emitted per process start) and to activate once the
configure transition reaches `inactive`; a deactivate from `ros2 lifecycle set` is left alone.

The configure request is not launch_ros's `ChangeState` event: after a kill -9 the dead
process's `change_state` service stays in the ROS graph for a while, `wait_for_service` says
yes at once and the one request goes to nobody, so the respawned node would never be configured.
`_configure_when_up` asks `get_state` first, with a timeout, and retries until the new process
answers; then it configures an unconfigured node once.
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessStart
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.ros_adapters import get_ros_node
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState as ChangeStateSrv
from lifecycle_msgs.srv import GetState

from . import names
from .graph import BASE_PARAMS, PACKAGE, PROFILES, NodeSpec, config_dir, overlay_path

DEFAULT_RESPAWN_DELAY_S = 2.0
CALL_TIMEOUT_S = 3.0   # [s] a lifecycle service call that gets no answer is asked again


def _float_argument(context: LaunchContext, name: str) -> float:
    text = LaunchConfiguration(name).perform(context)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f'launch argument {name}:={text!r} is not a number') from None
    if value < 0.0:
        raise ValueError(f'launch argument {name}:={text!r} must be >= 0')
    return value


def _call(client: Any, request: Any, context: LaunchContext, timeout: float) -> Optional[Any]:
    """One service call; None when it got no answer within `timeout` (or launch shuts down)."""
    if not client.wait_for_service(timeout_sec=1.0):
        return None
    done = threading.Event()
    future = client.call_async(request)
    future.add_done_callback(lambda _: done.set())
    waited = 0.0
    while not done.wait(0.2):
        waited += 0.2
        if context.is_shutdown or waited >= timeout:
            future.cancel()
            return None
    return future.result() if future.exception() is None else None


def _configure_when_up(context: LaunchContext, fqn: str) -> None:
    """Configure the lifecycle node `fqn` once its (new) process answers; see the module doc."""
    ros = get_ros_node(context)
    get_state = ros.create_client(GetState, f'{fqn}/get_state')
    change_state = ros.create_client(ChangeStateSrv, f'{fqn}/change_state')
    log = ros.get_logger()
    try:
        while not context.is_shutdown:
            state = _call(get_state, GetState.Request(), context, CALL_TIMEOUT_S)
            if state is None:
                continue                      # not up yet, or the dead process's endpoint
            if state.current_state.id != State.PRIMARY_STATE_UNCONFIGURED:
                return                        # configured (or configuring) already
            request = ChangeStateSrv.Request()
            request.transition.id = Transition.TRANSITION_CONFIGURE
            # configure loads the default model: it may take long, but it is answered.
            result = _call(change_state, request, context, 600.0)
            if result is not None:
                if not result.success:
                    log.error(f'{fqn}: configure failed (see its log); '
                              f'`ros2 lifecycle set {fqn} configure` to try again')
                return
    finally:
        ros.destroy_client(get_state)
        ros.destroy_client(change_state)


def _configure_on_start(context: LaunchContext, node: LifecycleNode) -> None:
    fqn = node.node_name
    context.add_completion_future(
        context.asyncio_loop.run_in_executor(None, _configure_when_up, context, fqn))


def _lifecycle_driver(node: LifecycleNode) -> List[Any]:
    """Configure on every process start, activate when that configure has succeeded."""
    def change(transition_id: int) -> EmitEvent:
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                           transition_id=transition_id))
    return [
        RegisterEventHandler(OnProcessStart(
            target_action=node,
            on_start=[OpaqueFunction(function=_configure_on_start, args=[node])])),
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=node,
                                               start_state='configuring', goal_state='inactive',
                                               entities=[change(Transition.TRANSITION_ACTIVATE)])),
    ]


def _node_actions(spec: NodeSpec, respawn_delay: float) -> List[Any]:
    base = str(config_dir() / BASE_PARAMS)
    params: List[Any] = [base, LaunchConfiguration('params_file')]
    common = dict(package=PACKAGE, executable=spec.executable, name=spec.name,
                  namespace=LaunchConfiguration('namespace'), output='screen', emulate_tty=True,
                  respawn=LaunchConfiguration('respawn'), respawn_delay=respawn_delay)
    if not spec.lifecycle:
        return [Node(parameters=params, **common)]
    node = LifecycleNode(parameters=[*params, {'autostart': False}], **common)
    return [*_lifecycle_driver(node), node]   # handlers first: they must see the first start


def _nodes(context: LaunchContext, profile_name: str) -> List[Any]:
    delay = _float_argument(context, 'respawn_delay')
    actions: List[Any] = []
    for spec in PROFILES[profile_name].nodes:
        actions += _node_actions(spec, delay)
    return actions


def profile_launch_description(profile_name: str) -> LaunchDescription:
    profile = PROFILES[profile_name]
    return LaunchDescription([
        DeclareLaunchArgument('namespace', default_value=names.DEFAULT_NAMESPACE,
                              description='Namespace of every SAGE node, topic and action'),
        DeclareLaunchArgument('params_file', default_value=str(overlay_path(profile)),
                              description='ROS parameters on top of config/base.yaml (which '
                                          'every node gets first); default: the profile overlay'),
        DeclareLaunchArgument('respawn', default_value='true',
                              description='Start a node again when its process dies'),
        DeclareLaunchArgument('respawn_delay', default_value=str(DEFAULT_RESPAWN_DELAY_S),
                              description='[s] wait before a dead node is started again'),
        OpaqueFunction(function=_nodes, args=[profile_name]),
    ])
