"""`sage route`: which complexity and model role each prompt would get, without generating.

Reads the roles from the language block's section of a parameters file, so the answer is the
one the running graph would give; needs no ROS graph and loads no language model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, TextIO

import yaml

from .. import names
from ..core.routing import Complexity, ComplexityRouter, DatasetError, RoleMap, estimate_complexity


SCORE_DIGITS = 4  # decimals of the printed scores: enough to compare, short enough to read


class RouteError(RuntimeError):
    """A user mistake or missing input for `sage route`; the message says what to fix."""


def _node_sections(params: Mapping[str, Any], node: str) -> Iterator[Mapping[str, Any]]:
    """The `ros__parameters` that apply to `node`, in file order: exact names, namespaced names
    (`/sage/language_block`) and the wildcards `/**` and `/**/<node>`."""
    for key, section in params.items():
        if not isinstance(section, Mapping):
            continue
        last = str(key).rstrip('/').rsplit('/', 1)[-1]
        if last in (node, '*', '**'):
            values = section.get('ros__parameters')
            if isinstance(values, Mapping):
                yield values


def roles_from_params(path: Path, node: str = names.LANGUAGE_BLOCK) -> RoleMap:
    """The RoleMap of the language block in a ROS parameters file (defaults where unset)."""
    try:
        params = yaml.safe_load(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise RouteError(f'parameters file not found: {path}') from None
    except OSError as exc:
        raise RouteError(f'cannot read parameters file {path}: {exc.strerror}') from None
    except yaml.YAMLError as exc:
        where = getattr(exc, 'problem_mark', None)
        line = f' (line {where.line + 1})' if where is not None else ''
        raise RouteError(f'parameters file {path} is not valid YAML{line}') from None
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise RouteError(f'parameters file {path} is not a mapping of node names')
    roles: Dict[str, str] = {}
    for values in _node_sections(params, node):
        nested = values.get('roles', {})
        if not isinstance(nested, Mapping):
            raise RouteError(f'{path}: {node} roles must be a mapping of complexity to role, '
                             f'got {nested!r}')
        flat = {k[len('roles.'):]: v for k, v in values.items() if str(k).startswith('roles.')}
        roles.update({str(k): v for k, v in {**nested, **flat}.items()})
    unknown = sorted(set(roles) - {c.value for c in Complexity})
    if unknown:
        raise RouteError(f'{path}: unknown complexity {unknown[0]!r} in {node} roles '
                         f'(expected {", ".join(c.value for c in Complexity)})')
    bad = {k: v for k, v in roles.items() if not isinstance(v, str) or not v.strip()}
    if bad:
        key, value = next(iter(bad.items()))
        raise RouteError(f'{path}: {node} roles.{key} must be a model role name, got {value!r}')
    return RoleMap(**roles)


def iter_prompts(prompts: List[str], stream: TextIO) -> Iterator[str]:
    """Prompts from the command line, else the non-empty lines of `stream` as they arrive (so
    `sage route` answers interactively); an input without any is a user mistake."""
    found = 0
    for line in prompts if prompts else stream:
        text = line.strip()
        if text:
            found += 1
            yield text
    if not found:
        raise RouteError('no input: ' + ('the prompts are empty' if prompts else
                                         'standard input has no non-empty lines'))


def route_lines(prompts: Iterable[str], roles: RoleMap,
                router: Optional[ComplexityRouter],
                heuristic: Callable[[str], Complexity] = estimate_complexity,
                explain: bool = False) -> Iterator[Dict[str, Any]]:
    """One JSON-ready record per prompt; `router=None` routes with the keyword heuristic (which
    has no scores, so `scores` is null)."""
    for prompt in prompts:
        if router is None:
            complexity = heuristic(prompt)
            yield {'prompt': prompt, 'complexity': complexity.value,
                   'role': roles.role_for(complexity), 'scores': None,
                   'method': 'keyword_heuristic'}
            continue
        details = router.explain(prompt)
        complexity = Complexity(details['complexity'])
        record: Dict[str, Any] = {
            'prompt': prompt, 'complexity': complexity.value, 'role': roles.role_for(complexity),
            'scores': {k: round(v, SCORE_DIGITS) for k, v in details['scores'].items()},
            'method': 'router'}
        if explain:
            record.update({k: v for k, v in details.items() if k not in record})
        yield record


def run(params_file: Path, prompts: List[str], heuristic: bool, explain: bool,
        stream: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """`sage route`: check the inputs first (cheap), then load the router and print JSON lines."""
    if heuristic and explain:
        raise RouteError('--explain needs the router; drop --heuristic')
    roles = roles_from_params(params_file)
    router = None
    if not heuristic:
        # stdout is JSON lines; keep stderr free of the model loader's progress bar too
        os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
        from ..core.embeddings import EmbeddingError
        try:
            router = ComplexityRouter.from_dataset()
        except (DatasetError, EmbeddingError) as exc:
            raise RouteError(f'cannot build the router: {exc}') from None
    for record in route_lines(iter_prompts(prompts, stream), roles, router, explain=explain):
        out.write(json.dumps(record, ensure_ascii=False) + '\n')
        out.flush()
    return 0
