"""lm-pretrain: pre-train decoder-only language models from scratch with PyTorch Lightning."""


def experiment(config=None, overrides=None):
    """A run resolved as `python train.py fit` resolves it, built but not started (see
    lm_pretrain.commands.experiment): `lm_pretrain.experiment("configs/tiny.yaml", {"trainer.max_steps": 50}).fit()`.
    Imported on the first call, so that `import lm_pretrain` stays light for the commands."""
    from lm_pretrain.commands.experiment import experiment as build

    return build(config, overrides)
