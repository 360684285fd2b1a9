"""The shipped labelled prompts: big enough, balanced, clean, and a fixed held-out split."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from sage_ros.core.routing import (CLASSES, DATA_FILE, DatasetError, is_held_out, load_prompts,
                                   split_prompts)


def test_the_set_is_large_balanced_and_clean() -> None:
    prompts = load_prompts()
    assert len(prompts) >= 300
    counts = Counter(p.label for p in prompts)
    assert set(counts) == set(CLASSES)
    assert all(n >= 0.25 * len(prompts) for n in counts.values()), counts
    normalised = [' '.join(re.findall(r"[a-z0-9']+", p.text.lower())) for p in prompts]
    duplicates = [t for t, n in Counter(normalised).items() if n > 1]
    assert not duplicates
    assert all(p.text == p.text.strip() and '\t' not in p.text for p in prompts)


def test_the_file_documents_its_labels_and_split() -> None:
    header = [line for line in DATA_FILE.read_text().splitlines() if line.startswith('#')]
    text = '\n'.join(header)
    assert all(c.value in text for c in CLASSES) and 'sha256' in text and 'Held-out' in text


def test_the_held_out_split_is_fixed_and_covers_every_class() -> None:
    prompts = load_prompts()
    training, held_out = split_prompts(prompts)
    assert len(training) + len(held_out) == len(prompts)
    assert all(p.held_out == is_held_out(p.text) for p in prompts)
    assert 0.15 <= len(held_out) / len(prompts) <= 0.35
    per_class = Counter(p.label for p in held_out)
    assert all(per_class[c] >= 20 for c in CLASSES), per_class
    # fixed by the text alone: the same prompts whatever the order of the file
    assert [p.text for p in split_prompts(prompts[::-1])[1]] == [p.text for p in held_out][::-1]


def test_malformed_files_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / 'bad.tsv'
    path.write_text('# comment\nsimple\thello\n\nhard\tprove the Riemann hypothesis\n')
    with pytest.raises(DatasetError, match=r"bad.tsv:4: unknown complexity 'hard'"):
        load_prompts(path)
    path.write_text('simple hello without a tab\n')
    with pytest.raises(DatasetError, match=r'bad.tsv:1: expected label<TAB>prompt'):
        load_prompts(path)
    with pytest.raises(DatasetError, match='cannot read labelled prompts'):
        load_prompts(tmp_path / 'missing.tsv')
