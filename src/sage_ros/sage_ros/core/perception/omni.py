"""One model that hears, sees and reads: the runner of the 'omni' model kind (Qwen3-Omni, and
Qwen2.5-Omni).

Only the Thinker is loaded (text out; no Talker, no speech synthesis). A directory with the
full config (`model_type` qwen3_omni_moe or qwen2_5_omni, as published) is loaded with the
audio output disabled, so the Talker and code2wav/token2wav weights are never built; a
Thinker-only directory (qwen3_omni_moe_thinker, qwen2_5_omni_thinker) is loaded as it is.

The inputs are built here from the model directory's tokenizer, Whisper feature extractor
and image processor (its PIL backend): transformers' Qwen3OmniMoeProcessor also needs a video
processor, which needs torchvision, and torchvision would replace the CPU torch with a CUDA
build. The prompt comes from the directory's chat template (chat_template.json or .jinja, or
the tokenizer's), with one placeholder per audio clip and image expanded to the number of
tokens the audio and vision towers produce, exactly as the processor does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..inference import (KIND_OMNI, TASK_DETECT, TASK_OMNI, TASK_TRANSCRIBE, InferOutput,
                         InferRequest, MediaError)
from ..loading import PRETRAINED_LOAD_LOCK, from_transformers
from ..models import (Cancelled, LoadError, LoadProgress, ModelError, WeightInfo,
                      inspect_weights, tensor_bytes)
from .speech import SAMPLE_RATE, check_audio

if TYPE_CHECKING:
    from ..models import LoadedModel, ModelSpec

StopFn = Callable[[], bool]


def _qwen3_audio_tokens(frames: int, n_window: int) -> int:
    """Qwen3-Omni's audio tower: chunks of 2*n_window mel frames give 13 tokens each, the
    rest goes through three stride-2 convolutions."""
    chunk = 2 * n_window
    rest = frames % chunk
    length = (rest - 1) // 2 + 1
    return ((length - 1) // 2 + 1 - 1) // 2 + 1 + (frames // chunk) * 13


def _qwen25_audio_tokens(frames: int, n_window: int) -> int:
    """Qwen2.5-Omni's audio tower: a stride-2 convolution, then 2x average pooling."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


@dataclass(frozen=True)
class Family:
    """One omni model family: its config types, classes, placeholders and audio tokens."""

    name: str
    full_type: str          # model_type of the published directory (Thinker + Talker)
    thinker_type: str       # model_type of a Thinker-only directory
    full_class: str
    thinker_class: str
    audio: Tuple[str, str, str]   # begin, placeholder, end
    image: Tuple[str, str, str]
    audio_tokens: Callable[[int, int], int]
    n_window: int           # audio config default


QWEN3_OMNI = Family('Qwen3-Omni', 'qwen3_omni_moe', 'qwen3_omni_moe_thinker',
                    'Qwen3OmniMoeForConditionalGeneration',
                    'Qwen3OmniMoeThinkerForConditionalGeneration',
                    ('<|audio_start|>', '<|audio_pad|>', '<|audio_end|>'),
                    ('<|vision_start|>', '<|image_pad|>', '<|vision_end|>'),
                    _qwen3_audio_tokens, 50)
QWEN25_OMNI = Family('Qwen2.5-Omni', 'qwen2_5_omni', 'qwen2_5_omni_thinker',
                     'Qwen2_5OmniForConditionalGeneration',
                     'Qwen2_5OmniThinkerForConditionalGeneration',
                     ('<|audio_bos|>', '<|AUDIO|>', '<|audio_eos|>'),
                     ('<|vision_bos|>', '<|IMAGE|>', '<|vision_eos|>'),
                     _qwen25_audio_tokens, 100)
FAMILIES = {t: f for f in (QWEN3_OMNI, QWEN25_OMNI) for t in (f.full_type, f.thinker_type)}
SPEAKERS_FILE = 'spk_dict.pt'   # Qwen2.5-Omni's Talker voices, read even with the Talker off
TEMPLATE_FILES = ('chat_template.json', 'chat_template.jinja')
MIN_IMAGE_SIDE = 8        # [px]
TRANSCRIBE_PROMPT = 'Transcribe the speech in the audio exactly. Reply with the words only.'
DETECT_PROMPT = ('Describe what is in view in one short sentence: people and faces, objects, '
                 'and whether anything is moving.')
DESCRIBE_PROMPT = ("Reply in two lines. 'Heard: ' and the exact words spoken (or 'nothing'); "
                   "'Seen: ' and one short sentence about what is in view.")
RESPOND_PROMPT = 'Answer the person briefly.'
SYSTEM_PROMPT = ('You are the perception of a robot: you hear through its microphone and see '
                 'through its camera. Be brief and factual.')


def chat_template_for(family: Family) -> str:
    """A chat template for directories that ship none: ChatML with audio and image parts, in
    the layout the family's own template produces. The tiny test models are saved with it."""
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        f"{{% if c['type'] == 'audio' %}}{''.join(family.audio)}"
        f"{{% elif c['type'] == 'image' %}}{''.join(family.image)}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}")


def _broken(spec: 'ModelSpec', why: str) -> LoadError:
    return LoadError(f'cannot load omni model for role {spec.role!r}: {why}')


def read_config(spec: 'ModelSpec', directory: Path) -> Tuple[Dict[str, Any], Family]:
    """config.json as a dict and its family; LoadError saying what is wrong."""
    try:
        config = json.loads((directory / 'config.json').read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _broken(spec, f'{directory / "config.json"} is not valid JSON ({exc})') from None
    if not isinstance(config, dict):
        raise _broken(spec, f'{directory / "config.json"} is not a JSON object')
    model_type = config.get('model_type')
    if model_type not in FAMILIES:
        raise _broken(spec, f'model_type {model_type!r} in {directory} is not an omni model '
                            f'(supported: {", ".join(FAMILIES)})')
    return config, FAMILIES[model_type]


def _thinker_share(files: Sequence[Path]) -> float:
    """The share of the weight bytes that belong to the Thinker (tensors named `thinker.*`
    in a full checkpoint; 1.0 when no name says so)."""
    thinker = total = 0
    for file in files:
        if file.suffix != '.safetensors':
            return 1.0
        with open(file, 'rb') as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), 'little')))
        for name, t in header.items():
            if name == '__metadata__':
                continue
            begin, end = t['data_offsets']
            total += end - begin
            thinker += (end - begin) if name.startswith('thinker.') else 0
    return thinker / total if thinker and total else 1.0


def load_chat_template(directory: Path, tokenizer: Any, family: Family) -> str:
    """The directory's chat template (processor file first), else the tokenizer's, else ours."""
    for name in TEMPLATE_FILES:
        file = directory / name
        if file.is_file():
            text = file.read_text()
            if name.endswith('.json'):
                value = json.loads(text).get('chat_template')
                if isinstance(value, str) and value:
                    return value
            elif text.strip():
                return text
    template = getattr(tokenizer, 'chat_template', None)
    return template if isinstance(template, str) and template else chat_template_for(family)


class OmniInputs:
    """Turns audio, an image and a text prompt into the Thinker's inputs (the processor's job,
    without its video part)."""

    def __init__(self, tokenizer: Any, feature_extractor: Any, image_processor: Any,
                 chat_template: str, audio_token: str, image_token: str, family: Family,
                 n_window: int, eos_ids: Tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.audio_token = audio_token
        self.image_token = image_token
        self.family = family
        self.n_window = n_window
        self.eos_ids = eos_ids

    def prompt(self, instruction: str, has_audio: bool, has_image: bool) -> str:
        content: List[Dict[str, str]] = []
        if has_audio:
            content.append({'type': 'audio'})
        if has_image:
            content.append({'type': 'image'})
        content.append({'type': 'text', 'text': instruction})
        messages = [{'role': 'system', 'content': [{'type': 'text', 'text': SYSTEM_PROMPT}]},
                    {'role': 'user', 'content': content}]
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=True)
        return str(text)

    def __call__(self, instruction: str, audio: Optional[np.ndarray],
                 image: Optional[np.ndarray]) -> Tuple[Dict[str, Any], Dict[str, int]]:
        for token in (self.audio_token, self.image_token):   # typed by a person: not ours
            instruction = instruction.replace(token, '')
        text = self.prompt(instruction, audio is not None, image is not None)
        inputs: Dict[str, Any] = {}
        counts = {'audio_tokens': 0, 'image_tokens': 0}
        if audio is not None:
            features = self.feature_extractor(
                audio, sampling_rate=SAMPLE_RATE, padding=True, truncation=False,
                return_attention_mask=True, return_tensors='pt')
            mask = features['attention_mask']
            counts['audio_tokens'] = self.family.audio_tokens(int(mask.sum()), self.n_window)
            inputs['input_features'] = features['input_features']
            inputs['feature_attention_mask'] = mask
            text = self._expand(text, self.audio_token, counts['audio_tokens'])
        if image is not None:
            from PIL import Image
            try:
                pixels = self.image_processor(images=[Image.fromarray(image)],
                                              return_tensors='pt')
            except ValueError as exc:
                raise MediaError(f'image cannot be used: {exc}') from None
            grid = pixels['image_grid_thw']
            merge = int(getattr(self.image_processor, 'merge_size', 2))
            counts['image_tokens'] = int(grid[0].prod()) // (merge * merge)
            inputs['pixel_values'] = pixels['pixel_values']
            inputs['image_grid_thw'] = grid
            text = self._expand(text, self.image_token, counts['image_tokens'])
        encoded = self.tokenizer(text, return_tensors='pt')
        inputs['input_ids'] = encoded['input_ids']
        inputs['attention_mask'] = encoded['attention_mask']
        return inputs, counts

    @staticmethod
    def _expand(text: str, token: str, count: int) -> str:
        if text.count(token) != 1:
            raise ModelError(f'the chat template made {text.count(token)} {token} placeholders '
                             'for one input')
        return text.replace(token, token * count)


def check_image(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[2] != 3:
        raise MediaError(f'image must be RGB (H, W, 3), got shape {x.shape}')
    if x.dtype != np.uint8:
        raise MediaError(f'image must be uint8, got {x.dtype}')
    if min(x.shape[:2]) < MIN_IMAGE_SIDE:
        raise MediaError(f'image too small: {x.shape[1]}x{x.shape[0]} (at least '
                         f'{MIN_IMAGE_SIDE} px a side)')
    return np.ascontiguousarray(x)


def instruction_for(request: InferRequest) -> str:
    """What the Thinker is asked: a transcript, a description, both, or an answer."""
    extra = request.prompt.strip()
    if request.task == TASK_TRANSCRIBE:
        return TRANSCRIBE_PROMPT
    if request.task == TASK_DETECT:
        return f'{DETECT_PROMPT} {extra}'.strip()
    if request.respond:
        return f'{extra}\n{RESPOND_PROMPT}'.strip() if extra else RESPOND_PROMPT
    return f'{extra}\n{DESCRIBE_PROMPT}'.strip() if extra else DESCRIBE_PROMPT


def split_lines(text: str) -> Dict[str, str]:
    """'Heard: ...' and 'Seen: ...' lines of a description, when the model wrote them."""
    found = {}
    for line in text.splitlines():
        head, sep, rest = line.partition(':')
        key = head.strip().lower()
        if sep and key in ('heard', 'seen') and key not in found:
            found[key] = rest.strip()
    return found


class OmniRunner:
    """An omni Thinker behind the pool's Runner interface (tasks omni, transcribe, detect)."""

    kind = KIND_OMNI

    def inspect(self, spec: 'ModelSpec') -> WeightInfo:
        info = inspect_weights(spec)   # directory, weight files, intact headers, estimate
        config, family = read_config(spec, info.directory)   # a supported omni family
        directory = info.directory
        if config['model_type'] == QWEN25_OMNI.full_type \
                and not (directory / SPEAKERS_FILE).is_file():
            raise _broken(spec, f'no {SPEAKERS_FILE} in {directory} (transformers reads it to '
                                'load a full Qwen2.5-Omni directory)')
        if not ((directory / 'tokenizer.json').is_file()
                or (directory / 'vocab.json').is_file()):
            raise _broken(spec, f'no tokenizer (tokenizer.json or vocab.json) in {directory}')
        if not (directory / 'preprocessor_config.json').is_file():
            raise _broken(spec, f'no preprocessor_config.json in {directory}')
        try:
            share = _thinker_share(info.files)
        except (OSError, ValueError, KeyError, TypeError):
            share = 1.0   # inspect_weights has read these headers; never mind the estimate
        return WeightInfo(directory, info.files, info.file_bytes,
                          int(info.estimated_bytes * share))

    def load(self, spec: 'ModelSpec', info: WeightInfo, report: Callable[[LoadProgress], None],
             should_stop: Optional[StopFn]) -> Tuple[Any, Any]:
        import torch
        directory = info.directory
        config, family = read_config(spec, directory)
        shards, total = len(info.files), info.file_bytes

        def step(stage: str, fraction: float) -> None:
            if should_stop is not None and should_stop():
                raise Cancelled(f'loading role {spec.role!r} cancelled')
            report(LoadProgress(spec.role, stage, fraction, total, total, shards, shards))

        step('tokenizer', 0.82)
        inputs = self._inputs(spec, directory, config, family)
        step('weights', 0.85)
        full = config['model_type'] == family.full_type
        (model_class,) = from_transformers(family.full_class if full else family.thinker_class)
        options: Dict[str, Any] = {'dtype': getattr(torch, spec.dtype)}
        if full:
            options['enable_audio_output'] = False   # the Talker's weights are never loaded
        if spec.device.startswith('cuda'):
            options['device_map'] = spec.device
        try:
            with PRETRAINED_LOAD_LOCK:
                model = model_class.from_pretrained(str(directory), **options)
        except Exception as exc:  # as above: every failure here means "cannot load"
            raise _broken(spec, f'{type(exc).__name__}: {str(exc).strip().splitlines()[0]}'
                          if str(exc).strip() else type(exc).__name__) from None
        thinker = getattr(model, 'thinker', model)
        del model
        thinker.eval()
        if spec.device != 'cpu' and 'device_map' not in options:
            thinker.to(spec.device)
        step('weights', 0.95)
        return thinker, inputs

    def _inputs(self, spec: 'ModelSpec', directory: Path, config: Dict[str, Any],
                family: Family) -> OmniInputs:
        """Tokenizer, feature extractor and the PIL image processor from the directory."""
        thinker = config.get('thinker_config', config)
        AutoTokenizer, AutoImageProcessor, WhisperFeatureExtractor = from_transformers(
            'AutoTokenizer', 'AutoImageProcessor', 'WhisperFeatureExtractor')
        try:
            with PRETRAINED_LOAD_LOCK:
                tokenizer = AutoTokenizer.from_pretrained(str(directory))
                features = WhisperFeatureExtractor.from_pretrained(str(directory))
                images = AutoImageProcessor.from_pretrained(str(directory), backend='pil')
            template = load_chat_template(directory, tokenizer, family)
        except Exception as exc:  # transformers fails in many ways (a config value of the
            # wrong type is a huggingface_hub validation error): all mean "cannot be built"
            raise _broken(spec, f'its processor cannot be built: {type(exc).__name__}: '
                                f'{str(exc).strip().splitlines()[0] if str(exc).strip() else ""}'
                          ) from None
        if 'Torchvision' in type(images).__name__ or not hasattr(images, 'merge_size'):
            raise _broken(spec, f'image processor {type(images).__name__} is not the PIL '
                                'Qwen2-VL one (torchvision is not installed on purpose)')
        try:   # Qwen2.5-Omni's config names them *_token_index
            audio_id = int(thinker.get('audio_token_id', thinker.get('audio_token_index')))
            image_id = int(thinker.get('image_token_id', thinker.get('image_token_index')))
            n_window = int(thinker.get('audio_config', {}).get('n_window', family.n_window))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise _broken(spec, 'config.json lacks the audio/image token ids') from None
        vocab = len(tokenizer)
        if not (0 <= audio_id < vocab and 0 <= image_id < vocab):
            raise _broken(spec, f'the tokenizer ({vocab} tokens) has no audio/image token '
                                f'ids {audio_id}/{image_id}')
        audio_token, image_token = tokenizer.convert_ids_to_tokens([audio_id, image_id])
        eos = {i for i in (tokenizer.convert_tokens_to_ids('<|im_end|>'), tokenizer.eos_token_id)
               if isinstance(i, int) and 0 <= i < vocab}
        return OmniInputs(tokenizer, features, images, template, str(audio_token),
                          str(image_token), family, n_window, tuple(sorted(eos)))

    def tensor_bytes(self, model: Any) -> int:
        return tensor_bytes(model)

    def run(self, loaded: 'LoadedModel', request: InferRequest,
            should_stop: Optional[StopFn]) -> InferOutput:
        import torch
        if request.task not in (TASK_OMNI, TASK_TRANSCRIBE, TASK_DETECT):
            raise ModelError(f'an omni model serves omni, transcribe and detect, not '
                             f'{request.task!r}')
        audio = check_audio(request) if request.audio is not None else None
        image = check_image(request.image) if request.image is not None else None
        if request.task == TASK_TRANSCRIBE and audio is None:
            raise MediaError('transcribe needs audio')
        if request.task == TASK_DETECT and image is None:
            raise MediaError('detect needs an image')
        if audio is None and image is None and not request.prompt.strip():
            raise MediaError('nothing to perceive: no audio, no image and no prompt')
        model, prepare = loaded.model, loaded.tokenizer
        t0 = time.monotonic()
        inputs, counts = prepare(instruction_for(request), audio, image)
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        inputs = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
                  for k, v in inputs.items()}
        prompt_tokens = int(inputs['input_ids'].shape[1])
        StoppingCriteria, StoppingCriteriaList = from_transformers('StoppingCriteria',
                                                                   'StoppingCriteriaList')

        class _Stop(StoppingCriteria):  # type: ignore[misc, valid-type]  # after every token
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = bool(should_stop and should_stop())
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                                  device=input_ids.device)

        limit = request.max_new_tokens or loaded.spec.max_new_tokens
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=limit, do_sample=False,
                                 eos_token_id=list(prepare.eos_ids) or None,
                                 pad_token_id=prepare.tokenizer.pad_token_id,
                                 stopping_criteria=StoppingCriteriaList([_Stop()]))
        if should_stop is not None and should_stop():
            raise Cancelled('omni inference cancelled')
        new = out[0, prompt_tokens:]
        text = str(prepare.tokenizer.decode(new, skip_special_tokens=True)).strip()
        run_s = time.monotonic() - t0
        extra: Dict[str, Any] = {'prompt_tokens': prompt_tokens, 'new_tokens': int(new.numel()),
                                 **counts}
        if audio is not None:
            extra['audio_s'] = round(audio.size / SAMPLE_RATE, 3)
        if request.task == TASK_OMNI and not request.respond:
            extra.update(split_lines(text))
        return InferOutput(text=text, run_s=run_s, extra=extra)
