"""Optional sleep training: a LoRA adapter for the small model, trained from the dream bundles.

Off by default. The prototype's LoRA sessions collapsed (75 % identical replies), so every
training is gated by the lessons it paid for: a repetition filter (answers that repeat their
own n-grams or are near-identical to another answer are dropped, and a bundle set whose answers
are mostly repetitive is refused as a collapse), a minimum of data (total and new), and spacing
between trainings. The loss of each example is weighted by its salience and counts only the
answer's tokens, with the prompt rendered by the model's own chat template.

Adapters live in `<state_dir>/adapters/<model-name>/<UTC timestamp>/` (peft `save_pretrained`,
written to a temporary directory and renamed), and `<model-name>/current.json` names the
current one, with when it was trained and from which bundles (spacing and "new data" are read
from it). The model manager applies it after loading a role whose entry says `adapter: latest`
(`apply_adapter`): merged into the weights, so generation speed is unchanged; a missing or
corrupt adapter gives the base model and a warning, never a failed load.

torch, transformers and peft are imported only when a training or an adapter load runs.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..loading import PRETRAINED_LOAD_LOCK, from_transformers
from ..params import check_ranges, tunable
from ..store import state_dir as default_state_dir

ADAPTERS_DIR = 'adapters'
CURRENT_FILE = 'current.json'
REPORT_FILE = 'sleep_training.json'   # beside the adapter's files: how it was trained
LATEST = 'latest'
NONE_VALUES = frozenset({'', 'none'})

StopFn = Callable[[], bool]
ProgressFn = Callable[[str, float], None]   # (stage, fraction in [0, 1])

_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class SleepTrainingParams:
    """Every constant of sleep training; the memory block declares them as `sleep_training.*`."""

    enabled: bool = tunable(False, 'Train a LoRA adapter for the small model after a completed '
                            'dream', param='sleep_training.enabled')
    model_path: str = tunable('offline:smollm2-135m-instruct',
                              'Model trained (the same string as models.small.path: adapters '
                              'are keyed by it)', param='sleep_training.model_path')
    rank: int = tunable(4, 'LoRA rank', 1, 256, param='sleep_training.rank')
    alpha: int = tunable(8, 'LoRA alpha (the update is scaled by alpha / rank)', 1, 4096,
                         param='sleep_training.alpha')
    dropout: float = tunable(0.05, 'LoRA dropout', 0.0, 0.9, param='sleep_training.dropout')
    target_modules: str = tunable('q_proj,v_proj', 'Comma-separated module names adapted; '
                                  '"all-linear" = every linear layer but the output head',
                                  param='sleep_training.target_modules')
    lr: float = tunable(1e-4, 'AdamW learning rate', 1e-7, 1.0, param='sleep_training.lr')
    epochs: int = tunable(3, 'Passes over the selected examples', 1, 100,
                          param='sleep_training.epochs')
    max_steps: int = tunable(300, 'Cap on optimizer steps (one example each; 0 = no cap)', 0,
                             1_000_000, param='sleep_training.max_steps')
    min_examples: int = tunable(30, 'Fewer usable examples in all bundles: no training', 1,
                                1_000_000, param='sleep_training.min_examples')
    min_new_examples: int = tunable(10, 'Fewer usable examples from bundles not trained on '
                                    'before: no training', 0, 1_000_000,
                                    param='sleep_training.min_new_examples')
    max_examples: int = tunable(200, 'Most examples trained on (highest salience first)', 1,
                                1_000_000, param='sleep_training.max_examples')
    min_interval_s: float = tunable(43200.0, 'Spacing: no training within this time of the '
                                    'last one', 0.0, 1e9, unit='s',
                                    param='sleep_training.min_interval_s')
    min_salience: float = tunable(0.0, 'Examples below this salience are not used', 0.0, 1.0,
                                  param='sleep_training.min_salience')
    max_answer_chars: int = tunable(1000, 'Longer answers are not used', 1, 1_000_000,
                                    unit='characters', param='sleep_training.max_answer_chars')
    max_seq_tokens: int = tunable(512, 'Longer prompt + answer sequences are not used', 8,
                                  1_000_000, unit='tokens', param='sleep_training.max_seq_tokens')
    ngram: int = tunable(3, 'Word n-gram size of the repetition filter', 1, 16,
                         param='sleep_training.ngram')
    max_ngram_repeat: float = tunable(0.3, 'An answer whose share of repeated n-grams exceeds '
                                      'this is repetitive', 0.0, 1.0,
                                      param='sleep_training.max_ngram_repeat')
    max_jaccard: float = tunable(0.85, 'An answer whose word-set Jaccard overlap with a kept '
                                 'answer reaches this is a duplicate', 0.0, 1.0,
                                 param='sleep_training.max_jaccard')
    max_repetition_ratio: float = tunable(0.5, 'Share of repetitive or duplicate answers above '
                                          'which the data is taken for a collapse: no training',
                                          0.0, 1.0, param='sleep_training.max_repetition_ratio')
    salience_weighting: bool = tunable(True, 'Weight each example\'s loss by its salience',
                                       param='sleep_training.salience_weighting')
    min_weight: float = tunable(0.1, 'Floor of an example\'s salience weight', 0.0, 1.0,
                                param='sleep_training.min_weight')
    threads: int = tunable(1, 'torch threads while training (process-wide, restored after: '
                           'in a one-process graph generation shares it; 0 = leave torch\'s '
                           'setting)', 0, 256, param='sleep_training.threads')
    duty_cycle: float = tunable(0.5, 'Share of the time spent computing: the worker sleeps '
                                'between steps to stay under it', 0.01, 1.0,
                                param='sleep_training.duty_cycle')
    device: str = tunable('cpu', 'torch device of the training (cpu, cuda, cuda:N)',
                          param='sleep_training.device')
    keep_adapters: int = tunable(3, 'Adapters kept per model (older ones are deleted)', 1, 1000,
                                 param='sleep_training.keep_adapters')
    seed: int = tunable(0, 'Seed of the example order and the LoRA initialisation', 0,
                        2 ** 31 - 1, param='sleep_training.seed')

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.model_path.strip():
            raise ValueError('model_path must not be empty')
        if not [m for m in self.target_modules.split(',') if m.strip()]:
            raise ValueError('target_modules must name at least one module')


@dataclass(frozen=True)
class Example:
    """One exchange to learn from: the user's text, the answer, and its loss weight."""

    prompt: str
    answer: str
    salience: float
    weight: float = 1.0
    bundle: str = ''       # file name of the bundle it came from
    session: int = 0
    turn_id: int = 0


@dataclass(frozen=True)
class Selection:
    """What `select_examples` kept, how many records each filter dropped, and, when the data as
    a whole must not be trained on (too few, collapsed), why ('' = train)."""

    examples: List[Example]
    dropped: Dict[str, int]
    skipped: str = ''


@dataclass
class TrainReport:
    """What a training did, or why it did not run."""

    trained: bool = False
    skipped: str = ''            # why nothing was trained ('' if trained or interrupted)
    interrupted: bool = False    # should_stop ended it: nothing was saved
    adapter_dir: str = ''        # the saved adapter ('' if none)
    model_name: str = ''
    examples: int = 0
    steps: int = 0
    losses: List[float] = field(default_factory=list)   # per step, the answer tokens' mean CE
    dropped: Dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0

    def mean_loss(self, first: bool, n: int) -> float:
        """Mean loss over the first or last `n` steps (nan without steps)."""
        part = self.losses[:n] if first else self.losses[-n:]
        return sum(part) / len(part) if part else float('nan')

    def describe(self) -> str:
        """One line for the log."""
        if self.interrupted:
            return (f'sleep training of {self.model_name} interrupted after {self.steps} steps: '
                    'nothing saved')
        if not self.trained:
            return f'sleep training skipped: {self.skipped}'
        k = max(1, min(10, len(self.losses) // 4))
        return (f'sleep training of {self.model_name}: {self.examples} examples, {self.steps} '
                f'steps in {self.duration_s:.1f} s, loss {self.mean_loss(True, k):.3f} -> '
                f'{self.mean_loss(False, k):.3f}; adapter {self.adapter_dir}')


# ---- adapter locations ---------------------------------------------------------------------
def model_name(model_path: str) -> str:
    """The directory name adapters of a model are kept under: the model directory's name
    (`offline:NAME` -> NAME, a hub cache snapshot -> its repository), or a hub id with '/'
    replaced; the same for every spelling of one model."""
    text = model_path.strip()
    if text.startswith('offline:'):
        name = text[len('offline:'):]
    else:
        path = Path(os.path.expandvars(os.path.expanduser(text)))
        if path.is_dir() or text.startswith(('/', '.', '~')):
            parts = path.resolve().parts if path.exists() else path.parts
            if len(parts) >= 3 and parts[-2] == 'snapshots' and parts[-3].startswith('models--'):
                name = parts[-3][len('models--'):]
            else:
                name = parts[-1] if parts else text
        else:
            name = text.replace('/', '--')
    name = re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('._')
    return name or 'model'


def adapters_root(model_path: str, state: Optional[Path] = None) -> Path:
    return (state if state is not None else default_state_dir()) / ADAPTERS_DIR / \
        model_name(model_path)


def read_current(model_path: str, state: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """The current adapter's record ({adapter, trained_at, examples, bundles, ...}), or None
    when none was trained or the pointer is unreadable."""
    try:
        data = json.loads((adapters_root(model_path, state) / CURRENT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get('adapter'), str) else None


def resolve_adapter(setting: str, model_path: str, state: Optional[Path] = None
                    ) -> Tuple[Optional[Path], str]:
    """A model entry's `adapter` setting -> (adapter directory or None, note). '' / 'none' =
    none; 'latest' = the current sleep-trained adapter of the model (none yet: no note); else
    a path. The note says why a configured adapter cannot be used ('' = fine)."""
    value = setting.strip()
    if value.lower() in NONE_VALUES:
        return None, ''
    if value.lower() == LATEST:
        root = adapters_root(model_path, state)
        if not (root / CURRENT_FILE).exists():
            return None, ''
        current = read_current(model_path, state)
        if current is None:
            return None, f'adapter pointer {root / CURRENT_FILE} is unreadable'
        path = root / str(current['adapter'])
    else:
        path = Path(os.path.expandvars(os.path.expanduser(value)))
    if not path.is_dir():
        return None, f'adapter {path} does not exist'
    return path, ''


def _check_adapter_files(path: Path) -> None:
    """Raise ValueError unless `path` holds a readable LoRA config and intact weights."""
    try:
        config = json.loads((path / 'adapter_config.json').read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f'adapter_config.json unreadable: {exc}') from None
    if not isinstance(config, dict) or 'peft_type' not in config:
        raise ValueError('adapter_config.json is not a peft adapter config')
    weights = path / 'adapter_model.safetensors'
    if not weights.is_file():
        raise ValueError('adapter_model.safetensors missing')
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework='pt') as fh:
            for key in fh.keys():
                fh.get_tensor(key)   # reads every tensor: a truncated file fails here
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ValueError(f'adapter weights unreadable: {str(exc).splitlines()[0]}') from None


def apply_adapter(model: Any, path: Path, reload_base: Callable[[], Any]) -> Tuple[Any, str]:
    """Merge the LoRA adapter at `path` into `model` (generation speed unchanged). Returns
    (model, warning): the merged model and '' on success, else the base model and why. A failure
    after peft started to change the model (a shape mismatch) gets a fresh base model from
    `reload_base`, so no half-applied adapter is ever served."""
    try:
        _check_adapter_files(path)
        import peft  # noqa: F401  (import error -> warning below)
    except ImportError:
        return model, f'adapter {path} not applied: peft is not installed'
    except ValueError as exc:
        return model, f'adapter {path} not applied: {exc}'
    from peft import PeftModel
    try:
        with PRETRAINED_LOAD_LOCK:
            wrapped = PeftModel.from_pretrained(model, str(path), is_trainable=False)
            merged = wrapped.merge_and_unload()
        merged.eval()
        return merged, ''
    except Exception as exc:  # peft raises many types for an adapter that does not fit
        # The caller still holds the half-adapted model: two copies live until it drops it.
        return reload_base(), (f'adapter {path} not applied: '
                               f'{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}')


# ---- selection -----------------------------------------------------------------------------
def _words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def ngram_repeat(text: str, n: int) -> float:
    """Share of the answer's word n-grams that repeat an earlier one (0 = none repeats)."""
    words = _words(text)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def jaccard(a: str, b: str) -> float:
    """Overlap of two texts' word sets (1 = the same words)."""
    sa, sb = set(_words(a)), set(_words(b))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def read_bundle(path: Path) -> Tuple[List[Dict[str, Any]], int]:
    """The exchange records of one JSONL bundle and the number of unreadable lines (header
    records, with a `_type`, are neither)."""
    records, bad = [], 0
    try:
        lines = path.read_text(encoding='utf-8', errors='replace').splitlines()
    except OSError:
        return [], 1
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(rec, dict):
            bad += 1
        elif '_type' not in rec:
            records.append(rec)
    return records, bad


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def select_examples(bundle_paths: Sequence[Path], params: SleepTrainingParams,
                    new_bundles: Optional[Sequence[str]] = None) -> Selection:
    """The examples worth training on, from dream bundles. Drops, counted by reason: unreadable
    lines, empty prompts or answers, low salience, too long answers, answers that repeat their
    own n-grams ('repetitive'), answers near-identical to a more salient kept one
    ('duplicate'). Refuses the whole set (`skipped`) when repetitive + duplicate answers exceed
    `max_repetition_ratio` (a collapsed model's output must not be trained back into it), or
    when fewer than `min_examples` remain, or fewer than `min_new_examples` come from
    `new_bundles` (file names; None = every bundle is new). Keeps at most `max_examples`,
    highest salience first; weights are salience (floored), normalised to a mean of 1."""
    dropped: Dict[str, int] = {}

    def drop(reason: str, n: int = 1) -> None:
        if n:
            dropped[reason] = dropped.get(reason, 0) + n

    candidates: List[Example] = []
    for path in sorted(bundle_paths):
        records, bad = read_bundle(Path(path))
        drop('unreadable', bad)
        for rec in records:
            prompt, answer = rec.get('prompt'), rec.get('answer')
            if not isinstance(prompt, str) or not isinstance(answer, str) \
                    or not prompt.strip() or not answer.strip():
                drop('empty')
                continue
            try:
                salience = min(1.0, max(0.0, float(rec.get('salience', 0.0))))
                session, turn_id = int(rec.get('session', 0)), int(rec.get('turn_id', 0))
            except (TypeError, ValueError):
                drop('unreadable')
                continue
            if salience < params.min_salience:
                drop('low_salience')
                continue
            if len(answer) > params.max_answer_chars:
                drop('too_long')
                continue
            candidates.append(Example(prompt.strip(), answer.strip(), salience,
                                      bundle=Path(path).name, session=session, turn_id=turn_id))
    judged = len(candidates)
    # Most salient first, the newest bundle first among equals: the one kept of duplicates.
    mtimes = {Path(p).name: _mtime(Path(p)) for p in bundle_paths}
    candidates.sort(key=lambda e: mtimes.get(e.bundle, 0.0), reverse=True)
    candidates.sort(key=lambda e: -e.salience)
    kept: List[Example] = []
    repeats = 0
    for ex in candidates:
        if ngram_repeat(ex.answer, params.ngram) > params.max_ngram_repeat:
            drop('repetitive')
            repeats += 1
        elif any(jaccard(ex.answer, k.answer) >= params.max_jaccard for k in kept):
            drop('duplicate')
            repeats += 1
        else:
            kept.append(ex)
    if judged and repeats / judged > params.max_repetition_ratio:
        return Selection([], dropped, f'collapse suspected: {repeats} of {judged} answers are '
                                      f'repetitive or duplicates (more than '
                                      f'{params.max_repetition_ratio:.0%})')
    if len(kept) > params.max_examples:
        drop('over_max_examples', len(kept) - params.max_examples)
        kept = kept[:params.max_examples]
    if len(kept) < params.min_examples:
        return Selection([], dropped, f'too few examples: {len(kept)} usable, min_examples is '
                                      f'{params.min_examples}')
    if new_bundles is not None:
        new = set(new_bundles)
        fresh = sum(1 for e in kept if e.bundle in new)
        if fresh < params.min_new_examples:
            return Selection([], dropped, f'too little new data: {fresh} examples from new '
                                          f'bundles, min_new_examples is '
                                          f'{params.min_new_examples}')
    raw = [max(e.salience, params.min_weight) if params.salience_weighting else 1.0
           for e in kept]
    mean = sum(raw) / len(raw)
    examples = [Example(e.prompt, e.answer, e.salience, (w / mean) if mean > 0 else 1.0,
                        e.bundle, e.session, e.turn_id) for e, w in zip(kept, raw)]
    return Selection(examples, dropped)


# ---- training ------------------------------------------------------------------------------
@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then restored (process-wide: torch
    has no per-thread setting); 0 = unchanged."""
    import torch
    if n < 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_example(tokenizer: Any, ex: Example) -> Tuple[List[int], List[int]]:
    """(input ids, labels): the exchange rendered with the model's chat template; the labels
    are -100 on the prompt, so the loss counts only the answer (and its end-of-turn)."""
    user = [{'role': 'user', 'content': ex.prompt}]
    prompt_ids = list(tokenizer.apply_chat_template(user, add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)['input_ids'])
    full = list(tokenizer.apply_chat_template(
        user + [{'role': 'assistant', 'content': ex.answer}], tokenize=True,
        return_dict=True)['input_ids'])
    if full[:len(prompt_ids)] != prompt_ids or len(full) <= len(prompt_ids):
        # A template that renders the prompt differently once answered: append the answer.
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        full = prompt_ids + list(tokenizer(ex.answer, add_special_tokens=False)['input_ids']) + eos
    labels = [-100] * len(prompt_ids) + full[len(prompt_ids):]
    return full, labels


def _target_modules(model: Any, setting: str) -> Any:
    """The configured module names present in the model, else 'all-linear'."""
    wanted = [m.strip() for m in setting.split(',') if m.strip()]
    if wanted == ['all-linear']:
        return 'all-linear'
    present = {name.rsplit('.', 1)[-1] for name, _ in model.named_modules()}
    found = [m for m in wanted if m in present]
    return found or 'all-linear'


def train(model_path: str, examples: Sequence[Example], out_dir: Path,
          params: SleepTrainingParams, should_stop: StopFn = lambda: False,
          on_progress: Optional[ProgressFn] = None) -> TrainReport:
    """Train a LoRA adapter on `examples` and save it into `out_dir` (created; it must not
    exist). Batch 1, AdamW, `epochs` passes in a seeded order (capped at `max_steps`); each
    step's loss is the answer tokens' cross-entropy times the example's weight. Examples over
    `max_seq_tokens` are dropped. `should_stop` between steps ends it with nothing saved."""
    report = TrainReport(model_name=model_name(model_path))
    t0 = time.monotonic()
    progress = on_progress or (lambda stage, fraction: None)
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        AutoModelForCausalLM, AutoTokenizer = from_transformers('AutoModelForCausalLM',
                                                                'AutoTokenizer')
    except ImportError as exc:
        report.skipped = f'sleep training needs peft, torch and transformers ({exc})'
        return report
    from ..models import LoadError, ModelSpec, locate_model_dir
    try:
        directory = locate_model_dir(ModelSpec(role='sleep_training', model_id=report.model_name,
                                               path=model_path))
    except LoadError as exc:
        report.skipped = str(exc)
        return report
    progress('loading', 0.0)
    with torch_threads(params.threads):
        try:
            with PRETRAINED_LOAD_LOCK:
                tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
                base = AutoModelForCausalLM.from_pretrained(
                    str(directory), dtype=torch.float32, local_files_only=True)
        except Exception as exc:  # corrupt files raise many types
            report.skipped = f'cannot load {directory}: {str(exc).splitlines()[0]}'
            return report
        if tokenizer.chat_template is None:
            report.skipped = f'model at {directory} has no chat template'
            return report
        encoded: List[Tuple[List[int], List[int], float]] = []
        for ex in examples:
            ids, labels = encode_example(tokenizer, ex)
            if len(ids) > params.max_seq_tokens:
                report.dropped['too_many_tokens'] = report.dropped.get('too_many_tokens', 0) + 1
                continue
            encoded.append((ids, labels, ex.weight))
        report.examples = len(encoded)
        if not encoded:
            report.skipped = 'no example fits max_seq_tokens'
            return report
        torch.manual_seed(params.seed)
        model = get_peft_model(base, LoraConfig(
            r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
            target_modules=_target_modules(base, params.target_modules), bias='none',
            task_type='CAUSAL_LM'))
        model.to(params.device)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=params.lr)
        order_rng = random.Random(params.seed)
        plan: List[int] = []
        for _ in range(params.epochs):
            epoch = list(range(len(encoded)))
            order_rng.shuffle(epoch)
            plan.extend(epoch)
        if params.max_steps:
            plan = plan[:params.max_steps]
        for step, index in enumerate(plan):
            if should_stop():
                report.interrupted = True
                report.duration_s = time.monotonic() - t0
                return report
            t_step = time.monotonic()
            ids, labels, weight = encoded[index]
            input_ids = torch.tensor([ids], device=params.device)
            target = torch.tensor([labels], device=params.device)
            loss = model(input_ids=input_ids, labels=target).loss
            (loss * weight).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report.losses.append(float(loss.detach()))
            report.steps = step + 1
            progress('training', (step + 1) / len(plan))
            busy = time.monotonic() - t_step
            if params.duty_cycle < 1.0:
                time.sleep(busy * (1.0 / params.duty_cycle - 1.0))
        if should_stop():
            report.interrupted = True
            report.duration_s = time.monotonic() - t0
            return report
        progress('saving', 1.0)
        model.save_pretrained(str(out_dir))
    report.trained = True
    report.adapter_dir = str(out_dir)
    report.duration_s = time.monotonic() - t0
    return report


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    with open(tmp, 'w') as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, 'rb') as fh:
                os.fsync(fh.fileno())


def _prune(root: Path, keep: int, current: str) -> None:
    """Delete all but the newest `keep` adapters (never the current one) and stale temp dirs."""
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
    for old in dirs[:-keep] if keep else dirs:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob('.tmp-*'):
        shutil.rmtree(tmp, ignore_errors=True)


def run_sleep_training(model_path: str, bundle_dir: Path, params: SleepTrainingParams, *,
                       should_stop: StopFn = lambda: False,
                       on_progress: Optional[ProgressFn] = None,
                       state_dir: Optional[Path] = None,
                       now: Optional[float] = None) -> TrainReport:
    """The memory block's entry point after a completed dream: gates (enabled, spacing, data),
    selects from every bundle in `bundle_dir`, trains, saves the adapter atomically and makes it
    current. Never raises for an expected condition: `report.skipped` or `.interrupted` says."""
    now = time.time() if now is None else now
    report = TrainReport(model_name=model_name(model_path))
    if not params.enabled:
        report.skipped = 'disabled (sleep_training.enabled is false)'
        return report
    root = adapters_root(model_path, state_dir)
    current = read_current(model_path, state_dir)
    if current is not None:
        since = now - float(current.get('trained_at', 0.0))
        if since < params.min_interval_s:
            report.skipped = (f'spacing: last training {since:.0f} s ago, min_interval_s is '
                              f'{params.min_interval_s:.0f}')
            return report
    progress = on_progress or (lambda stage, fraction: None)
    progress('selecting', 0.0)
    bundles = sorted(b for b in Path(bundle_dir).glob('*.jsonl')
                     if not b.name.startswith('.')) if Path(bundle_dir).is_dir() else []
    trained_on = set(current.get('bundles', [])) if current is not None else set()
    selection = select_examples(bundles, params,
                                new_bundles=[b.name for b in bundles if b.name not in trained_on])
    report.dropped = dict(selection.dropped)
    if selection.skipped:
        report.skipped = selection.skipped
        return report
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')
    tmp = root / f'.tmp-{stamp}'
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = train(model_path, selection.examples, tmp, params, should_stop, on_progress)
        result.dropped = {**report.dropped, **result.dropped}
        if not result.trained:
            return result
        meta = {'model_path': model_path, 'trained_at': now, 'examples': result.examples,
                'steps': result.steps, 'losses': result.losses,
                'bundles': sorted({e.bundle for e in selection.examples} | trained_on),
                'params': {k: getattr(params, k) for k in params.__dataclass_fields__}}
        _write_json_atomic(tmp / REPORT_FILE, meta)
        _fsync_tree(tmp)
        final = root / stamp
        os.rename(tmp, final)
        _write_json_atomic(root / CURRENT_FILE, {'adapter': final.name, 'trained_at': now,
                                                 'examples': result.examples,
                                                 'bundles': meta['bundles']})
        result.adapter_dir = str(final)
        _prune(root, params.keep_adapters, final.name)
        progress('done', 1.0)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
