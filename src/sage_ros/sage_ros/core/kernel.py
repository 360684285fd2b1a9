"""The kernel's decisions: validate, score, route to a block, budget, and account for results.

The node feeds observations in and turns the returned `Dispatch` or `Rejection` into goals and
messages; everything it decides is here, ROS-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

from .blocks import BlockDescriptor, BlockRegistry
from .energy import AtpLedger
from .salience import SalienceScore, SalienceScorer
from .text import InvalidText, sanitize

METABOLIC_WAKE = 'WAKE'


@dataclass(frozen=True)
class KernelConfig:
    max_input_chars: int = 4000
    atp_capacity: float = 100.0
    atp_recharge_per_s: float = 0.5
    atp_grant: float = 10.0          # reserved per dispatch; unused ATP returns on completion
    atp_min_dispatch: float = 1.0    # below this much available ATP nothing is dispatched
    atp_per_token: float = 0.05      # cost of one generated token
    trust_alpha: float = 0.1         # weight of one outcome in a block's trust
    initial_trust: float = 0.5


@dataclass(frozen=True)
class Dispatch:
    turn_id: int
    sensor_id: str
    text: str
    block: BlockDescriptor
    atp_grant: float
    received_at: float


@dataclass(frozen=True)
class Rejection:
    turn_id: int
    sensor_id: str
    text: str        # sanitised text, or '' when the text itself was invalid
    reason: str


@dataclass(frozen=True)
class KernelSnapshot:
    metabolic_state: str
    atp_level: float
    atp_capacity: float
    trust: Dict[str, float]
    active_dispatches: int
    observations_total: int
    dispatches_total: int
    rejected_total: int
    last_decision: str


@dataclass
class Kernel:
    """Decides what each observation deserves.

    Metabolic states are not modelled yet: the kernel stays in WAKE and says so in its state.
    """

    scorer: SalienceScorer
    config: KernelConfig = field(default_factory=KernelConfig)
    blocks: BlockRegistry = field(default_factory=BlockRegistry)

    def __post_init__(self) -> None:
        self.ledger = AtpLedger(capacity=self.config.atp_capacity,
                                recharge_per_s=self.config.atp_recharge_per_s,
                                level=self.config.atp_capacity)
        self.trust: Dict[str, float] = {}
        self.active: Dict[int, Dispatch] = {}
        self._next_turn = 1
        self.observations_total = 0
        self.dispatches_total = 0
        self.rejected_total = 0
        self.last_decision = 'no observation yet'

    def observe(self, sensor_id: str, raw: str, now: float
                ) -> Tuple[Optional[SalienceScore], Union[Dispatch, Rejection]]:
        """Score one observation and decide whether and where to dispatch it."""
        self.ledger.tick(now)
        turn = self._next_turn
        self._next_turn += 1
        self.observations_total += 1
        self.trust.setdefault(sensor_id, self.config.initial_trust)
        try:
            text = sanitize(raw, self.config.max_input_chars)
        except InvalidText as exc:
            return None, self._reject(turn, sensor_id, '', f'invalid input: {exc}')

        score = self.scorer.score(sensor_id, text)
        block = self.blocks.find('conversation', 'text', self.trust)
        if block is None:
            return score, self._reject(turn, sensor_id, text,
                                       'no loaded block offers conversation on text')
        if self.ledger.available < self.config.atp_min_dispatch:
            return score, self._reject(
                turn, sensor_id, text,
                f'ATP short: {self.ledger.available:.1f} available, '
                f'{self.config.atp_min_dispatch:.1f} needed')
        grant = self.ledger.reserve(self.config.atp_grant)
        dispatch = Dispatch(turn, sensor_id, text, block, grant, now)
        self.active[turn] = dispatch
        self.dispatches_total += 1
        self.last_decision = (f'turn {turn}: dispatched to {block.name} with {grant:.1f} ATP '
                              f'(salience {score.total:.2f})')
        return score, dispatch

    def complete(self, turn_id: int, success: bool, completion_tokens: int, now: float) -> float:
        """Settle a dispatch: charge the work done, update trust and reward; returns ATP charged."""
        dispatch = self.active.pop(turn_id, None)
        if dispatch is None:
            return 0.0
        self.ledger.tick(now)
        charged = self.ledger.settle(dispatch.atp_grant,
                                     completion_tokens * self.config.atp_per_token)
        t = self.trust.get(dispatch.block.name, self.config.initial_trust)
        self.trust[dispatch.block.name] = t + self.config.trust_alpha * ((1.0 if success else 0.0) - t)
        self.scorer.record_outcome(dispatch.sensor_id, success)
        self.last_decision = (f'turn {turn_id}: {dispatch.block.name} '
                              f'{"succeeded" if success else "failed"}, {charged:.2f} ATP charged')
        return charged

    def snapshot(self, now: float) -> KernelSnapshot:
        self.ledger.tick(now)
        return KernelSnapshot(METABOLIC_WAKE, self.ledger.level, self.ledger.capacity,
                              dict(self.trust), len(self.active), self.observations_total,
                              self.dispatches_total, self.rejected_total, self.last_decision)

    def _reject(self, turn: int, sensor_id: str, text: str, reason: str) -> Rejection:
        self.rejected_total += 1
        self.last_decision = f'turn {turn}: rejected ({reason})'
        return Rejection(turn, sensor_id, text, reason)
