"""prefpretrain: pretraining language models with human preferences, from a laptop CPU to SLURM."""
import sys as _sys

__version__ = "0.1.0"


class _NoMlflowInsideDeepSpeed:
    """DeepSpeed's autotuner imports mlflow while DeepSpeed itself is being imported, whenever mlflow is installed
    (`.[mlflow]`, `monitor.loggers`): 3.6 s in every process that imports DeepSpeed here, for autotuning runs we
    never start. This finder hides mlflow from that import only (while `deepspeed.autotuning.autotuner` is
    initialising); the MLflow logger imports it normally later."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        ds = _sys.modules.get("deepspeed.autotuning.autotuner")
        if name == "mlflow" and ds is not None and getattr(getattr(ds, "__spec__", None), "_initializing", False):
            raise ModuleNotFoundError("mlflow is not imported while DeepSpeed initialises (prefpretrain)")
        return None


_sys.meta_path.insert(0, _NoMlflowInsideDeepSpeed)
