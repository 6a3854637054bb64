"""The default logger: Lightning's TensorBoardLogger, arranged for comparing runs.

- The HParams tab lists each run's settings (model, data, recipe) beside its val/loss and val/bpb,
  read from those curves, so runs compare in one table.
- Lightning's placeholder hp_metric (-1) and its epoch counter are left out: they were the first two
  cards of the Time Series tab, above the loss.
"""

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

HPARAMS_METRICS = ("val/loss", "val/bpb")  # the HParams tab's columns: the last value of each curve


def flat(params: dict, prefix: str = "") -> dict:
    """Nested settings as one level of "a/b" keys, values as TensorBoard's HParams takes them."""
    out = {}
    for key, value in params.items():
        if str(key).startswith("_"):  # Lightning's own entries (_instantiator)
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}/"))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class TensorBoardLogger(LightningTensorBoardLogger):
    def __init__(self, *args, default_hp_metric: bool = False, **kwargs):
        super().__init__(*args, default_hp_metric=default_hp_metric, **kwargs)

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None) -> None:
        super().log_hyperparams(params, metrics)  # hparams.yaml
        if metrics is None:
            from torch.utils.tensorboard.summary import hparams

            params = params if isinstance(params, dict) else vars(params)
            # (metric values are not written here: TensorBoard reads them off the val curves)
            for summary in hparams(flat(dict(params)), {name: 0.0 for name in HPARAMS_METRICS}):
                self.experiment._get_file_writer().add_summary(summary)

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics({name: value for name, value in metrics.items() if name != "epoch"}, step)
