"""The convention every cognition-engine constant follows: a dataclass field whose metadata
carries its documentation, unit, valid range and whether it may change while the kernel runs.
The kernel node declares one ROS parameter per such field, so a constant cannot be added without
becoming a documented, range-checked parameter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, List, Optional


def tunable(default: Any, doc: str, lo: Optional[float] = None, hi: Optional[float] = None, *,
            unit: str = '', runtime: bool = True, param: str = '') -> Any:
    """A dataclass field that is also a documented parameter.

    `lo`/`hi` bound numbers (inclusive); `runtime=False` marks values that only take effect at
    start-up (memory sizes, capacities), which the node declares read-only; `param` is the
    parameter's name when it is not the field's (e.g. 'atp.per_step' for `atp_per_step`).
    """
    return dataclasses.field(default=default, metadata={
        'doc': doc, 'lo': lo, 'hi': hi, 'unit': unit, 'runtime': runtime, 'param': param})


@dataclass(frozen=True)
class ParamDoc:
    name: str
    default: Any
    doc: str
    lo: Optional[float]
    hi: Optional[float]
    unit: str
    runtime: bool
    param: str     # the parameter's name (the field's name unless the field says otherwise)


def param_docs(cls_or_obj: Any) -> List[ParamDoc]:
    """The tunable fields of a dataclass (or instance: its current values are the defaults)."""
    out = []
    for f in dataclasses.fields(cls_or_obj):
        if 'doc' not in f.metadata:
            continue
        if isinstance(cls_or_obj, type):
            default = f.default if f.default is not dataclasses.MISSING else None
        else:
            default = getattr(cls_or_obj, f.name)
        m = f.metadata
        out.append(ParamDoc(f.name, default, m['doc'], m['lo'], m['hi'], m['unit'],
                            m['runtime'], m.get('param') or f.name))
    return out


def check_ranges(obj: Any) -> None:
    """Raise ValueError naming the first tunable field outside its range (or not finite)."""
    for p in param_docs(obj):
        v = getattr(obj, p.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f'{p.name} must be finite, got {v}')
        if p.lo is not None and v < p.lo:
            raise ValueError(f'{p.name} = {v} is below its minimum {p.lo}')
        if p.hi is not None and v > p.hi:
            raise ValueError(f'{p.name} = {v} is above its maximum {p.hi}')
