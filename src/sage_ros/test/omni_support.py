"""Tiny random omni models (Qwen3-Omni, Qwen2.5-Omni), built on the fly for the omni runner.

Same layout as the published directories (the full config with the audio output disabled,
safetensors weights under `thinker.`, tokenizer, a preprocessor_config.json holding the Whisper
feature extractor and the Qwen2-VL image processor settings, and chat_template.json), but with a
1-layer text model of hidden size 32 (Qwen3-Omni: 4 experts, 2 per token), 1-layer audio and
vision towers and a 300-token BPE tokenizer trained here: 60-74 k parameters, built in a few
seconds on a CPU. Their output is random text; tests assert structure only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from sage_ros.core.perception.omni import QWEN3_OMNI, QWEN25_OMNI, Family, chat_template_for

COMMON = {'pad_token': '<|endoftext|>', 'im_start': '<|im_start|>', 'eos_token': '<|im_end|>'}
CORPUS = ['hello robot, what do you hear and see?', 'a person is talking in front of the camera',
          'describe the scene: one face, left of centre, nothing moves', 'heard: seen: nothing',
          'the red cup is on the table'] * 20
MEL_BINS = 16
FAMILIES = ('qwen3', 'qwen2.5')


def _tokenizer(family: Family) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    (a_bos, a_pad, a_eos), (v_bos, i_pad, v_eos) = family.audio, family.image
    video = '<|video_pad|>' if family is QWEN3_OMNI else '<|VIDEO|>'
    named = {'audio_bos_token': a_bos, 'audio_token': a_pad, 'audio_eos_token': a_eos,
             'vision_bos_token': v_bos, 'image_token': i_pad, 'vision_eos_token': v_eos,
             'video_token': video}
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[*COMMON.values(), *named.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=COMMON['eos_token'],
                                   pad_token=COMMON['pad_token'], extra_special_tokens=named)


def _id(tok: Any, token: str) -> int:
    return int(tok.convert_tokens_to_ids(token))


def build_tiny_omni(out: Path, seed: int = 0, family: str = 'qwen3') -> Path:
    """Writes a tiny random omni model (Thinker weights only) to `out` and returns it."""
    import torch
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
        Qwen2VLImageProcessorPil

    fam = {'qwen3': QWEN3_OMNI, 'qwen2.5': QWEN25_OMNI}[family]
    tok = _tokenizer(fam)
    audio: Dict[str, Any] = {
        'num_mel_bins': MEL_BINS, 'encoder_layers': 1, 'encoder_attention_heads': 2,
        'encoder_ffn_dim': 32, 'd_model': 16, 'output_dim': 32, 'n_window': fam.n_window}
    vision: Dict[str, Any] = {
        'depth': 1, 'hidden_size': 16, 'intermediate_size': 32, 'num_heads': 2,
        'spatial_merge_size': 2, 'temporal_patch_size': 2, 'out_hidden_size': 32}
    text: Dict[str, Any] = {
        'vocab_size': len(tok), 'hidden_size': 32, 'intermediate_size': 64,
        'num_hidden_layers': 1, 'num_attention_heads': 2, 'num_key_value_heads': 1,
        'max_position_embeddings': 4096,
        'rope_parameters': {'rope_type': 'default', 'rope_theta': 10000.0,
                            'mrope_section': [2, 3, 3]}}
    ids = {'audio': _id(tok, fam.audio[1]), 'image': _id(tok, fam.image[1]),
           'video': _id(tok, tok.video_token), 'audio_start': _id(tok, fam.audio[0]),
           'vision_start': _id(tok, fam.image[0])}
    torch.manual_seed(seed)
    if fam is QWEN3_OMNI:
        from transformers.models.qwen3_omni_moe import (Qwen3OmniMoeConfig,
                                                        Qwen3OmniMoeForConditionalGeneration)
        audio.update(downsample_hidden_size=8)
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
        text.update(head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
        text['rope_parameters']['interleaved'] = True
        thinker = {'audio_config': audio, 'vision_config': vision, 'text_config': text,
                   'audio_token_id': ids['audio'], 'image_token_id': ids['image'],
                   'video_token_id': ids['video'], 'audio_start_token_id': ids['audio_start'],
                   'vision_start_token_id': ids['vision_start']}
        model: Any = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(
            thinker_config=thinker, enable_audio_output=False,
            im_start_token_id=_id(tok, COMMON['im_start']),
            im_end_token_id=_id(tok, COMMON['eos_token'])))
        patch = 16
    else:
        from transformers.models.qwen2_5_omni import (Qwen2_5OmniConfig,
                                                      Qwen2_5OmniForConditionalGeneration)
        vision.update(patch_size=14, window_size=112, fullatt_block_indexes=[0])
        thinker = {'audio_config': audio, 'vision_config': vision, 'text_config': text,
                   'audio_token_index': ids['audio'], 'image_token_index': ids['image'],
                   'video_token_index': ids['video'], 'audio_start_token_id': ids['audio_start'],
                   'audio_end_token_id': _id(tok, fam.audio[2]),
                   'vision_start_token_id': ids['vision_start'],
                   'vision_end_token_id': _id(tok, fam.image[2])}
        model = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(
            thinker_config=thinker, enable_audio_output=False))
        out.mkdir(parents=True, exist_ok=True)
        torch.save({}, out / 'spk_dict.pt')   # the published directory has its voices here
        patch = 14
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    features = WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=16000,
                                       hop_length=160, chunk_length=30, n_fft=400)
    side = 2 * patch   # patch x merge: the image is resized to a multiple of this
    images = Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=2,
                                      size={'shortest_edge': side * side,
                                            'longest_edge': 4 * side * 4 * side})
    # One preprocessor_config.json holds both, as in the published directories.
    (out / 'preprocessor_config.json').write_text(
        json.dumps({**features.to_dict(), **images.to_dict()}, indent=1))
    (out / 'chat_template.json').write_text(json.dumps({'chat_template':
                                                        chat_template_for(fam)}))
    return out
