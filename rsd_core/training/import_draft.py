"""`rsd import-draft SRC.pt --out DIR [--main BUNDLE]`: a draft checkpoint of the original system
as a safetensors draft of this project (v1, layout 'shared').

The original format is a `torch.save` dict: `model_state_dict` (an `RFSQDraftModelWithProjection`:
input projection H -> 512, one pre-norm `nn.TransformerDecoderLayer` with 8 heads, FFN 2048,
GELU, a learned positional encoding [1, S, 512], an output LayerNorm and N heads 512 -> 256 ->
GELU -> LayerNorm -> 128 x 7), `optimizer_state_dict`, `epoch`, `val_accuracy`.

Reading: `torch.load(weights_only=True)` and nothing else. Its unpickler builds only tensors,
numbers, strings and containers; a file that names any other Python object (a class, a function,
a `__reduce__` payload) is refused before that object is built, so nothing in it runs. The
original loader unpickled without that restriction, which runs whatever the file says.

The original forward reads ONE position: x = input_projection(h0) + position_encoding[0], then
decoder_layer(x, x) (self- and cross-attention to itself, no mask), output_norm, and every head
reads that vector. `DraftModel` holds this exactly as layout 'shared'. Key mapping:

    input_projection.{weight,bias}       -> input_proj.{weight,bias}
    decoder.decoder_layer.<name>         -> decoder.<name>   (the same nn.TransformerDecoderLayer)
    decoder.position_encoding [1, S, d]  -> pos_embedding [1, d]   (row 0, the only one read)
    decoder.output_norm.*                -> norm.*
    classification_heads.<n>.*           -> heads.<n - dropped>.*   (Linear, GELU, LayerNorm,
                                                                     Linear: same indices)

The original trains head n on RFSQ layer n (L0..L2). Here layer 0 comes free from the main's
prefill, so by default (first_layer 0) head 0 is dropped (dropped = 1) and heads 1.. propose
layers 1..; `--first-layer 1` keeps every head (dropped = 0), for checkpoints whose heads were
trained on layers 1..N.
"""

import argparse
from dataclasses import asdict
import json
import logging
from pathlib import Path
import pickle
import re

import torch

from rsd_core.bundle import load_bundle_manifest
from rsd_core.checkpoint import CheckpointError, file_sha256, key_problems, non_finite_keys
from rsd_core.draft import MAX_PROPOSALS, DraftConfig, DraftModel, expected_shapes

logger = logging.getLogger(__name__)

ORIGINAL = 'RFSQDraftModelWithProjection (torch.save dict)'
ORIGINAL_PROJECTION = ('input_projection.weight', 'input_projection.bias')
HEAD_KEY = re.compile(r'classification_heads\.(\d+)\.')


def read_original(path: Path) -> dict:
    """The checkpoint dict, read with weights_only=True (CheckpointError when refused)."""
    if not path.is_file():
        raise CheckpointError(f'{path}: not found')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()
                       if 'Unsupported' in line), str(exc).splitlines()[0])
        raise CheckpointError(
            f'{path}: refused: reading it needs arbitrary unpickling ({detail}). Only tensors, '
            'numbers, strings, lists and dicts are read (torch.load weights_only=True); the '
            'object it names was not built and nothing in the file was run. Re-save it with '
            'plain types (model_state_dict, epoch, val_accuracy as numbers)') from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f'{path}: not a readable torch.save checkpoint ({exc})') from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('model_state_dict'),
                                                          dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f'{path}: not the original draft format: expected a dict with '
                              f'"model_state_dict", found {found}')
    state = checkpoint['model_state_dict']
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f'{path}: model_state_dict entries that are not tensors: '
                              f'{not_tensors[:5]}')
    return checkpoint


def source_config(state: dict, n_heads: int, first_layer: int, codes_per_layer: int,
                  levels: int) -> DraftConfig:
    """The DraftConfig (layout 'shared') of an original state dict, from its shapes."""
    missing = [k for k in ORIGINAL_PROJECTION if k not in state]
    if missing:
        raise CheckpointError(
            'input projection weights missing: ' + ', '.join(missing) + ' (the original '
            'loader silently used a random projection here; a draft without its trained '
            'projection only produces noise, so it is not imported)')
    proj = state['input_projection.weight']
    heads = sorted({int(m.group(1)) for k in state if (m := HEAD_KEY.match(k))})
    first_linear = state.get('classification_heads.0.0.weight')
    ffn = state.get('decoder.decoder_layer.linear1.weight')
    if proj.dim() != 2 or first_linear is None or first_linear.dim() != 2 or ffn is None \
            or ffn.dim() != 2:
        raise CheckpointError('cannot read the sizes: expected input_projection.weight [d, H], '
                              'decoder.decoder_layer.linear1.weight [F, d] and '
                              'classification_heads.0.0.weight [h, d] (2-D)')
    if heads != list(range(len(heads))):
        raise CheckpointError(f'classification heads numbered {heads}; expected 0..N-1')
    k = len(heads) - dropped_heads(first_layer)
    if not 1 <= k <= MAX_PROPOSALS:
        raise CheckpointError(f'{len(heads)} classification heads with first_layer '
                              f'{first_layer} leave {k} proposals; 1..{MAX_PROPOSALS} needed')
    try:
        return DraftConfig(hidden_size=int(proj.shape[1]), d_model=int(proj.shape[0]),
                           n_heads=n_heads, ffn=int(ffn.shape[0]), num_proposals=k,
                           head_hidden=int(first_linear.shape[0]),
                           codes_per_layer=codes_per_layer, levels=levels, layout='shared')
    except ValueError as exc:
        raise CheckpointError(f'unusable sizes: {exc}') from exc


def dropped_heads(first_layer: int) -> int:
    """Original heads not kept: the one trained on layer 0, when there is one."""
    return 1 - first_layer


def original_name(key: str, first_layer: int) -> str:
    """The original state-dict name of a DraftModel (layout 'shared') key."""
    if key.startswith('input_proj.'):
        return key.replace('input_proj.', 'input_projection.', 1)
    if key == 'pos_embedding':
        return 'decoder.position_encoding'
    if key.startswith('norm.'):
        return key.replace('norm.', 'decoder.output_norm.', 1)
    if key.startswith('decoder.'):
        return key.replace('decoder.', 'decoder.decoder_layer.', 1)
    head, rest = key.removeprefix('heads.').split('.', 1)
    return f'classification_heads.{int(head) + dropped_heads(first_layer)}.{rest}'


def original_shapes(config: DraftConfig, first_layer: int,
                    positions: int) -> dict[str, tuple[int, ...]]:
    """Every key the original state dict must hold, with its shape (dropped heads included)."""
    ours = expected_shapes(config)
    shapes = {original_name(k, first_layer): v for k, v in ours.items()}
    shapes['decoder.position_encoding'] = (1, positions, config.d_model)
    for key, shape in ours.items():
        if key.startswith('heads.0.'):
            for dropped in range(dropped_heads(first_layer)):
                shapes[f'classification_heads.{dropped}.{key.removeprefix("heads.0.")}'] = shape
    return shapes


def converted(state: dict, config: DraftConfig, first_layer: int) -> dict[str, torch.Tensor]:
    """The DraftModel state dict of a checked original state dict."""
    tensors = {k: state[original_name(k, first_layer)] for k in expected_shapes(config)}
    tensors['pos_embedding'] = state['decoder.position_encoding'][0, :1]  # [1, d]
    return {k: v.detach().float().contiguous() for k, v in tensors.items()}


def check_state(state: dict, config: DraftConfig, first_layer: int) -> None:
    """CheckpointError naming every missing, unexpected, mis-shaped or non-finite key."""
    encoding = state.get('decoder.position_encoding')
    positions = int(encoding.shape[1]) if encoding is not None and encoding.dim() == 3 \
        and encoding.shape[1] >= 1 else 1
    problems = key_problems(state, original_shapes(config, first_layer, positions),
                            note=f' (original {ORIGINAL}, hidden {config.hidden_size}, d_model '
                                 f'{config.d_model}, C x V = {config.codes_per_layer} x '
                                 f'{config.levels})')
    not_float = sorted(k for k, v in state.items() if not v.is_floating_point())
    if not_float:
        problems.append(f'non-floating-point tensors {not_float}')
    bad = non_finite_keys(state)
    if bad:
        problems.append(f'non-finite values (NaN/Inf) in {bad}')
    if problems:
        raise CheckpointError('; '.join(problems))


def number(value: object) -> float | int | None:
    """A recorded epoch / accuracy as a plain number (tensors of one value too), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def main_sizes(bundle: Path) -> dict:
    """hidden_size, codes_per_layer, levels and weights_sha256 of a main bundle's manifest."""
    manifest = load_bundle_manifest(bundle)
    return {'dir': str(bundle.resolve()), **{k: manifest.get(k) for k in (
        'hidden_size', 'codes_per_layer', 'levels', 'weights_sha256')}}


def import_draft(source: str | Path, out_dir: str | Path, main_dir: str | Path | None = None,
                 n_heads: int = 8, first_layer: int = 0, force: bool = False) -> dict:
    """Check and convert an original checkpoint, write out_dir/draft.{safetensors,json};
    return a summary (CheckpointError when anything is wrong: nothing is written then)."""
    source, out_dir = Path(source), Path(out_dir)
    if first_layer not in (0, 1):
        raise ValueError(f'first_layer must be 0 (heads trained on L0..) or 1, got {first_layer}')
    if (out_dir / 'draft.safetensors').exists() and not force:
        raise CheckpointError(f'{out_dir}: already holds a draft (use --force to replace it)')
    main = main_sizes(Path(main_dir)) if main_dir else None
    codes, levels = (main['codes_per_layer'], main['levels']) if main else (128, 7)
    checkpoint = read_original(source)
    state = checkpoint['model_state_dict']
    try:
        config = source_config(state, n_heads, first_layer, codes, levels)
        check_state(state, config, first_layer)
    except CheckpointError as exc:
        raise CheckpointError(f'{source}: {exc}') from exc
    if main and config.hidden_size != main['hidden_size']:
        shape = list(state[ORIGINAL_PROJECTION[0]].shape)
        raise CheckpointError(f'{source}: input projection takes width {config.hidden_size} '
                              f'(input_projection.weight {shape}), but the main model '
                              f'{main["dir"]} has hidden size {main["hidden_size"]}')
    model = DraftModel(config)
    model.load_state_dict(converted(state, config, first_layer), strict=True)
    heads = config.num_proposals + dropped_heads(first_layer)
    imported = {'source': str(source.resolve()), 'source_sha256': file_sha256(source),
                'original_format': ORIGINAL, 'epoch': number(checkpoint.get('epoch')),
                'val_accuracy': number(checkpoint.get('val_accuracy')),
                'source_heads': heads, 'first_layer': first_layer,
                'dropped_heads': list(range(dropped_heads(first_layer))),
                'ignored_entries': sorted(k for k in checkpoint if k != 'model_state_dict'),
                'checked_against_main': main}
    model.save(out_dir, {'trained': True, 'main_weights_sha256': None,
                         'metrics': {'original_val_accuracy': imported['val_accuracy']},
                         'imported': imported})
    DraftModel.load(out_dir, config.hidden_size)      # what was written reads back validated
    logger.info('imported %s -> %s', source, out_dir)
    return {'out': str(out_dir), 'config': asdict(config), 'imported': imported}


def format_summary(summary: dict) -> str:
    """Two lines: what was read (epoch, val_accuracy) and what was written."""
    imported, config = summary['imported'], summary['config']
    dropped = imported['dropped_heads']
    main = imported['checked_against_main']
    return (f'read {imported["source"]} ({ORIGINAL}): epoch {imported["epoch"]}, val_accuracy '
            f'{imported["val_accuracy"]} (as recorded by the original training)\n'
            f'wrote {summary["out"]}: v1 seed draft, imported (layout shared), hidden '
            f'{config["hidden_size"]}, d_model {config["d_model"]}, proposals for layers '
            f'1..{config["num_proposals"]}'
            + (f' (source head {dropped[0]}, layer 0, dropped: the main gives layer 0)'
               if dropped else '')
            + (f'; input width matches main {main["dir"]}' if main else
               '; no --main given: input width not checked against a main model')
            + '; no main weights hash recorded (strict provenance will refuse it)')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd import-draft` options."""
    parser.add_argument('source', help=f'original checkpoint ({ORIGINAL})')
    parser.add_argument('--out', required=True, help='draft output directory')
    parser.add_argument('--main', default=None,
                        help='main bundle whose hidden size the input width must equal')
    parser.add_argument('--heads', type=int, default=8,
                        help='attention heads of the decoder layer (the original uses 8)')
    parser.add_argument('--first-layer', type=int, default=0, choices=(0, 1),
                        help='RFSQ layer of the first classification head (original: 0; its '
                             'head is dropped since the main gives layer 0)')
    parser.add_argument('--force', action='store_true', help='replace a draft in --out')
    parser.add_argument('--json', action='store_true', help='print the summary as JSON')


def run(args: argparse.Namespace) -> int:
    """`rsd import-draft`: convert, print the summary; exit 1 (nothing written) on refusal."""
    try:
        summary = import_draft(args.source, args.out, args.main, n_heads=args.heads,
                               first_layer=args.first_layer, force=args.force)
    except (CheckpointError, ValueError) as exc:
        logger.error('%s', exc)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
