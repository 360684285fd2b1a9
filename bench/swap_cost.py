"""Cost of a model swap: ours against the same steps done by hand, and against the I/O floor.

Three figures, measured in the same run on the demo's real offline models:
- ours: `ModelPool.generate(large)` while only `small` is resident (max_resident 1): unload,
  load, first token, as the model manager does it;
- by hand: the same steps with raw transformers calls (del + gc + malloc_trim, from_pretrained,
  apply_chat_template, generate one token);
- the I/O floor: a plain sequential read of the large model's weight files (page cache warm,
  as it is for both swaps after the first run).
Then the switch back to a role the policy kept resident (max_resident 2): goal < 50 ms.
Goals: ours / by hand <= 1.1. `ours` reads the weight files ahead in chunks (progress in bytes,
cancellable); the same swap without that read-ahead is measured too.
"""

from __future__ import annotations

import argparse
import dataclasses
import ctypes
import gc
import time
from pathlib import Path
from typing import Any, Dict, List

from common import demo_spec, report, summary_ms

PROMPT = 'Name three rooms of a house.'


def read_files(paths: List[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, 'rb', buffering=0) as f:
            while True:
                chunk = f.read(16 << 20)
                if not chunk:
                    break
                total += len(chunk)
    return total


def by_hand(small_dir: str, large_dir: str, dtype: Any, device: str) -> float:
    """Unload small, load large, first token: raw transformers, no SAGE code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(small_dir, dtype=dtype, local_files_only=True,
                                                 device_map=device)
    t0 = time.perf_counter()
    del model
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    tok = AutoTokenizer.from_pretrained(large_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(large_dir, dtype=dtype, local_files_only=True,
                                                 device_map=device)
    model.eval()
    enc = tok.apply_chat_template([{'role': 'user', 'content': PROMPT}], add_generation_prompt=True,
                                  return_tensors='pt', return_dict=True).to(device)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=1, do_sample=False)
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--small', help='model directory for the small role (default: the demo\'s)')
    ap.add_argument('--large', help='model directory for the large role (default: the demo\'s)')
    ap.add_argument('--device', default='', help='torch device (default: the demo\'s, cpu)')
    args = ap.parse_args()

    import torch

    from sage_ros.core.conversation import ChatTurn
    from sage_ros.core.models import ModelPool
    from sage_ros.core.swap_policy import PolicyConfig, SwapPolicy

    specs: Dict[str, Any] = {role: demo_spec(role, 1, getattr(args, role), args.device)
                             for role in ('small', 'large')}
    large_dir = Path(specs['large'].path)
    weight_files = sorted(large_dir.glob('*.safetensors'))
    messages = [ChatTurn('user', PROMPT)]
    dtype = getattr(torch, specs['large'].dtype)

    ours: List[float] = []
    hand: List[float] = []
    floor: List[float] = []
    split: Dict[str, List[float]] = {'unload_s': [], 'read_s': [], 'total_s': []}
    read_files(weight_files)  # warm the page cache for everyone alike
    policy = SwapPolicy(PolicyConfig(substitute=False))   # every request gets its own role
    ours_no_preread: List[float] = []
    for _ in range(args.runs):
        for preread in (True, False):
            pool = ModelPool(specs, 'small', max_resident=1, policy=policy,
                             preread_weights=preread)
            pool.load('small')
            t0 = time.perf_counter()
            result = pool.generate('large', messages, max_new_tokens=1)
            (ours if preread else ours_no_preread).append(time.perf_counter() - t0)
            assert result.swapped and result.role == 'large'
            if preread:
                event = pool.history[-1]
                split['unload_s'].append(event.unload_s)
                split['read_s'].append(event.read_s)
                split['total_s'].append(event.duration_s)
            pool.unload_all()
        hand.append(by_hand(specs['small'].path, specs['large'].path, dtype, specs['large'].device))
        t0 = time.perf_counter()
        nbytes = read_files(weight_files)
        floor.append(time.perf_counter() - t0)

    # Switching back to a role the policy kept resident (both fit: max_resident 2): the first
    # token after a switch against the first token of the same role asked for twice in a row.
    resident = {r: dataclasses.replace(sp, keep_resident=True) for r, sp in specs.items()}
    pool = ModelPool(resident, 'small', max_resident=2, policy=policy)
    pool.load('small')
    pool.load('large')
    switched: Dict[str, List[float]] = {'small': [], 'large': []}
    repeated: Dict[str, List[float]] = {'small': [], 'large': []}
    loads_before = pool.swap_count
    for i in range(10):
        for role in ('small', 'large'):
            r = pool.generate(role, messages, max_new_tokens=1)   # after the other role
            switched[role].append(r.time_to_first_token_s)
            r = pool.generate(role, messages, max_new_tokens=1)   # same role again
            repeated[role].append(r.time_to_first_token_s)
            assert r.role == role and not r.swapped
    assert pool.swap_count == loads_before, 'a resident role was reloaded'
    pool.unload_all()
    switch_added = {role: round(summary_ms(switched[role])['p50_ms']
                                - summary_ms(repeated[role])['p50_ms'], 3)
                    for role in switched}

    o, h, f = summary_ms(ours), summary_ms(hand), summary_ms(floor)
    ratio = round(o['p50_ms'] / h['p50_ms'], 3)
    ratio_no_preread = round(summary_ms(ours_no_preread)['p50_ms'] / h['p50_ms'], 3)
    report('swap_cost', {
        'from': specs['small'].model_id, 'to': specs['large'].model_id, 'runs': args.runs,
        'weight_bytes': nbytes, 'ours_unload_load_first_token': o,
        'by_hand_raw_transformers': h, 'io_floor_sequential_read': f,
        'ours_without_preread': summary_ms(ours_no_preread),
        'ours_split_mean_s': {k: round(sum(v) / len(v), 3) for k, v in split.items()},
        'ratio_ours_to_by_hand_p50': ratio,
        'ratio_ours_without_preread_to_by_hand_p50': ratio_no_preread, 'ratio_ours_to_io_floor_p50':
            round(o['p50_ms'] / f['p50_ms'], 1),
        'first_token_after_switch_to_resident': {r: summary_ms(v) for r, v in switched.items()},
        'first_token_same_role_again': {r: summary_ms(v) for r, v in repeated.items()},
        'switch_added_p50_ms': switch_added,
        'goals': {'ratio_le_1.1': ratio <= 1.1,
                  'switch_lt_50ms': all(v < 50.0 for v in switch_added.values())}})


if __name__ == '__main__':
    main()
