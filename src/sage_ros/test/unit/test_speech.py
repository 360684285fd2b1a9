"""Speech to text: the faster-whisper runner on the real offline model (espeak-ng speech made
here), its file checks on real broken directories, and bad audio refused with a reason."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from media_support import speak
from sage_ros.core.inference import InferRequest, MediaError
from sage_ros.core.models import LoadedModel, LoadError, ModelError, ModelPool, ModelSpec
from sage_ros.core.offline_models import OFFLINE_MODELS, is_prepared
from sage_ros.core.perception.audio import read_wav
from sage_ros.core.perception.speech import (MIN_AUDIO_S, THREADS_ENV, SpeechRunner,
                                             check_audio, estimate_bytes)

WHISPER = next(m for m in OFFLINE_MODELS if m.name == 'faster-whisper-base')
SENTENCE = 'Hello robot. Please turn left and go to the kitchen.'


def speech_spec(path: str = 'offline:faster-whisper-base', dtype: str = 'int8') -> ModelSpec:
    return ModelSpec('speech', 'faster-whisper-base', path, dtype=dtype, kind='speech',
                     keep_resident=True)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture(scope='module')
def whisper_dir() -> Path:
    assert is_prepared(WHISPER), 'run `sage models prepare` (make setup does)'
    return SpeechRunner().inspect(speech_spec()).directory


@pytest.fixture(scope='module')
def loaded(whisper_dir: Path) -> Iterator[LoadedModel]:
    runner, spec = SpeechRunner(), speech_spec()
    info = runner.inspect(spec)
    model, processor = runner.load(spec, info, lambda p: None, None)
    yield LoadedModel(spec, model, processor, 0, 0.0, 0.0)
    del model


@pytest.fixture
def sentence(tmp_path: Path) -> tuple[np.ndarray, int]:
    audio, rate = read_wav(speak(SENTENCE, tmp_path / 'hello.wav'))
    return audio, rate


def test_the_prepared_dir_is_a_whisper_model_with_an_estimate(whisper_dir: Path) -> None:
    info = SpeechRunner().inspect(speech_spec())
    assert {f.name for f in info.files} == {'model.bin', 'config.json', 'tokenizer.json'}
    model_bin = (whisper_dir / 'model.bin').stat().st_size
    assert model_bin == WHISPER.size
    assert info.estimated_bytes == estimate_bytes(model_bin, 'int8', 'cpu')
    # float32 takes about twice the float16 file; int8 about half of it (plus a working set)
    f32 = SpeechRunner().inspect(speech_spec(dtype='float32')).estimated_bytes
    assert model_bin < f32 - info.estimated_bytes < 2 * model_bin


def test_a_missing_offline_model_says_to_prepare(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('SAGE_MODEL_CACHE', str(tmp_path))
    with pytest.raises(LoadError, match=r'is not a directory.*run `sage models prepare`'):
        SpeechRunner().inspect(speech_spec())


@pytest.mark.parametrize('damage, reason', [
    ('drop:tokenizer.json', 'tokenizer.json missing'),
    ('garble:config.json', 'unreadable file'),
    ('garble:model.bin', 'is not a CTranslate2 model'),
])
def test_broken_model_dirs_are_refused_with_the_reason(whisper_dir: Path, tmp_path: Path,
                                                       damage: str, reason: str) -> None:
    broken = tmp_path / 'whisper'
    broken.mkdir()
    for f in whisper_dir.iterdir():
        (broken / f.name).symlink_to(f)
    action, name = damage.split(':')
    (broken / name).unlink()
    if action == 'garble':
        (broken / name).write_bytes(b'\xff\xfe not what it should be')
    with pytest.raises(LoadError, match=reason):
        SpeechRunner().inspect(speech_spec(str(broken)))


@pytest.mark.slow
def test_a_truncated_model_bin_fails_to_load_with_a_load_error(whisper_dir: Path,
                                                               tmp_path: Path) -> None:
    broken = tmp_path / 'whisper'
    broken.mkdir()
    for f in whisper_dir.iterdir():
        if f.name != 'model.bin':
            (broken / f.name).symlink_to(f)
    with open(whisper_dir / 'model.bin', 'rb') as src:
        (broken / 'model.bin').write_bytes(src.read(1 << 20))   # header intact, data cut off
    runner, spec = SpeechRunner(), speech_spec(str(broken))
    with pytest.raises(LoadError, match="cannot load speech model for role 'speech'"):
        runner.load(spec, runner.inspect(spec), lambda p: None, None)


def test_a_bad_thread_count_is_refused(monkeypatch: pytest.MonkeyPatch, whisper_dir: Path
                                       ) -> None:
    monkeypatch.setenv(THREADS_ENV, 'many')
    runner, spec = SpeechRunner(), speech_spec()
    with pytest.raises(LoadError, match=f"{THREADS_ENV}='many' is not a thread count"):
        runner.load(spec, runner.inspect(spec), lambda p: None, None)


@pytest.mark.parametrize('audio, rate, reason', [
    (None, 16000, 'no audio'),
    (np.zeros(int(MIN_AUDIO_S * 16000) - 1, np.float32), 16000, 'too short'),
    (np.zeros((16000, 2), np.float32), 16000, 'must be mono'),
    (np.zeros(16000, np.int16), 16000, 'must be float samples'),
    (np.full(16000, np.nan, np.float32), 16000, 'NaN or infinite'),
    (np.full(16000, 3000.0, np.float32), 16000, 'outside \\[-1, 1\\]'),
    (np.zeros(16000, np.float32), 0, 'bad sample rate'),
])
def test_garbage_audio_is_a_media_error(audio: np.ndarray | None, rate: int, reason: str
                                        ) -> None:
    with pytest.raises(MediaError, match=reason):
        check_audio(InferRequest('transcribe', audio=audio, sample_rate=rate))


@pytest.mark.slow
def test_espeak_speech_is_transcribed(loaded: LoadedModel, sentence: tuple[np.ndarray, int]
                                      ) -> None:
    audio, rate = sentence
    out = SpeechRunner().run(loaded, InferRequest('transcribe', audio=audio, sample_rate=rate),
                             None)
    said, heard = words(SENTENCE), set(words(out.text))
    assert sum(w in heard for w in said) >= len(said) / 2, out.text
    assert out.language == 'en' and out.run_s > 0
    assert out.extra['audio_s'] == pytest.approx(len(audio) / rate, abs=0.01)
    assert out.extra['rtf'] == pytest.approx(out.run_s / out.extra['audio_s'], rel=0.01)
    assert out.extra['compute_type'] == 'int8' and out.extra['segments'] >= 1


@pytest.mark.slow
def test_other_sample_rates_are_resampled(loaded: LoadedModel, sentence: tuple[np.ndarray, int]
                                          ) -> None:
    from scipy.signal import resample_poly
    audio, rate = sentence
    assert rate == 16000
    cd_rate = resample_poly(audio, 441, 160).astype(np.float32)
    out = SpeechRunner().run(loaded, InferRequest('transcribe', audio=cd_rate, sample_rate=44100,
                                                  prompt='Robot commands.'), None)
    said, heard = words(SENTENCE), set(words(out.text))
    assert sum(w in heard for w in said) >= len(said) / 2, out.text
    assert out.extra['audio_s'] == pytest.approx(len(audio) / rate, abs=0.01)


@pytest.mark.slow
def test_garbage_audio_leaves_the_model_usable(loaded: LoadedModel,
                                               sentence: tuple[np.ndarray, int]) -> None:
    runner = SpeechRunner()
    with pytest.raises(MediaError):
        runner.run(loaded, InferRequest('transcribe', audio=np.full(8000, np.inf, np.float32)),
                   None)
    with pytest.raises(ModelError, match="serves 'transcribe', not 'embed'"):
        runner.run(loaded, InferRequest('embed', texts=('x',)), None)
    noise = (np.random.default_rng(0).standard_normal(32000) * 0.05).astype(np.float32)
    out = runner.run(loaded, InferRequest('transcribe', audio=noise), None)
    assert isinstance(out.text, str) and out.extra['audio_s'] == 2.0
    audio, rate = sentence
    again = runner.run(loaded, InferRequest('transcribe', audio=audio, sample_rate=rate), None)
    assert words(again.text)


@pytest.mark.slow
def test_the_pool_serves_transcribe_on_a_speech_role(sentence: tuple[np.ndarray, int]) -> None:
    assert is_prepared(WHISPER), 'run `sage models prepare` (make setup does)'
    pool = ModelPool({'speech': speech_spec()}, 'speech')
    audio, rate = sentence
    result = pool.infer('speech', InferRequest('transcribe', audio=audio, sample_rate=rate))
    assert result.role == 'speech' and result.kind == 'speech' and result.load_s > 0
    assert result.memory_bytes > 0 and words(result.output.text)
    assert pool.is_loaded('speech')
    pool.unload_all()


def test_a_hub_id_is_never_downloaded() -> None:
    with pytest.raises(LoadError, match='nothing is downloaded'):
        SpeechRunner().inspect(speech_spec('Systran/faster-whisper-base'))
