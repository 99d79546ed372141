"""`rsd import-draft`: the original checkpoint format imported exactly, and refused safely.

The reference module below is written in the test from the published architecture of the
original system (`RFSQDraftModelWithProjection`: the same attribute names, hence the same
state-dict keys), small (hidden 64) for speed; its checkpoint is made with torch.save like the
original training script's.
"""

import json
import logging

import pytest
import torch
from torch import nn

from rsd_core.checkpoint import CheckpointError
from rsd_core.draft import DraftModel
from rsd_core.inspect_checkpoint import inspect_path
from rsd_ros.cli import main as rsd

HIDDEN = 64


class OriginalDecoder(nn.Module):
    """The original `DraftTransformerDecoder`."""

    def __init__(self, hidden_dim=512, num_heads=8, feedforward_dim=2048, max_seq_length=256):
        super().__init__()
        self.decoder_layer = nn.TransformerDecoderLayer(
            d_model=hidden_dim, nhead=num_heads, dim_feedforward=feedforward_dim, dropout=0.1,
            activation='gelu', batch_first=True, norm_first=True)
        self.position_encoding = nn.Parameter(torch.randn(1, max_seq_length, hidden_dim) * 0.02)
        self.output_norm = nn.LayerNorm(hidden_dim)

    def forward(self, hidden_states):
        seq_len = hidden_states.shape[1]
        hidden_states = hidden_states + self.position_encoding[:, :seq_len, :]
        return self.output_norm(self.decoder_layer(hidden_states, hidden_states))


class OriginalDraft(nn.Module):
    """The original `RFSQDraftModelWithProjection` (heads predict layers 0..N-1)."""

    def __init__(self, input_dim=4096, hidden_dim=512, num_coarse_layers=3, chunk_len=8,
                 action_hidden_dim=16, grid_size=7, num_heads=8, feedforward_dim=2048):
        super().__init__()
        self.codes, self.grid_size = chunk_len * action_hidden_dim, grid_size
        self.input_projection = nn.Linear(input_dim, hidden_dim)
        self.decoder = OriginalDecoder(hidden_dim, num_heads, feedforward_dim)
        self.classification_heads = nn.ModuleList([nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.GELU(), nn.LayerNorm(hidden_dim // 2),
            nn.Linear(hidden_dim // 2, self.codes * grid_size)) for _ in range(num_coarse_layers)])

    def forward(self, hidden):
        x = self.decoder(self.input_projection(hidden).unsqueeze(1)).squeeze(1)
        return torch.stack([head(x).view(len(hidden), self.codes, self.grid_size)
                            for head in self.classification_heads], dim=1)


def perturbed(model: nn.Module) -> nn.Module:
    """Every parameter moved off its initial value (LayerNorms are 1/0 at init: a mapping
    that swapped two norms would go unnoticed otherwise)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def original_checkpoint(path, input_dim=HIDDEN, state=None, **extra):
    torch.manual_seed(0)
    model = perturbed(OriginalDraft(input_dim=input_dim))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, input_dim)).sum().backward()
    optimizer.step()                                   # a real optimizer state, as saved
    torch.save({'model_state_dict': state(model.state_dict()) if state else model.state_dict(),
                'optimizer_state_dict': optimizer.state_dict(), 'epoch': 37,
                'val_accuracy': 0.912, **extra}, path)
    return model


@pytest.mark.parametrize('first_layer', [0, 1])
def test_import_gives_the_original_logits(tmp_path, capsys, first_layer):
    source = tmp_path / 'best_draft_with_projection.pt'
    original = original_checkpoint(source)
    out = tmp_path / 'draft'
    assert rsd(['import-draft', str(source), '--out', str(out),
                '--first-layer', str(first_layer)]) == 0
    text = capsys.readouterr().out
    assert 'epoch 37' in text and 'val_accuracy 0.912' in text
    draft = DraftModel.load(out, HIDDEN, dtype=torch.float64)
    h0 = torch.randn(16, HIDDEN, dtype=torch.float64)
    expected = original.double()(h0)                   # [B, 3, C, V], heads for layers 0..2
    if first_layer == 0:
        expected = expected[:, 1:]                      # layer 0 comes free from the main
    assert draft.num_proposals == expected.shape[1]
    torch.testing.assert_close(draft(h0), expected, rtol=1e-12, atol=1e-12)
    manifest = json.loads((out / 'draft.json').read_text())
    imported = manifest['provenance']['imported']
    assert imported['epoch'] == 37 and imported['val_accuracy'] == pytest.approx(0.912)
    assert imported['dropped_heads'] == ([0] if first_layer == 0 else [])
    assert manifest['provenance']['main_weights_sha256'] is None
    assert manifest['config']['layout'] == 'shared'


def test_import_against_a_main_and_strict_provenance(tiny_bundle, tmp_path, capsys, caplog):
    hidden = json.loads((tiny_bundle / 'manifest.json').read_text())['hidden_size']
    source = tmp_path / 'original.pt'
    original_checkpoint(source, input_dim=hidden)
    out = tmp_path / 'draft'
    assert rsd(['import-draft', str(source), '--out', str(out), '--main', str(tiny_bundle),
                '--json']) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['imported']['checked_against_main']['hidden_size'] == hidden
    report = inspect_path(out, {'dir': str(tiny_bundle), 'hidden_size': hidden,
                                'weights_sha256': 'f' * 64})
    assert report.components[0].facts['draft_kind'] == 'v1 seed, imported'
    assert not report.problems
    with pytest.raises(CheckpointError, match=r'imported from .*records no main weights '
                                              r'sha256.*strict provenance needs a draft '
                                              r'distilled from it'):
        DraftModel.load(out, hidden, main_weights_hash='f' * 64, strict_provenance=True)
    with caplog.at_level(logging.WARNING, logger='rsd_core.draft'):
        DraftModel.load(out, hidden, main_weights_hash='f' * 64)
    assert any('records no main weights sha256' in r.getMessage() for r in caplog.records)


def test_wrong_width_is_refused(tiny_bundle, tmp_path, caplog):
    source = tmp_path / 'original.pt'
    original_checkpoint(source, input_dim=96)
    with caplog.at_level(logging.ERROR):
        assert rsd(['import-draft', str(source), '--out', str(tmp_path / 'draft'),
                    '--main', str(tiny_bundle)]) == 1
    assert any('input projection takes width 96' in r.getMessage() and 'hidden size'
               in r.getMessage() for r in caplog.records)
    assert not (tmp_path / 'draft').exists()


def test_missing_projection_is_refused_naming_it(tmp_path, caplog):
    source = tmp_path / 'original.pt'
    original_checkpoint(source, state=lambda s: {k: v for k, v in s.items()
                                                 if not k.startswith('input_projection')})
    with caplog.at_level(logging.ERROR):
        assert rsd(['import-draft', str(source), '--out', str(tmp_path / 'draft')]) == 1
    message = ' '.join(r.getMessage() for r in caplog.records)
    assert 'input projection weights missing: input_projection.weight, input_projection.bias' \
        in message
    assert not (tmp_path / 'draft').exists()


@pytest.mark.parametrize('change, expected', [
    (lambda s: {**s, 'decoder.decoder_layer.linear2.weight': torch.zeros(64, 7)},
     r'decoder.decoder_layer.linear2.weight: shape \[64, 7\], expected \[512, 2048\]'),
    (lambda s: {k: v for k, v in s.items() if k != 'decoder.output_norm.bias'},
     r"missing keys \['decoder.output_norm.bias'\]"),
    (lambda s: {**s, 'decoder.extra': torch.zeros(1)}, r"unexpected keys \['decoder.extra'\]"),
    (lambda s: {**s, 'classification_heads.0.3.weight': torch.zeros(5, 256)},
     r'classification_heads.0.3.weight: shape \[5, 256\], expected \[896, 256\]'),
    (lambda s: {**s, 'input_projection.bias': torch.full((512,), float('nan'))},
     r"non-finite values \(NaN/Inf\) in \['input_projection.bias'\]"),
])
def test_every_key_and_shape_is_checked(tmp_path, change, expected):
    from rsd_core.training.import_draft import import_draft

    source = tmp_path / 'original.pt'
    original_checkpoint(source, state=change)
    with pytest.raises(CheckpointError, match=expected):
        import_draft(source, tmp_path / 'draft')
    assert not (tmp_path / 'draft').exists()


class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("ran")',)


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, caplog):
    marker = tmp_path / 'pwned.txt'
    source = tmp_path / 'evil.pt'
    original_checkpoint(source, trainer_hook=Payload(marker))
    assert not marker.exists()
    with caplog.at_level(logging.ERROR):
        assert rsd(['import-draft', str(source), '--out', str(tmp_path / 'draft')]) == 1
    message = ' '.join(r.getMessage() for r in caplog.records)
    assert 'refused: reading it needs arbitrary unpickling' in message
    assert 'nothing in the file was run' in message
    assert not marker.exists()
    assert not (tmp_path / 'draft').exists()
