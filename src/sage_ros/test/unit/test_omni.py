"""The omni runner (Qwen3-Omni Thinker) on a tiny random Qwen3-Omni built here: one pass over
audio + image + text gives text; broken directories are LoadErrors with the reason (so the
perception block can fall back to the modular path); bad inputs are MediaErrors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from omni_support import build_tiny_omni
from sage_ros.core.inference import InferRequest, MediaError
from sage_ros.core.models import LoadedModel, LoadError, ModelError, ModelPool, ModelSpec
from sage_ros.core.perception.omni import QWEN3_OMNI, QWEN25_OMNI, OmniRunner, split_lines

SLOW = pytest.mark.slow   # the tiny model takes ~3 s to build and load, ~10 s on a busy CPU
RNG = np.random.default_rng(0)
AUDIO = (RNG.standard_normal(24000) * 0.1).astype(np.float32)     # 1.5 s at 16 kHz
IMAGE = RNG.integers(0, 255, (96, 128, 3), dtype=np.uint8)


@pytest.fixture(scope='session')
def tiny_omni(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_omni(tmp_path_factory.mktemp('omni') / 'tiny-omni')


def omni_spec(path: Path | str) -> ModelSpec:
    return ModelSpec('omni', 'tiny-omni', str(path), dtype='float32', kind='omni',
                     max_new_tokens=6)


@pytest.fixture(scope='module')
def loaded(tiny_omni: Path) -> Iterator[LoadedModel]:
    runner, spec = OmniRunner(), omni_spec(tiny_omni)
    stages: list[str] = []
    model, inputs = runner.load(spec, runner.inspect(spec), lambda p: stages.append(p.stage),
                                None)
    assert stages == ['tokenizer', 'weights', 'weights']
    yield LoadedModel(spec, model, inputs, 0, 0.0, 0.0)


def copy_of(tiny_omni: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_omni, tmp_path / 'omni'))


@SLOW
def test_only_the_thinker_is_loaded(loaded: LoadedModel) -> None:
    assert type(loaded.model).__name__ == 'Qwen3OmniMoeThinkerForConditionalGeneration'
    assert not hasattr(loaded.model, 'talker')
    assert OmniRunner().tensor_bytes(loaded.model) > 0


@SLOW
@pytest.mark.parametrize('task, audio, image, respond', [
    ('omni', True, True, False), ('omni', True, True, True), ('omni', False, True, False),
    ('transcribe', True, False, False), ('detect', False, True, False)])
def test_one_pass_over_audio_image_and_text_gives_text(loaded: LoadedModel, task: str,
                                                       audio: bool, image: bool,
                                                       respond: bool) -> None:
    request = InferRequest(task, audio=AUDIO if audio else None, image=IMAGE if image else None,
                           prompt='What is going on?', respond=respond, max_new_tokens=4)
    out = OmniRunner().run(loaded, request, None)
    assert isinstance(out.text, str) and out.run_s > 0
    assert out.extra['new_tokens'] <= 4 and out.extra['prompt_tokens'] > 0
    assert (out.extra['audio_tokens'] > 0) == audio and (out.extra['image_tokens'] > 0) == image
    if audio:
        assert out.extra['audio_s'] == 1.5


@SLOW
def test_placeholder_tokens_in_the_prompt_are_dropped(loaded: LoadedModel) -> None:
    request = InferRequest('omni', image=IMAGE, prompt='say <|image_pad|><|audio_pad|> twice',
                           max_new_tokens=2)
    out = OmniRunner().run(loaded, request, None)
    assert out.extra['image_tokens'] > 0 and isinstance(out.text, str)


@SLOW
def test_the_pool_serves_omni_and_stops_when_asked(tiny_omni: Path) -> None:
    pool = ModelPool({'omni': omni_spec(tiny_omni)}, 'omni')
    result = pool.infer('omni', InferRequest('omni', audio=AUDIO, image=IMAGE, prompt='hi'))
    assert result.kind == 'omni' and result.load_s > 0 and result.memory_bytes > 0
    assert isinstance(result.output.text, str) and result.output.extra['new_tokens'] <= 6
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(ModelError, match='cancelled'):
        pool.infer('omni', InferRequest('omni', image=IMAGE, max_new_tokens=50), stop)
    pool.unload_all()


@SLOW
@pytest.mark.parametrize('request_, reason', [
    (InferRequest('omni'), 'nothing to perceive'),
    (InferRequest('transcribe', image=IMAGE), 'transcribe needs audio'),
    (InferRequest('detect', audio=AUDIO), 'detect needs an image'),
    (InferRequest('omni', image=IMAGE[..., 0]), r'must be RGB \(H, W, 3\)'),
    (InferRequest('omni', image=IMAGE.astype(np.float32)), 'must be uint8'),
    (InferRequest('omni', image=IMAGE[:4, :4]), 'too small'),
    (InferRequest('omni', audio=np.full(8000, np.nan, np.float32)), 'NaN'),
])
def test_bad_inputs_are_media_errors(loaded: LoadedModel, request_: InferRequest, reason: str
                                     ) -> None:
    with pytest.raises(MediaError, match=reason):
        OmniRunner().run(loaded, request_, None)


@SLOW
def test_a_task_it_does_not_serve_is_a_model_error(loaded: LoadedModel) -> None:
    with pytest.raises(ModelError, match="not 'embed'"):
        OmniRunner().run(loaded, InferRequest('embed', texts=('x',)), None)


def test_a_missing_dir_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match='not found'):
        OmniRunner().inspect(omni_spec(tmp_path / 'nowhere'))


def test_a_hub_id_not_in_the_local_cache_is_a_load_error() -> None:
    with pytest.raises(LoadError, match='neither a directory nor in the local Hugging Face'):
        OmniRunner().inspect(omni_spec('Qwen/Qwen3-Omni-30B-A3B-Instruct'))


@SLOW
@pytest.mark.parametrize('damage, reason', [
    ('config.json=not json {', 'is not valid JSON'),
    ('config.json={"model_type": "qwen2"}', "model_type 'qwen2' .* is not an omni model"),
    ('preprocessor_config.json', 'no preprocessor_config.json'),
    ('tokenizer.json', 'no tokenizer'),
    ('model.safetensors=garbage', 'is corrupt'),
])
def test_broken_dirs_are_refused_at_inspect(tiny_omni: Path, tmp_path: Path, damage: str,
                                            reason: str) -> None:
    broken = copy_of(tiny_omni, tmp_path)
    name, _, text = damage.partition('=')
    (broken / name).unlink()
    if text:
        (broken / name).write_text(text)
    with pytest.raises(LoadError, match=reason):
        OmniRunner().inspect(omni_spec(broken))


@SLOW
@pytest.mark.parametrize('damage, reason', [
    ('preprocessor_config.json', 'processor cannot be built'),
    ('image_token_id=null', 'processor cannot be built: .*image_token_id'),
    ('audio_token_id', 'lacks the audio/image token ids'),
    ('audio_token_id=5000', r'the tokenizer \(\d+ tokens\) has no audio/image token ids'),
])
def test_a_processor_that_cannot_be_built_is_a_load_error(tiny_omni: Path, tmp_path: Path,
                                                          damage: str, reason: str) -> None:
    broken = copy_of(tiny_omni, tmp_path)
    if damage == 'preprocessor_config.json':
        (broken / damage).write_text('{"feature_size": "many"')          # truncated JSON
    else:
        config = json.loads((broken / 'config.json').read_text())
        key, _, value = damage.partition('=')
        del config['thinker_config'][key]
        if value:
            config['thinker_config'][key] = json.loads(value)
        (broken / 'config.json').write_text(json.dumps(config))
    runner, spec = OmniRunner(), omni_spec(broken)
    with pytest.raises(LoadError, match=reason):
        runner.load(spec, runner.inspect(spec), lambda p: None, None)


def test_the_pool_reports_a_broken_omni_entry_as_a_load_error(tmp_path: Path) -> None:
    pool = ModelPool({'omni': omni_spec(tmp_path / 'nowhere')}, 'omni')
    with pytest.raises(LoadError):
        pool.infer('omni', InferRequest('omni', image=IMAGE))


def test_audio_tokens_follow_the_audio_towers_strides() -> None:
    # Qwen3-Omni: 100-frame chunks (n_window 50) give 13 tokens; the rest: three stride-2
    # convolutions. Qwen2.5-Omni: a stride-2 convolution, then 2x pooling.
    count = QWEN3_OMNI.audio_tokens
    assert (count(100, 50), count(200, 50), count(150, 50), count(1, 50)) == (13, 26, 20, 1)
    assert (QWEN25_OMNI.audio_tokens(150, 100), QWEN25_OMNI.audio_tokens(3000, 100)) == (37, 750)


@SLOW
def test_a_tiny_qwen25_omni_runs_too(tmp_path: Path) -> None:
    directory = build_tiny_omni(tmp_path / 'qwen25', family='qwen2.5')
    speakers = directory / 'spk_dict.pt'
    speakers.rename(tmp_path / 'spk_dict.pt')
    with pytest.raises(LoadError, match='no spk_dict.pt'):
        OmniRunner().inspect(omni_spec(directory))
    (tmp_path / 'spk_dict.pt').rename(speakers)
    pool = ModelPool({'omni': omni_spec(directory)}, 'omni')
    result = pool.infer('omni', InferRequest('omni', audio=AUDIO, image=IMAGE, prompt='hi'))
    assert type(pool.loaded()[0].model).__name__ == 'Qwen2_5OmniThinkerForConditionalGeneration'
    out = result.output
    assert isinstance(out.text, str) and out.run_s > 0 and out.extra['new_tokens'] <= 6
    assert out.extra['audio_tokens'] == QWEN25_OMNI.audio_tokens(150, 100)
    assert out.extra['image_tokens'] > 0
    pool.unload_all()


def test_description_lines_are_split() -> None:
    assert split_lines('Heard: turn left\nSeen: one face, centre.') == {
        'heard': 'turn left', 'seen': 'one face, centre.'}
    assert split_lines('no structure here') == {}
