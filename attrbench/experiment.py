"""Build the parts of a run (data, task, schedule, optimizer) from its Hydra config."""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from attrbench.analysis import check_analysis
from attrbench.causal_lm import causal_lm_loss
from attrbench.data import DataSplits
from attrbench.errors import ConfigError, SourceNotFoundError
from attrbench.groundtruth.loo import check_removal
from attrbench.influence import METHODS
from attrbench.tasks import Task, classification_loss
from attrbench.training.optim import OptimizerSpec
from attrbench.training.schedule import BatchSchedule, learning_rates
from attrbench.training.trajectory import DTYPES

log = logging.getLogger(__name__)

LOSSES = {"classification": classification_loss, "causal_lm": causal_lm_loss}
RUN_DTYPES = ("float32", "float64")


def derive_seed(seed: int, purpose: str) -> int:
    """Independent, reproducible seed for one use (data split, initialization, batch order, ...)."""
    return zlib.crc32(f"{purpose}:{seed}".encode())


@dataclass
class Experiment:
    """Everything a run computes on, built once from the config."""

    config: DictConfig
    device: torch.device
    dtype: torch.dtype
    data: DataSplits
    task: Task
    batches: BatchSchedule
    lrs: list[float]
    optimizer: OptimizerSpec
    samples: torch.Tensor

    @property
    def variant(self) -> str:
        return describe_variant(self.data, self.task.model)

    @property
    def description(self) -> str:
        c = self.config
        return (f"{c.setting.name} ({self.variant}) | data {self.data.source} | lr {c.optimizer.lr:g} | "
                f"seed {c.seed} | {c.dtype}")


def describe_variant(data: DataSplits, model: torch.nn.Module) -> str:
    """``embedded`` (offline data and model), ``full`` (real ones), or a mix of the two named.

    Loaders record the data's variant in ``data.info["variant"]`` and model constructors set
    ``model.attrbench_variant``; a model without it (trained from scratch) follows the data.
    """
    data_variant = data.info.get("variant", "full")
    model_variant = getattr(model, "attrbench_variant", data_variant)
    if data_variant == model_variant:
        return data_variant
    return f"{data_variant} data, {model_variant} model"


def validate_config(cfg: DictConfig) -> None:
    """Reject unknown or contradictory settings before any work starts.

    Raises:
        ConfigError: For the first invalid value found.
    """
    with config_checks():
        _check_config(cfg)


@contextmanager
def config_checks() -> Iterator[None]:
    """Re-raise a ``ValueError`` of a config check as a :class:`ConfigError` with the same message.

    The checks of other modules raise plain ``ValueError`` s, so callers wrap them in this.
    """
    try:
        yield
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_config(cfg: DictConfig) -> None:
    if cfg.dtype not in RUN_DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is not one of {', '.join(RUN_DTYPES)}")
    storage = cfg.trajectory.storage_dtype
    if storage is not None and storage not in DTYPES:
        raise ValueError(f"trajectory.storage_dtype={storage!r} is not one of null, {', '.join(DTYPES)}")
    check_removal(cfg.groundtruth.removal)
    if not OmegaConf.is_list(cfg.influence.methods):
        raise ValueError(
            f"influence.methods={cfg.influence.methods!r} must be a list, for example influence.methods=[sgd_influence]"
        )
    for method in cfg.influence.methods:
        if method not in METHODS:
            raise ValueError(f"influence.methods contains {method!r}; available: {', '.join(METHODS)}")
    if cfg.setting.task not in LOSSES:
        raise ValueError(f"setting.task={cfg.setting.task!r} is not one of {', '.join(LOSSES)}")
    _check_groups_fit_task(cfg)
    if not cfg.influence.methods:
        raise ValueError(f"influence.methods is empty; name at least one of {', '.join(METHODS)}")
    _check_integer("seed", cfg.seed, minimum=0)
    # A Spearman correlation across the removed samples needs at least two of them.
    _check_integer("groundtruth.num_samples", cfg.groundtruth.num_samples, minimum=2)
    _check_integer("groundtruth.chunk_size", cfg.groundtruth.chunk_size, minimum=1)
    _check_integer("train.epochs", cfg.train.epochs, minimum=1)
    _check_integer("train.batch_size", cfg.train.batch_size, minimum=1)
    _check_integer("influence.query_chunk_size", cfg.influence.query_chunk_size, minimum=1)
    _check_integer("evaluation.scatter_test_points", cfg.evaluation.scatter_test_points, minimum=1)
    if cfg.train.micro_batch_size is not None:
        _check_integer("train.micro_batch_size", cfg.train.micro_batch_size, minimum=1, nullable=True)
    for key in ("num_train", "num_test"):
        if cfg.data.get(key) is not None:
            _check_integer(f"data.{key}", cfg.data[key], minimum=1, nullable=True)
    if cfg.evaluation.get("num_scored") is not None:
        _check_integer("evaluation.num_scored", cfg.evaluation.num_scored, minimum=1, nullable=True)
    lr = cfg.optimizer.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ValueError(f"optimizer.lr={lr!r} is not a number; write it as 1e-3 or 0.001")
    if lr <= 0:
        raise ValueError(f"optimizer.lr={lr} must be positive")
    betas = cfg.optimizer.get("betas")
    if betas is not None and (len(betas) != 2 or not all(isinstance(beta, (int, float)) and 0 <= beta < 1
                                                         for beta in betas)):
        raise ValueError(
            f"optimizer.betas={list(betas)} must be two numbers in [0, 1), for example optimizer.betas=[0.9,0.95]"
        )
    for key, minimum in (("weight_decay", 0.0), ("eps", 0.0)):
        value = cfg.optimizer.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"optimizer.{key}={value!r} is not a number")
        if value < minimum or (key == "eps" and value == 0):
            bound = "positive" if key == "eps" else "at least 0"
            raise ValueError(f"optimizer.{key}={value} must be {bound}")
    OptimizerSpec.from_config(OmegaConf.to_container(cfg.optimizer, resolve=True))
    check_analysis(cfg)


# The task that the data loaders and models of each attrbench module are built for, and the
# config-group choices that fit each task.
TASK_OF_MODULE = {
    "attrbench.data.mnist": "classification",
    "attrbench.data.cifar": "classification",
    "attrbench.data.text_blocks": "causal_lm",
    "attrbench.data.sft": "causal_lm",
    "attrbench.models.mlp": "classification",
    "attrbench.models.cnn": "classification",
    "attrbench.models.causal_lm": "causal_lm",
}
CHOICES_FOR_TASK = {
    "classification": {"data": "mnist or cifar10", "model": "mlp or cnn"},
    "causal_lm": {"data": "embedded_text, wikitext2, embedded_sft or alpaca_samsum",
                  "model": "tiny_gpt2, gpt2, tiny_llama or llama3_2_1b"},
}


def _check_groups_fit_task(cfg: DictConfig) -> None:
    """Reject a data or model config built for another task than ``setting.task``.

    Without this check, ``setting=mnist_mlp model=tiny_gpt2`` fails deep inside the embedding
    layer with a dtype error.
    """
    task = cfg.setting.task
    for group in ("data", "model"):
        target = cfg[group].get("_target_") if OmegaConf.is_dict(cfg.get(group)) else None
        built_for = TASK_OF_MODULE.get(target.rpartition(".")[0]) if isinstance(target, str) else None
        if built_for is None or built_for == task:
            continue  # a user's own loader or model: nothing to compare with
        choice = _group_choice(group)
        name = f"{group}={choice}" if choice else f"{group} config {target}"
        raise ValueError(
            f"{name} is built for {built_for} but setting.task={task}. "
            f"Choose {group}={CHOICES_FOR_TASK[task][group]}, or a setting for {built_for}"
        )


def _group_choice(group: str) -> str | None:
    """Return the option of config group ``group`` that Hydra composed, or None outside a Hydra app."""
    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # HydraConfig is only set while a Hydra app runs
        return None


def _check_integer(key: str, value, minimum: int, nullable: bool = False) -> None:
    """Reject a config value that is not a whole number of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        also = " or null" if nullable else ""
        raise ValueError(f"{key}={value!r} must be a whole number{also}; for example {key}={max(minimum, 1)}")
    if value < minimum:
        raise ValueError(f"{key}={value} must be at least {minimum}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"device={name!r} is not a valid torch device; use cpu, cuda, cuda:N or auto") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r} is not supported; attrbench runs on cpu or cuda (device=auto picks one)")
    return device


def configure_torch(deterministic: bool) -> None:
    """Deterministic kernels and full-precision float32 matmuls, so reruns are bit-identical."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False


def build_experiment(cfg: DictConfig) -> Experiment:
    validate_config(cfg)
    device, dtype, data, task = load_data_and_task(cfg)
    batches, lrs, optimizer = build_training_schedule(cfg, data.num_train)
    with config_checks():  # groundtruth.num_samples against the loaded training set
        samples = choose_samples(data.num_train, cfg.groundtruth.num_samples, cfg.seed)
    return Experiment(cfg, device, dtype, data, task, batches, lrs, optimizer, samples)


def load_data_and_task(cfg: DictConfig) -> tuple[torch.device, torch.dtype, DataSplits, Task]:
    """Configure torch, then load the data and build the model from the seed's derived seeds.

    ``attrbench run`` and ``attrbench select`` both start here, so their models start from the
    same weights.
    """
    configure_torch(cfg.deterministic)
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    with _loader_errors_unwrapped():
        data = instantiate(cfg.data, seed=derive_seed(cfg.seed, "data")).to(device, dtype)
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    with _loader_errors_unwrapped():
        model = build_model(cfg.model, data).to(device=device, dtype=dtype)
    task = Task(model, LOSSES[cfg.setting.task], micro_batch_size=cfg.train.micro_batch_size)
    return device, dtype, data, task


@contextmanager
def _loader_errors_unwrapped() -> Iterator[None]:
    """Re-raise the user-facing errors that Hydra's ``instantiate`` wraps, with their own message.

    A ``ValueError`` of a loader or model builder is a ``data.*`` or ``model.*`` value that does
    not fit (an unknown source, more samples than exist). An ``OSError`` is a source that is
    missing or cannot be reached.
    """
    try:
        yield
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        if isinstance(cause, OSError):
            raise SourceNotFoundError(str(cause)) from None
        raise


def build_training_schedule(cfg: DictConfig, num_train: int) -> tuple[BatchSchedule, list[float], OptimizerSpec]:
    """Build the seeded batch order over ``num_train`` samples, every step's learning rate and the optimizer."""
    seed = derive_seed(cfg.seed, "batches")
    batches = BatchSchedule.shuffled(num_train, cfg.train.batch_size, cfg.train.epochs, seed)
    lrs = learning_rates(cfg.schedule.name, cfg.optimizer.lr, batches.num_steps, cfg.schedule.warmup_ratio)
    optimizer = OptimizerSpec.from_config(OmegaConf.to_container(cfg.optimizer, resolve=True))
    return batches, lrs, optimizer


def build_model(model_cfg: DictConfig, data: DataSplits) -> torch.nn.Module:
    """Instantiate the model; a null ``input_shape`` entry is filled with the data's image shape."""
    if "input_shape" not in model_cfg or model_cfg.input_shape is not None:
        return instantiate(model_cfg)
    if data.image_shape is None:
        raise ValueError(
            f"model.input_shape is null but the {data.source} data are not images "
            "with a known shape; set model.input_shape=[channels,height,width]"
        )
    return instantiate(model_cfg, input_shape=list(data.image_shape))


def choose_samples(num_train: int, num_samples: int, seed: int) -> torch.Tensor:
    """Draw the training samples whose leave-one-out effects are measured."""
    if num_samples > num_train:
        raise ValueError(
            f"groundtruth.num_samples={num_samples} exceeds the {num_train} training samples; "
            "lower groundtruth.num_samples or raise data.num_train"
        )
    generator = torch.Generator().manual_seed(derive_seed(seed, "groundtruth"))
    return torch.randperm(num_train, generator=generator)[:num_samples]
