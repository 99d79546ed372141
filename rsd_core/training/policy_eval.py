"""Held-out metrics of a behaviour-cloning run, and the reference points they are read against.

`evaluate` scores the model without augmentation: teacher-forced loss and token accuracy per
layer, and the action L1 error of main-only greedy decoding (`rsd_core.engine.greedy_trace`,
exactly the engine's decoding) against the demo chunks. `baselines` gives what a model that
ignores its input would reach.
"""

import numpy as np
import torch

from rsd_core.engine import greedy_trace
from rsd_core.main_model import MainModel
from rsd_core.tokenizer import ActionTokenizer, codes_to_tokens
from rsd_core.training.demo_dataset import DemoData
from rsd_core.training.objective import layer_cross_entropy, most_frequent_codes, token_accuracy
from rsd_core.training.teacher_forcing import autocast, teacher_forced_logits


@torch.no_grad()
def evaluate_policy(model: MainModel, tokenizer: ActionTokenizer, data: DemoData,
             batches: list[np.ndarray], dtype: str = 'float32') -> dict:
    """Held-out metrics without augmentation: teacher-forced loss and token accuracy per layer,
    and the action L1 error (action units) of greedy decoding against the demo chunks."""
    was_training = model.training
    model.eval()
    losses, correct, errors, count = 0.0, 0.0, [], 0
    with autocast(model.device, dtype):
        for indices in batches:
            inputs, codes = data.batch(indices)
            codes = codes.to(model.device)
            logits = teacher_forced_logits(model, inputs, codes)  # [B, L, C, V]
            losses = losses + layer_cross_entropy(logits, codes) * len(indices)
            correct = correct + (logits.argmax(-1) == codes).float().mean(-1).sum(0)  # [L]
            _, greedy, _ = greedy_trace(model, inputs)  # [B, L, C]
            actions = tokenizer.decode(codes_to_tokens(greedy, tokenizer.config.latent_dim))
            target = torch.from_numpy(data.chunks[indices]).to(actions.device)  # [B, T, A]
            errors.append((actions.float() - target).abs().cpu())
            count += len(indices)
    model.train(was_training)
    error = torch.cat(errors)  # [n, T, A]
    return {'samples': count, 'loss': float((losses / count).mean()),
            'layer_loss': (losses / count).tolist(), 'token_accuracy': (correct / count).tolist(),
            'action_l1': float(error.mean()), 'action_l1_per_dim': error.mean((0, 1)).tolist()}


@torch.no_grad()
def baselines(tokenizer: ActionTokenizer, data: DemoData, train: np.ndarray,
              held: np.ndarray) -> dict:
    """Reference points on held-out samples: the tokenizer's reconstruction floor (all layers),
    the L1 error of always predicting the mean training chunk, and the token accuracy per layer
    of always predicting each code's most frequent training value."""
    chunks = torch.from_numpy(data.chunks[held])  # [n, T, A]
    codes = torch.from_numpy(data.codes[held]).long()  # [n, L, C]
    tokens = codes_to_tokens(codes, tokenizer.config.latent_dim)  # [n, L, T, D]
    floor = tokenizer.decode(tokens).cpu() - chunks
    mean_chunk = torch.from_numpy(data.chunks[train].mean(0))  # [T, A]
    guess = most_frequent_codes(torch.from_numpy(data.codes[train]).long(),
                                tokenizer.config.levels)  # [L, C]
    return {'tokenizer_floor_l1': float(floor.abs().mean()),
            'mean_chunk_l1': float((mean_chunk - chunks).abs().mean()),
            'constant_guess_accuracy': token_accuracy(guess.expand_as(codes), codes).tolist()}
