"""PromptProcessor and MainModel on the real tiny LLaVA bundle (transformers, no mocks)."""

import json
import logging
from pathlib import Path
import shutil

import numpy as np
import pytest
import torch

from rsd_core.checkpoint import CheckpointError, load_tensors, save_component
from rsd_core.main_model import MainModel
from rsd_core.processor import CLIP_MEAN, CLIP_STD, SPECIAL_TOKENS, instruction_vocabulary

INSTRUCTION = 'pick up the black bowl between the plate and the ramekin and place it on the plate'


@pytest.fixture(scope='module')
def model64(tiny_bundle):
    return MainModel.from_dir(tiny_bundle, dtype=torch.float64)


@pytest.fixture(scope='module')
def model32(tiny_bundle):
    return MainModel.from_dir(tiny_bundle, dtype='float32')


def image(seed=0, size=(128, 128)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def random_codes(model, batch, k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.levels, (batch, k, model.codes_per_layer), generator=generator)


# ---------------------------------------------------------------- processor

def test_processor_builds_llava_inputs(model32):
    processor = model32.processor
    inputs = processor([image(size=(96, 160))], [INSTRUCTION])
    ids, pixels = inputs['input_ids'], inputs['pixel_values']
    n = processor.num_image_tokens
    assert n == (model32.backbone.config.vision_config.image_size // 28) ** 2
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert ids[0, 0] == processor.bos_id
    assert (ids[0, 1:1 + n] == processor.image_id).all()
    text = processor.tokenizer.convert_ids_to_tokens(ids[0, 1 + n:].tolist())
    assert text == ['in', ':', 'what', 'action', 'should', 'the', 'robot', 'take', 'to',
                    *INSTRUCTION.split(), '?', 'out', ':']
    size = processor.image_size
    assert pixels.shape == (1, 3, size, size) and pixels.dtype == torch.float32


def test_processor_normalises_like_clip(model32):
    flat = np.full((50, 70, 3), (255, 0, 128), dtype=np.uint8)
    pixels = model32.processor([flat], ['open the drawer'])['pixel_values'][0]
    rgb = (1.0, 0.0, 128 / 255)
    expected = [(v - m) / s for v, m, s in zip(rgb, CLIP_MEAN, CLIP_STD, strict=True)]
    assert torch.allclose(pixels.mean((1, 2)), torch.tensor(expected), atol=1e-5)
    assert torch.allclose(pixels.std((1, 2)), torch.zeros(3), atol=1e-5)


def test_processor_accepts_views_and_read_only_arrays(model32):
    picture = image(7, size=(64, 48))
    flipped = picture[::-1, ::-1]
    read_only = picture.copy()
    read_only.flags.writeable = False
    pixels = [model32.processor([im], ['open the drawer'])['pixel_values']
              for im in (flipped, np.ascontiguousarray(flipped), read_only, picture)]
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[2], pixels[3])
    assert not torch.equal(pixels[0], pixels[3])


@pytest.mark.parametrize('bad, message', [
    (np.zeros((32, 32), np.uint8), r'shape \[32, 32\]; expected \[H, W, 3\]'),
    (np.zeros((32, 32, 4), np.uint8), r'shape \[32, 32, 4\]'),
    (np.zeros((0, 32, 3), np.uint8), 'zero size'),
    (np.zeros((32, 32, 3), np.float32), 'dtype float32; expected uint8'),
    (np.full((32, 32, 3), np.nan, np.float32), 'NaN or Inf'),
    (np.zeros((32, 32, 3), np.int16), 'dtype int16'),
    ([[0, 0, 0]], 'numpy array'),
])
def test_processor_rejects_malformed_images(model32, bad, message):
    with pytest.raises(ValueError, match=message):
        model32.processor([bad], [INSTRUCTION])


@pytest.mark.parametrize('instruction', ['', '   \n\t'])
def test_processor_rejects_empty_instruction(model32, instruction):
    with pytest.raises(ValueError, match='instruction is empty'):
        model32.processor([image()], [instruction])


def test_processor_rejects_mismatched_batch(model32):
    with pytest.raises(ValueError, match='as many images as instructions'):
        model32.processor([image(), image(1)], [INSTRUCTION])
    with pytest.raises(ValueError, match='different lengths'):
        model32.processor([image(), image(1)], ['open the drawer', INSTRUCTION])


def test_unknown_words_map_to_unk_and_warn_once(model32, caplog):
    processor = model32.processor
    instruction = 'pick up the zorblax and place it in the quuxbin'
    with caplog.at_level(logging.WARNING, logger='rsd_core.processor'):
        ids = processor([image()], [instruction])['input_ids']
        processor([image()], [instruction])
    assert (ids == processor.unk_id).sum() == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and 'zorblax, quuxbin' in warnings[0]


def test_instruction_cannot_inject_special_tokens(model32):
    processor = model32.processor
    ids = processor([image()], ['put <image> on the <s> plate'])['input_ids']
    assert (ids == processor.image_id).sum() == processor.num_image_tokens
    assert (ids == processor.bos_id).sum() == 1


def test_tokenizer_vocabulary_covers_libero_words(model32):
    vocab = model32.processor.tokenizer.get_vocab()
    words = instruction_vocabulary()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert all(w in vocab for w in words)
    assert {'ramekin', 'moka', 'caddy', 'ketchup', 'odd1'} <= set(words)
    assert model32.processor.unknown_words(INSTRUCTION + ' (yellow plate)') == []


# ---------------------------------------------------------------- model

def test_from_dir_records_manifest_and_is_frozen(tiny_bundle, model32):
    manifest = json.loads((tiny_bundle / 'manifest.json').read_text())
    assert model32.weights_hash == manifest['weights_sha256'] != ''
    assert model32.hidden_size == manifest['hidden_size']
    assert (model32.num_layers, model32.codes_per_layer, model32.levels) == (8, 128, 7)
    assert not model32.training and not any(p.requires_grad for p in model32.parameters())
    assert model32.processor.tokenizer.is_fast


def test_prefill_shapes_and_head_on_hidden_state(model32):
    inputs = model32.processor([image()], [INSTRUCTION])
    with torch.inference_mode():
        cache, h0, logits0 = model32.prefill(inputs)
        hidden = model32.backbone.model(**inputs).last_hidden_state
    assert h0.shape == (1, model32.hidden_size)
    assert logits0.shape == (1, 128, 7)
    assert model32.cache_length(cache) == inputs['input_ids'].shape[1]
    assert torch.allclose(h0, hidden[:, -1], atol=1e-6)
    assert torch.allclose(logits0, model32.rfsq_head(hidden[:, -1]), atol=1e-6)


def run_single_steps(model, cache, codes, first_layer):
    logits = [model.forward_layers(cache, codes[:, i:i + 1], first_layer + i)[0]
              for i in range(codes.shape[1])]
    return torch.cat(logits, dim=1)  # [B, k, C, V]


@pytest.mark.parametrize('dtype_name, tolerance', [('model64', 1e-9), ('model32', 1e-4)])
def test_k_positions_in_one_pass_equal_k_single_steps(request, dtype_name, tolerance):
    model = request.getfixturevalue(dtype_name)
    inputs = model.processor([image(3)], [INSTRUCTION])
    codes = random_codes(model, 1, 4)
    with torch.inference_mode():
        cache, _, _ = model.prefill(inputs)
        prompt = model.cache_length(cache)
        logits_k, hidden_k = model.forward_layers(cache, codes, first_layer=0)
        assert logits_k.shape == (1, 4, 128, 7) and hidden_k.shape == (1, 4, model.hidden_size)
        assert model.cache_length(cache) == prompt + 4
        model.crop(cache, prompt)
        logits_1 = run_single_steps(model, cache, codes, 0)
    assert (logits_k - logits_1).abs().max() < tolerance
    assert logits_k.abs().max() > 1e-3


def test_crop_then_refeed_reproduces_logits(model64):
    inputs = model64.processor([image(4)], [INSTRUCTION])
    codes = random_codes(model64, 1, 3, seed=1)
    with torch.inference_mode():
        cache, _, _ = model64.prefill(inputs)
        prompt = model64.cache_length(cache)
        first, _ = model64.forward_layers(cache, codes, first_layer=2)
        model64.crop(cache, prompt + 1)
        assert model64.cache_length(cache) == prompt + 1
        again, _ = model64.forward_layers(cache, codes[:, 1:], first_layer=3)
        other = codes[:, 1:].clone()
        other[..., 0] = (other[..., 0] + 1) % 7
        model64.crop(cache, prompt + 1)
        changed, _ = model64.forward_layers(cache, other, first_layer=3)
    assert (first[:, 1:] - again).abs().max() < 1e-12
    assert (first[:, 1:] - changed).abs().max() > 1e-6


def test_crop_and_codes_are_validated(model32):
    inputs = model32.processor([image()], [INSTRUCTION])
    with torch.inference_mode():
        cache, _, _ = model32.prefill(inputs)
        length = model32.cache_length(cache)
        with pytest.raises(ValueError, match='cannot crop'):
            model32.crop(cache, length + 1)
        with pytest.raises(ValueError, match=r'expected \[B, k >= 1, 128\]'):
            model32.forward_layers(cache, torch.zeros(1, 2, 64, dtype=torch.long), 0)
        with pytest.raises(ValueError, match='outside 0..6'):
            model32.forward_layers(cache, torch.full((1, 1, 128), 7), 0)
        with pytest.raises(ValueError, match='outside 0..7'):
            model32.forward_layers(cache, torch.zeros(1, 2, 128, dtype=torch.long), 7)
        with pytest.raises(ValueError, match='torch.long'):
            model32.forward_layers(cache, torch.zeros(1, 1, 128), 0)
        assert model32.cache_length(cache) == length


def test_batch_of_two_matches_single_runs(model64):
    images, instructions = [image(5), image(6)], ['put the bowl on the plate',
                                                   'put the bowl on the stove']
    codes = random_codes(model64, 2, 3, seed=2)
    with torch.inference_mode():
        cache, h0, logits0 = model64.prefill(model64.processor(images, instructions))
        logits, hidden = model64.forward_layers(cache, codes, first_layer=0)
        assert h0.shape == (2, model64.hidden_size) and logits.shape == (2, 3, 128, 7)
        for row in range(2):
            cache1, h1, l1 = model64.prefill(model64.processor([images[row]],
                                                               [instructions[row]]))
            logits1, _ = model64.forward_layers(cache1, codes[row:row + 1], first_layer=0)
            assert (h0[row] - h1[0]).abs().max() < 1e-9
            assert (logits[row] - logits1[0]).abs().max() < 1e-9
    assert (logits0[0] - logits0[1]).abs().max() > 1e-6


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_dtypes_run(tiny_bundle, dtype):
    model = MainModel.from_dir(tiny_bundle, device='cpu', dtype=dtype)
    assert model.dtype == dtype and model.backbone.dtype == dtype
    with torch.inference_mode():
        cache, h0, logits0 = model.prefill(model.processor([image()], [INSTRUCTION]))
        logits, _ = model.forward_layers(cache, logits0.argmax(-1)[:, None], 0)
    assert h0.dtype == dtype and torch.isfinite(logits).all()


def test_loading_in_emulated_bfloat16_warns(tiny_bundle, tmp_path, monkeypatch, caplog):
    import rsd_core.cpu_features as cpu_features

    cpuinfo = tmp_path / 'cpuinfo'
    monkeypatch.setattr(cpu_features, 'CPUINFO', cpuinfo)
    with caplog.at_level(logging.WARNING, logger='rsd_core.main_model'):
        cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n')
        MainModel.from_dir(tiny_bundle, dtype=torch.bfloat16)
        assert 'bfloat16 is emulated' in caplog.text
        caplog.clear()
        MainModel.from_dir(tiny_bundle, dtype=torch.float32)
        cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n')
        MainModel.from_dir(tiny_bundle, dtype=torch.bfloat16)
    assert 'emulated' not in caplog.text


def test_unsupported_dtype_or_device_is_refused(tiny_bundle):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        MainModel.from_dir(tiny_bundle, dtype='int8')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            MainModel.from_dir(tiny_bundle, device='cuda:0')


# ---------------------------------------------------------------- refused bundles

@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / 'bundle'))


def test_missing_heads_file_is_refused(bundle_copy):
    (bundle_copy / 'heads.safetensors').unlink()
    with pytest.raises(CheckpointError, match=r'heads.safetensors: weights file not found'):
        MainModel.from_dir(bundle_copy)


def test_missing_backbone_weights_are_refused(bundle_copy):
    (bundle_copy / 'backbone' / 'model.safetensors').unlink()
    with pytest.raises(CheckpointError, match=r'missing \[.\*\.safetensors weights'):
        MainModel.from_dir(bundle_copy)


def test_missing_manifest_is_refused(bundle_copy):
    (bundle_copy / 'manifest.json').unlink()
    with pytest.raises(CheckpointError, match='manifest.json: manifest not found'):
        MainModel.from_dir(bundle_copy)


def test_heads_of_another_hidden_size_are_refused(bundle_copy):
    manifest = json.loads((bundle_copy / 'heads.json').read_text())
    tensors = {k: torch.zeros(*v.shape[:-1], 32) if v.shape[-1] == manifest['hidden_size']
               else v for k, v in load_tensors(bundle_copy / 'heads.safetensors').items()}
    save_component(bundle_copy, 'heads', tensors, dict(manifest, hidden_size=32))
    with pytest.raises(CheckpointError, match='heads were built for hidden size 32, the '
                                              'backbone has 64'):
        MainModel.from_dir(bundle_copy)
    save_component(bundle_copy, 'heads', tensors, manifest)
    with pytest.raises(CheckpointError, match=r'rfsq_head.proj.weight: shape \[896, 32\], '
                                              r'expected \[896, 64\]'):
        MainModel.from_dir(bundle_copy)


def test_non_finite_head_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / 'heads.json').read_text())
    tensors = load_tensors(bundle_copy / 'heads.safetensors')
    tensors['layer_embedding.layer.weight'][3, 5] = float('nan')
    save_component(bundle_copy, 'heads', tensors, manifest)
    with pytest.raises(CheckpointError, match=r"non-finite values in \['layer_embedding.layer"):
        MainModel.from_dir(bundle_copy)


def test_manifest_disagreeing_with_backbone_is_refused(bundle_copy):
    path = bundle_copy / 'manifest.json'
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(manifest, hidden_size=128)))
    with pytest.raises(CheckpointError, match='hidden_size 128 but the backbone language model '
                                              'has 64'):
        MainModel.from_dir(bundle_copy)
    path.write_text(json.dumps(dict(manifest, format='rsd-draft')))
    with pytest.raises(CheckpointError, match="expected format 'rsd-main-bundle'"):
        MainModel.from_dir(bundle_copy)
    del manifest['weights_sha256']
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match='weights_sha256 missing'):
        MainModel.from_dir(bundle_copy)


def test_heads_for_other_token_shapes_are_refused(bundle_copy):
    manifest = json.loads((bundle_copy / 'heads.json').read_text())
    tensors = load_tensors(bundle_copy / 'heads.safetensors')
    save_component(bundle_copy, 'heads', tensors, dict(manifest, levels=5))
    with pytest.raises(CheckpointError, match='levels 5, the bundle manifest says 7'):
        MainModel.from_dir(bundle_copy)
