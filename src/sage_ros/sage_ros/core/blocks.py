"""Capability blocks: the contract every block offers, and routing by capability."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Collection, Dict, Iterator, Optional, Tuple


class BlockType(str, enum.Enum):
    MONOLITHIC = 'monolithic'  # one model does everything
    MODULAR = 'modular'        # separate models per modality or sub-task
    HYBRID = 'hybrid'


@dataclass(frozen=True)
class BlockDescriptor:
    """What a block advertises so a router can choose it (mirrors BlockDescription.msg)."""

    name: str
    block_type: BlockType
    capabilities: Tuple[str, ...]
    modalities: Tuple[str, ...]
    action_name: str = ''
    action_type: str = ''
    loaded: bool = False
    memory_estimate_bytes: int = 0
    concurrency: int = 0     # goals it works on at once; the kernel sends no more (0: no limit)

    def serves(self, capability: str, modality: str) -> bool:
        return capability in self.capabilities and modality in self.modalities


class CapabilityBlock(ABC):
    """Base of every capability block (language, perception, memory, reasoning)."""

    name: str
    block_type: BlockType

    @property
    @abstractmethod
    def capabilities(self) -> Tuple[str, ...]:
        """What the block can do, e.g. ('conversation',)."""

    @property
    @abstractmethod
    def modalities(self) -> Tuple[str, ...]:
        """Inputs it accepts, e.g. ('text',)."""

    @abstractmethod
    def load(self) -> None:
        """Acquire models or resources; after it, `loaded` is True."""

    @abstractmethod
    def unload(self) -> None:
        """Release what `load` acquired."""

    @property
    @abstractmethod
    def loaded(self) -> bool: ...

    def supports(self, modality: str) -> bool:
        return modality in self.modalities

    def estimated_memory_bytes(self) -> int:
        """Memory the block itself needs when loaded (models served elsewhere do not count)."""
        return 0

    def describe(self, action_name: str = '', action_type: str = '') -> BlockDescriptor:
        return BlockDescriptor(name=self.name, block_type=self.block_type,
                               capabilities=tuple(self.capabilities),
                               modalities=tuple(self.modalities), action_name=action_name,
                               action_type=action_type, loaded=self.loaded,
                               memory_estimate_bytes=self.estimated_memory_bytes())


class BlockRegistry:
    """The blocks a router knows about, latest description per block name."""

    def __init__(self) -> None:
        self._blocks: Dict[str, BlockDescriptor] = {}

    def update(self, desc: BlockDescriptor) -> None:
        self._blocks[desc.name] = desc

    def remove(self, name: str) -> None:
        self._blocks.pop(name, None)

    def __iter__(self) -> Iterator[BlockDescriptor]:
        return iter(list(self._blocks.values()))

    def get(self, name: str) -> Optional[BlockDescriptor]:
        return self._blocks.get(name)

    def find(self, capability: str, modality: str, trust: Optional[Dict[str, float]] = None,
             exclude: Collection[str] = ()) -> Optional[BlockDescriptor]:
        """The loaded block that serves (capability, modality), most trusted first; blocks
        named in `exclude` (those with no free slot) are passed over."""
        trust = trust or {}
        candidates = [b for b in self._blocks.values() if b.loaded and b.name not in exclude
                      and b.serves(capability, modality)]
        if not candidates:
            return None
        return max(candidates, key=lambda b: (trust.get(b.name, 0.0), b.name))
