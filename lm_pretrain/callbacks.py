"""Callbacks the template adds to the Trainer."""

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from lm_pretrain.generate import sample


class TextSamples(L.Callback):
    """Samples text for fixed prompts at the end of training (printed), and every `every_n_steps`
    optimizer steps (to TensorBoard as text), so you can read what the model has learned."""

    def __init__(self, prompts: list[str] = ("",), max_new_tokens: int = 100, temperature: float = 0.8,
                 top_k: int | None = 200, every_n_steps: int = 0, seed: int = 1234):
        self.prompts, self.max_new_tokens = list(prompts), max_new_tokens
        self.temperature, self.top_k, self.every_n_steps, self.seed = temperature, top_k, every_n_steps, seed
        self._last_logged_step = -1  # with gradient accumulation several batches share a step

    def _samples(self, module) -> list[str]:
        was_training = module.training
        module.eval()
        try:
            return [sample(module, p, self.max_new_tokens, self.temperature, self.top_k, self.seed + i)
                    for i, p in enumerate(self.prompts)]
        finally:
            module.train(was_training)

    @rank_zero_only
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_logged_step
                and trainer.logger is not None):
            self._last_logged_step = step
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                for i, text in enumerate(self._samples(module)):
                    experiment.add_text(f"samples/{i}", text.replace("\n", "  \n"), global_step=step)

    @rank_zero_only
    def on_train_end(self, trainer, module) -> None:
        print(f"\n=== samples after {trainer.global_step} steps ===")
        for text in self._samples(module):
            print(text.strip() + "\n---")
