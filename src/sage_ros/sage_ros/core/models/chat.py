"""The chat runner: a transformers causal LM (with an optional LoRA adapter merged in), and
streaming generation with the prompt fitted to the model's context window."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..answers import cut_to_sentence
from ..context import ContextOverflow, FittedContext, SummaryCache, fit_to_window
from ..conversation import ChatTurn
from ..inference import KIND_CHAT, InferOutput, InferRequest
from ..loading import PRETRAINED_LOAD_LOCK, from_transformers
from .events import GenerationResult, LoadedModel, LoadProgress, ProgressFn
from .memory import release_memory, tensor_bytes
from .specs import Cancelled, LoadError, ModelError, ModelSpec, StopFn, TextFn, WeightInfo, \
    first_line
from .weights import inspect_weights

NoteFn = Callable[[str, str], None]   # (level 'info' | 'warning', text)
Summarizer = Callable[[Sequence[ChatTurn]], str]


GENERATION_THREADS = 4   # generations of different chat models at once (one per model at a time)


class ChatRunner:
    """Loads chat models with transformers and generates with them. Long-lived worker threads
    run the generations while the callers stream the text: a new thread per call would set up
    its CUDA state (cuBLAS handle, workspace) each time. The pool runs one generation per model
    at a time; generations of different models (and a summary) may run side by side."""

    kind = KIND_CHAT

    def __init__(self, note: Optional[NoteFn] = None) -> None:
        self._note: NoteFn = note or (lambda level, text: None)
        self._thread = ThreadPoolExecutor(max_workers=GENERATION_THREADS,
                                          thread_name_prefix='generate')

    # ---- Runner protocol ---------------------------------------------------------------------
    def inspect(self, spec: ModelSpec) -> WeightInfo:
        return inspect_weights(spec)

    def load(self, spec: ModelSpec, info: WeightInfo, report: ProgressFn,
             should_stop: Optional[StopFn]) -> Tuple[Any, Any]:
        model, tokenizer, _ = self.load_chat(spec, info, report, should_stop)
        return model, tokenizer

    def tensor_bytes(self, model: Any) -> int:
        return tensor_bytes(model)

    def run(self, loaded: LoadedModel, request: InferRequest,
            should_stop: Optional[StopFn]) -> InferOutput:
        raise ModelError(f'role {loaded.spec.role!r} is a chat model: use generate')

    # ---- loading -----------------------------------------------------------------------------
    def import_libraries(self) -> None:
        """Import transformers before the pool measures the load's memory."""
        from_transformers('AutoModelForCausalLM', 'AutoTokenizer')

    def load_chat(self, spec: ModelSpec, info: WeightInfo, report: ProgressFn,
                  should_stop: Optional[StopFn], preread: bool = True) -> Tuple[Any, Any, str]:
        """(model, tokenizer, directory of the merged LoRA adapter or '')."""
        shards, total = len(info.files), info.file_bytes

        def step(stage: str, fraction: float) -> None:
            if should_stop and should_stop():
                raise Cancelled(f'load of role {spec.role!r} cancelled during {stage}')
            report(LoadProgress(spec.role, stage, fraction, total if preread else 0, total,
                                shards if preread else 0, shards))

        import torch
        AutoModelForCausalLM, AutoTokenizer = from_transformers('AutoModelForCausalLM',
                                                                'AutoTokenizer')
        step('tokenizer', 0.82)
        try:
            with PRETRAINED_LOAD_LOCK:
                tokenizer = AutoTokenizer.from_pretrained(str(info.directory),
                                                          local_files_only=True)
        except Exception as exc:  # corrupt files raise many types; all mean "cannot load"
            raise LoadError(f'cannot load the tokenizer of role {spec.role!r} from '
                            f'{info.directory}: {first_line(exc)}') from exc
        if tokenizer.chat_template is None:
            raise LoadError(f'model for role {spec.role!r} at {info.directory} has no chat '
                            'template')
        step('weights', 0.85)
        kwargs: Dict[str, Any] = {}
        if spec.device != 'cpu':
            kwargs['device_map'] = spec.device

        def load_weights() -> Any:
            with PRETRAINED_LOAD_LOCK:
                loaded = AutoModelForCausalLM.from_pretrained(
                    str(info.directory), dtype=getattr(torch, spec.dtype), local_files_only=True,
                    **kwargs)
            loaded.eval()
            return loaded

        try:
            model = load_weights()
            adapter = ''
            if spec.adapter.strip():
                model, adapter = self._apply_adapter(spec, model, load_weights)
        except Exception as exc:  # corrupt files raise many types; all mean "cannot load"
            release_memory()
            raise LoadError(f'cannot load model for role {spec.role!r} from {info.directory}: '
                            f'{first_line(exc)}') from exc
        return model, tokenizer, adapter

    def _apply_adapter(self, spec: ModelSpec, model: Any, load_base: Callable[[], Any]
                       ) -> Tuple[Any, str]:
        """Merge the role's configured LoRA adapter into `model`: (model, adapter directory).
        A missing or broken adapter is a warning and the base model serves ('' = none merged)."""
        from ..memory.sleep_training import apply_adapter, resolve_adapter
        path, problem = resolve_adapter(spec.adapter, spec.path)
        if path is None:
            if problem:
                self._note('warning', f'role {spec.role!r}: {problem}; serving the base model')
            else:
                self._note('info', f'role {spec.role!r}: no sleep-trained adapter yet; serving '
                                   'the base model')
            return model, ''

        def reload_base() -> Any:
            release_memory()
            return load_base()

        model, problem = apply_adapter(model, path, reload_base)
        if problem:
            self._note('warning', f'role {spec.role!r}: {problem}; serving the base model')
            return model, ''
        self._note('info', f'role {spec.role!r}: LoRA adapter {path} merged into the weights')
        return model, str(path)

    # ---- generation --------------------------------------------------------------------------
    def fit(self, entry: LoadedModel, messages: Sequence[ChatTurn], max_new_tokens: int,
            summarize: Optional[Summarizer], cache: SummaryCache, preamble: str,
            memory: Sequence[str], memory_share: float) -> FittedContext:
        """The messages fitted to the entry's window (older turns summarised if need be)."""
        try:
            return fit_to_window(
                messages, lambda ms: prompt_tokens(entry.tokenizer, ms),
                entry.spec.context_window,
                reserve_tokens=min(max_new_tokens, entry.spec.context_window // 2),
                summarize=summarize, cache=cache, preamble=preamble, memory=memory,
                memory_share=memory_share)
        except ContextOverflow as exc:
            raise ModelError(f'role {entry.spec.role!r}: {exc}') from None

    def generate(self, entry: LoadedModel, messages: Sequence[ChatTurn], max_new_tokens: int,
                 temperature: float, on_text: Optional[TextFn], should_stop: Optional[StopFn],
                 swapped: bool, t0: float, fitted: Optional[FittedContext] = None
                 ) -> GenerationResult:
        """Stream an answer to `messages` (already fitted, `fitted` says how) from `entry`."""
        import torch
        StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer = from_transformers(
            'StoppingCriteria', 'StoppingCriteriaList', 'TextIteratorStreamer')

        tok, model = entry.tokenizer, entry.model
        chat = [{'role': m.role, 'content': m.content} for m in messages]
        enc = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors='pt',
                                      return_dict=True)
        input_ids = enc['input_ids'].to(entry.spec.device)
        attention_mask = enc['attention_mask'].to(entry.spec.device)
        n_prompt = int(input_ids.shape[-1])
        budget = min(max_new_tokens, entry.spec.context_window - n_prompt)
        if budget < 1:
            raise ModelError(f'prompt of {n_prompt} tokens does not fit the context window '
                             f'({entry.spec.context_window}) of role {entry.spec.role!r}')

        stop_flag = should_stop or (lambda: False)
        aborted = threading.Event()   # the caller's side failed: stop the worker too

        class _Stop(StoppingCriteria):  # type: ignore[misc, valid-type]  # after every token
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = aborted.is_set() or bool(stop_flag())
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                                  device=input_ids.device)

        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs: Dict[str, Any] = dict(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=budget,
            streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

        output: Dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    output['ids'] = model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the calling thread
                output['error'] = exc
                streamer.end()

        worker = self._thread.submit(run)
        pieces: List[str] = []
        ttft = 0.0
        try:
            for piece in streamer:
                if not piece:
                    continue
                if not pieces:
                    ttft = time.monotonic() - t0
                pieces.append(piece)
                if on_text:
                    on_text(piece)
        except BaseException:
            # Never leave with the model still generating: the lock is released on the way
            # out, and a swap must not pull the model from under a running generation.
            aborted.set()
            for _ in streamer:
                pass
            worker.result()
            raise
        worker.result()
        if 'error' in output:
            raise ModelError(f'generation failed: {output["error"]}') from output['error']
        if stop_flag():
            raise Cancelled('generation cancelled')
        ids = output['ids'][0]
        completion = int(ids.shape[-1]) - n_prompt
        text = ''.join(pieces).strip()
        truncated = False
        if completion >= budget and int(ids[-1]) not in eos_ids(model, tok):
            text, _ = cut_to_sentence(text)   # kept whole when it has no sentence end
            truncated = True
        return GenerationResult(text=text, truncated=truncated, model_id=entry.spec.model_id,
                                role=entry.spec.role, swapped=swapped,
                                prompt_tokens=n_prompt, completion_tokens=max(0, completion),
                                time_to_first_token_s=ttft or (time.monotonic() - t0),
                                duration_s=time.monotonic() - t0, context=fitted,
                                memory_used=fitted.memory_used if fitted else 0)


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Token ids that end a generation: the generation config's and the tokenizer's."""
    ids = set()
    for value in (getattr(model.generation_config, 'eos_token_id', None),
                  tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def prompt_tokens(tokenizer: Any, messages: Sequence[ChatTurn]) -> int:
    """Length of the rendered prompt, with the model's own tokenizer and chat template."""
    ids: Any = tokenizer.apply_chat_template(
        [{'role': m.role, 'content': m.content} for m in messages], add_generation_prompt=True,
        tokenize=True, return_dict=True)
    return len(ids['input_ids'])
