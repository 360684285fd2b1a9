"""Text sensor node: lines from stdin, a file, or another topic, as typed observations.

Each line goes out on `observations/text` (TextObservation) with this sensor's own observation
id and source id, so the kernel scores it as this sensor's and answers with the same id; the
kernel still takes bare `std_msgs/String` on `text_in` from anyone else.

Reading stdin never blocks the node: lines are read on a thread, with `select`, so the node
spins, beats and stops while nobody types. Under `ros2 launch` stdin is a pipe that nobody writes
to; the sensor says so once, and what to use instead.
"""

from __future__ import annotations

import codecs
import errno
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from rclpy.node import Node
from sage_interfaces.msg import TextObservation
from std_msgs.msg import String

from .. import names
from .common import RELIABLE, ConfigError, declare, run_node
from .liveness import HeartbeatPublisher

SOURCES = ('stdin', 'file', 'topic')
QUIET_NOTICE_S = 5.0   # [s] stdin silent this long (and not a terminal): say how to talk to SAGE


class TextSensorNode(Node):
    """One text source, chosen by the `source` parameter, feeding `observations/text`."""

    def __init__(self, node_name: str = names.TEXT_SENSOR, **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        self.source: str = declare(self, 'source', 'stdin',
                                   f'Where text comes from: {", ".join(SOURCES)}', read_only=True)
        file_path: str = declare(self, 'file_path', '', 'Text file to read (source=file)',
                                 read_only=True)
        input_topic: str = declare(self, 'input_topic', 'text_source',
                                   'std_msgs/String topic to bridge (source=topic)',
                                   read_only=True)
        self.line_period_s: float = declare(self, 'line_period_s', 0.0,
                                            'Pause between lines read from stdin or a file [s]',
                                            read_only=True, min_value=0.0, max_value=3600.0)
        sensor_id: str = declare(self, 'sensor_id', '',
                                 'Source id of the observations (TextObservation.source); '
                                 "'' = 'text_sensor', or the bridged topic's name (source=topic)",
                                 read_only=True)
        if self.source not in SOURCES:
            raise ConfigError(f'parameter source={self.source!r}: expected one of {", ".join(SOURCES)}')
        self._heartbeat = HeartbeatPublisher(self)
        self._pub = self.create_publisher(TextObservation, names.OBSERVATIONS_TEXT, RELIABLE)
        self.published = 0
        self._stop = threading.Event()
        out = self.resolve_topic_name(names.OBSERVATIONS_TEXT)
        if self.source == 'topic':
            bridged = self.resolve_topic_name(input_topic)
            self.sensor_id = sensor_id or bridged
            self.create_subscription(String, input_topic, self._on_bridged, RELIABLE)
            self.get_logger().info(f'bridging {bridged} -> {out} (source {self.sensor_id!r})')
            return
        self.sensor_id = sensor_id or names.TEXT_SENSOR
        if self.source == 'file':
            path = Path(file_path).expanduser()
            if not path.is_file():
                raise ConfigError(f'parameter file_path={file_path!r}: no such file')
            lines: Iterator[str] = iter(path.read_text(errors='replace').splitlines())
            what = str(path)
        else:
            stdin = self._open_stdin()
            lines = self._stdin_lines(*stdin) if stdin is not None else iter(())
            what = 'stdin'
        self.get_logger().info(f'reading lines from {what} -> {out} (source {self.sensor_id!r})')
        threading.Thread(target=self._pump, args=(lines, what), daemon=True,
                         name='text-sensor-reader').start()

    def _on_bridged(self, msg: String) -> None:
        self.publish_text(msg.data)

    def publish_text(self, text: str) -> Optional[str]:
        """Publish one observation (empty lines are skipped); returns its observation id."""
        if not text.strip():
            return None
        self.published += 1
        oid = f'{self.sensor_id}/{self._heartbeat.instance_id}/{self.published}'
        msg = TextObservation(observation_id=oid, source=self.sensor_id, text=text)
        msg.header.stamp = self.get_clock().now().to_msg()
        self._pub.publish(msg)
        return oid

    def _how_to_talk(self) -> str:
        return (f'to talk to SAGE use `sage chat --attach`, or publish on '
                f'{self.resolve_topic_name(names.OBSERVATIONS_TEXT)} (sage_interfaces/'
                f'TextObservation) or {self.resolve_topic_name(names.TEXT_IN)} (std_msgs/String)')

    def _open_stdin(self) -> Optional[Tuple[int, bool]]:
        """Stdin's file descriptor and whether it is a terminal; None (said once) when there is
        none. Runs in `__init__`, on the main thread, where the signal handler can be set."""
        try:
            fd = sys.stdin.fileno() if sys.stdin is not None else -1
            os.fstat(fd)
        except (AttributeError, ValueError, OSError):
            self.get_logger().warning(f'no stdin to read (it is closed); {self._how_to_talk()}')
            return None
        terminal = os.isatty(fd)
        if terminal and threading.current_thread() is threading.main_thread():
            # A background job reading its terminal would be stopped (SIGTTIN), heartbeat and
            # all; ignored, the read fails with EIO instead and the sensor waits.
            signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        return fd, terminal

    def _stdin_lines(self, fd: int, terminal: bool) -> Iterator[str]:
        """Lines of stdin (`fd`), read without blocking the node: `select` with a timeout, so
        the reader notices `destroy_node`, and says once when nobody can type here."""
        decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
        buffered = ''
        quiet_since = time.monotonic()
        said_quiet = said_background = False
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([fd], [], [], 0.5)
            except (OSError, ValueError):
                return
            if not readable:
                if not terminal and not said_quiet and not self.published and \
                        time.monotonic() - quiet_since > QUIET_NOTICE_S:
                    said_quiet = True
                    self.get_logger().warning(
                        f'stdin is not a terminal and nothing arrived on it in '
                        f'{QUIET_NOTICE_S:.0f} s (under `ros2 launch` nobody writes to it); '
                        f'{self._how_to_talk()}')
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EAGAIN, errno.EINTR):
                    if not said_background:
                        said_background = True
                        self.get_logger().warning(
                            'stdin is a terminal this process cannot read now (running in the '
                            f'background?); waiting; {self._how_to_talk()}')
                    time.sleep(1.0)
                    continue
                return
            if not chunk:
                if buffered:
                    yield buffered
                return
            buffered += decoder.decode(chunk)
            *complete, buffered = buffered.split('\n')
            yield from complete

    def _pump(self, lines: Iterator[str], what: str) -> None:
        try:
            # Wait for a subscriber so the first lines are not lost to discovery.
            deadline = time.monotonic() + 10.0
            while self._pub.get_subscription_count() == 0 and time.monotonic() < deadline:
                if self._stop.wait(0.05):
                    return
            for line in lines:
                if self._stop.is_set():
                    return
                self.publish_text(line.rstrip('\r'))
                if self.line_period_s and self._stop.wait(self.line_period_s):
                    return
        except Exception as exc:  # the node is being destroyed under the reader
            if not self._stop.is_set():
                self.get_logger().error(f'reading {what} failed: {exc}')
            return
        if not self._stop.is_set():
            self.get_logger().info(f'end of {what}: {self.published} line(s) published')

    def destroy_node(self) -> None:
        self._stop.set()
        super().destroy_node()


def main(args: Optional[List[str]] = None) -> int:
    return run_node(TextSensorNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
