"""Training: the only package that imports DeepSpeed or wires torch.distributed training.

- `config.TrainConfig`: the `train` config section.
- `engine`: DeepSpeed config (`ds_config`), process group (`setup_distributed`), activation
  checkpointing from outside, optimizer / schedule, `build_engine`.
- `ema.EMA`: EMA of the weights, sharded like them.
- `checkpoint`: run-folder checkpoints (atomic `latest`, resume, export).
- `trainer`: the `Stage` protocol, `Trainer`, `Callback`, `NonFiniteLossError`.
- `metrics_log`: metrics.jsonl and wandb.
DeepSpeed itself is imported only inside the functions that need it.
"""
from gld.train.config import TrainConfig, WandbConfig

__all__ = ["TrainConfig", "WandbConfig"]
