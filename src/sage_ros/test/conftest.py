"""Shared fixtures: tiny random Qwen2 models built on the fly, and their parameters files.

In-process tests run with ROS discovery off (hermetic); graph tests start processes with their
own ROS_DOMAIN_ID and localhost discovery.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Tuple

import pytest
import yaml

if TYPE_CHECKING:
    from node_harness import Harness

os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'OFF'
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ['hello robot, how are you today?', 'design a plan to tidy the kitchen table',
          'the red cup is on the table next to the window', 'what do you see in front of you',
          'turn left and go to the kitchen, then stop', 'numbers 0 1 2 3 4 5 6 7 8 9 and words'] * 20


def build_tiny_model(out: Path, seed: int) -> Path:
    """A 2-layer random Qwen2 with a BPE tokenizer trained here and a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token='<|im_end|>',
                                  pad_token='<|endoftext|>', bos_token=None)
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)  # type: ignore[arg-type]  # decorated .to()
    # Never emit special tokens: every generation runs to max_new_tokens with visible text.
    model.generation_config.suppress_tokens = tok.convert_tokens_to_ids(specials)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def isolated_state_dir(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> Path:
    """Persistent state (trust, swap history) goes to a fresh directory per test, never to ~;
    processes started by the test inherit it through the environment."""
    path = tmp_path_factory.mktemp('state')
    monkeypatch.setenv('SAGE_STATE_DIR', str(path))
    return path


@pytest.fixture(scope='session')
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp('tiny_models')
    return {'small': build_tiny_model(root / 'tiny-small', seed=1),
            'large': build_tiny_model(root / 'tiny-large', seed=2)}


def params_for(models: Dict[str, Path], **overrides: object) -> dict:
    """The demo parameters (base + demo overlay, merged) with the tiny models in place of the
    real ones."""
    from sage_ros.graph import PROFILES, load_params
    params = load_params(PROFILES['demo'])
    # No MiniLM in the fast tests' kernel and language block (seconds per process); the slow
    # scenario and demo tests run the real embedder and router.
    params['/**/kernel']['ros__parameters']['salience']['text_embedder'] = 'ngram'
    params['/**/kernel']['ros__parameters']['router'] = 'keyword'
    params['/**/language_block']['ros__parameters']['router'] = 'keyword'
    params['/**/memory_block']['ros__parameters']['embedder'] = 'ngram'
    mm = params['/**/model_manager']['ros__parameters']
    for role, path in models.items():
        mm['models'][role].update(model_id=f'tiny-{role}', path=str(path), max_new_tokens=8,
                                  context_window=512)
    for dotted, value in overrides.items():
        node, _, key = dotted.partition(':')
        cursor = params[f'/**/{node}']['ros__parameters']
        *parents, leaf = key.split('.')
        for p in parents:
            cursor = cursor.setdefault(p, {})
        cursor[leaf] = value
    return params


@pytest.fixture
def tiny_params_file(tmp_path: Path, tiny_models: Dict[str, Path]) -> Path:
    path = tmp_path / 'tiny.yaml'
    path.write_text(yaml.safe_dump(params_for(tiny_models)))
    return path


@pytest.fixture
def harness(tmp_path: Path, tiny_models: Dict[str, Path]) -> Iterator[Callable[..., 'Harness']]:
    """Builds in-process graphs (`node_harness.Harness`) with the tiny models; closes them."""
    from node_harness import Harness
    made: List[Harness] = []

    def make(specs: Tuple[Any, ...], **overrides: object) -> Harness:
        h = Harness(params_for(tiny_models, **overrides), tmp_path, specs)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()
