"""Everything that trains: the policy, the draft, the action tokenizer, the default bundle.

Nothing here is imported by the engine (`rsd_core.engine` and what it imports reach no module
of this package). The modules, by job:

    demos.py                  LIBERO HDF5 demonstrations: files, actions, episodes, chunks
    frames.py                 agent-view frames read lazily, upright, at the model's size
    demo_dataset.py           samples (episode, t) with target codes, batched by prompt length
    augmentation.py           the image augmentation (policy training and distillation)
    objective.py              per-layer cross-entropy, token accuracy, the constant guess
    schedule.py               the learning rate: linear warm-up, cosine decay
    train_state.py            optimizer, its safetensors serialisation, resumable checkpoints
    teacher_forcing.py        the policy's training forward (one causal pass over all layers)
    policy_eval.py            held-out policy metrics and their baselines
    policy_config.py          the settings of one `rsd train-policy` run
    policy_setup.py           a run's demos, tokenizer, model and resume identity
    policy.py                 the behaviour-cloning run: steps, evaluation, bundle, draft
    policy_cli.py             `rsd train-policy`
    synthetic_observations.py observation directories of generated images
    draft_training.py         training a draft on recorded main tokens; its metrics
    draft_v2_training.py      training a v2 (feature) draft on the main's greedy trajectories
    distill.py                `rsd train-draft`: record the main's greedy tokens, train the draft
    import_draft.py           `rsd import-draft`: the original checkpoint format, weights_only
    tokenizer_fit.py          `rsd train-tokenizer`
    decoder_refit.py          `rsd refit-decoder`
    build_default.py          `rsd build-default`
"""
