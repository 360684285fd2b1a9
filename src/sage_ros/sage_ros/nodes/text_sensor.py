"""Text sensor node: publishes lines from stdin, a file, or another topic to `text_in`."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Iterable, List, Optional

from rclpy.node import Node
from std_msgs.msg import String

from .. import names
from .common import RELIABLE, ConfigError, declare, run_node

SOURCES = ('stdin', 'file', 'topic')


class TextSensorNode(Node):
    """One text source, chosen by the `source` parameter, feeding `text_in`."""

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
        if self.source not in SOURCES:
            raise ConfigError(f'parameter source={self.source!r}: expected one of {", ".join(SOURCES)}')
        self._pub = self.create_publisher(String, names.TEXT_IN, RELIABLE)
        self.published = 0
        out = self.resolve_topic_name(names.TEXT_IN)
        if self.source == 'topic':
            self.create_subscription(String, input_topic, self._pub.publish, RELIABLE)
            self.get_logger().info(f'bridging {self.resolve_topic_name(input_topic)} -> {out}')
            return
        if self.source == 'file':
            path = Path(file_path).expanduser()
            if not path.is_file():
                raise ConfigError(f'parameter file_path={file_path!r}: no such file')
            lines: Iterable[str] = path.read_text(errors='replace').splitlines()
            what = str(path)
        else:
            lines = sys.stdin
            what = 'stdin'
        self.get_logger().info(f'reading lines from {what} -> {out}')
        threading.Thread(target=self._pump, args=(lines, what), daemon=True).start()

    def _pump(self, lines: Iterable[str], what: str) -> None:
        # Wait for a subscriber so the first lines are not lost to discovery.
        deadline = time.monotonic() + 10.0
        while self._pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        for line in lines:
            line = line.rstrip('\n')
            if not line.strip():
                continue
            self._pub.publish(String(data=line))
            self.published += 1
            if self.line_period_s:
                time.sleep(self.line_period_s)
        self.get_logger().info(f'end of {what}: {self.published} line(s) published')


def main(args: Optional[List[str]] = None) -> int:
    return run_node(TextSensorNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
