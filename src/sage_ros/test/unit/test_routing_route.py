"""`sage route` without a subprocess: roles from parameters files, input lines, JSON records."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import List

import pytest
import yaml

from sage_ros.cli.route import RouteError, iter_prompts, roles_from_params, route_lines, run
from sage_ros.core.routing import Complexity, ComplexityRouter, RoleMap, load_prompts
from sage_ros.graph import PROFILES, params_path

from test_routing import HashedBagOfWords


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump(data))
    return path


def test_profiles_give_their_roles() -> None:
    assert roles_from_params(params_path(PROFILES['demo'])) == RoleMap('small', 'small', 'large')
    assert roles_from_params(params_path(PROFILES['sprout'])).complex == 'small'


def test_roles_from_every_spelling_of_the_node(tmp_path: Path) -> None:
    path = write(tmp_path, {
        '/**': {'ros__parameters': {'roles': {'simple': 'tiny'}}},
        '/sage/language_block': {'ros__parameters': {'roles.complex': 'huge'}},
        '/**/model_manager': {'ros__parameters': {'roles': ['small', 'large']}},
    })
    assert roles_from_params(path) == RoleMap(simple='tiny', moderate='small', complex='huge')
    assert roles_from_params(write(tmp_path, {'/**/kernel': {'ros__parameters': {}}})) == \
        RoleMap()  # no language block section: the node's defaults


@pytest.mark.parametrize('data, message', [
    ({'/**/language_block': {'ros__parameters': {'roles': {'hard': 'large'}}}},
     "unknown complexity 'hard'"),
    ({'/**/language_block': {'ros__parameters': {'roles': {'complex': 3}}}},
     'roles.complex must be a model role name'),
    ({'/**/language_block': {'ros__parameters': {'roles': ['small']}}},
     'roles must be a mapping'),
    (['not', 'a', 'mapping'], 'is not a mapping of node names'),
])
def test_bad_roles_are_one_clear_message(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(RouteError, match=message):
        roles_from_params(write(tmp_path, data))


def test_unreadable_parameters_files(tmp_path: Path) -> None:
    with pytest.raises(RouteError, match='parameters file not found'):
        roles_from_params(tmp_path / 'none.yaml')
    bad = tmp_path / 'bad.yaml'
    bad.write_text('a: [1, 2\n')
    with pytest.raises(RouteError, match=r'is not valid YAML \(line \d+\)'):
        roles_from_params(bad)


def test_prompts_skip_empty_lines_and_need_one() -> None:
    assert list(iter_prompts([], io.StringIO('hi\n\n  \n there \n'))) == ['hi', 'there']
    assert list(iter_prompts(['a', ' ', 'b'], io.StringIO('ignored\n'))) == ['a', 'b']
    with pytest.raises(RouteError, match='standard input has no non-empty lines'):
        list(iter_prompts([], io.StringIO('\n \n')))


def test_records_carry_complexity_role_and_scores() -> None:
    router = ComplexityRouter([p for p in load_prompts() if not p.held_out], HashedBagOfWords())
    roles = RoleMap('s', 'm', 'l')
    texts = ['hello', 'Why is the fan on?']
    for record, text in zip(route_lines(texts, roles, router), texts):
        assert list(record)[:5] == ['prompt', 'complexity', 'role', 'scores', 'method']
        complexity = router.classify(text)
        assert record['prompt'] == text and record['complexity'] == complexity.value
        assert record['role'] == roles.role_for(complexity) and record['method'] == 'router'
        assert sum(record['scores'].values()) == pytest.approx(1.0, abs=1e-3)
    [heuristic] = route_lines(['Why is the fan on?'], roles, None)
    assert (heuristic['complexity'], heuristic['role'], heuristic['scores']) == \
        (Complexity.COMPLEX.value, 'l', None)
    [explained] = route_lines(['hello'], roles, router, explain=True)
    assert {'nearest', 'features', 'neighbour_vote', 'exemplar_label'} <= set(explained)


def test_run_checks_inputs_before_loading_anything(tmp_path: Path) -> None:
    out = io.StringIO()
    with pytest.raises(RouteError, match='parameters file not found'):
        run(tmp_path / 'none.yaml', [], False, False, io.StringIO('hi\n'), out)
    with pytest.raises(RouteError, match='--explain needs the router'):
        run(params_path(PROFILES['demo']), [], True, True, io.StringIO('hi\n'), out)
    assert run(params_path(PROFILES['sprout']), [], True, False,
               io.StringIO('hello\n\nDesign a house.\n'), out) == 0
    lines: List[dict] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r['complexity'], r['role']) for r in lines] == [('simple', 'small'),
                                                              ('complex', 'small')]
