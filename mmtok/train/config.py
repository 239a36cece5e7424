"""Config schema of the training engine (``optim:``, ``train:`` and ``deepspeed:`` blocks)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # sgd uses betas[0] as momentum
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | constant (both after the linear warm-up)
    eps: float = 1e-8  # Adam epsilon


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max grad norm (0 = off)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (if data.val is set)
    ckpt_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    progress: bool = True  # tqdm on rank 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-reproducible on CPU)
    eval_batches: int = 0  # cap on validation batches per evaluation (0 = the whole val set)
    tensorboard: bool = True  # write TensorBoard scalars beside metrics.jsonl
    export: bool = True  # call task.export(output_dir/"export") at the end


@dataclass
class DeepSpeedConfig:
    enabled: bool = False  # also switched on by launching under `deepspeed`
    config: str = ""  # path to a configs/ds/*.json file ("auto" values are resolved by mmtok)
    stage: int = -1  # override zero_optimization.stage (-1 = keep the file's)
