"""vftrain: supervised fine-tuning and RL of chat LLMs with one config structure.

    import vftrain as vf
    trainer = vf.SFTTrainer(model="Qwen/Qwen3-4B-Instruct", train_dataset=ds, args=vf.SFTConfig(...))
    trainer.train()
    trainer = vf.RLTrainer(model="outputs/my-sft", train_dataset=prompts, args=vf.RLConfig(...),
                           reward_funcs=[my_reward])
    trainer.train()

Heavy modules (torch, transformers) are imported on first use of a name, so `import vftrain` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "SFTConfig": "vftrain.config",
    "TrainerConfig": "vftrain.config",
    "SFTTrainer": "vftrain.sft.trainer",
    "RLConfig": "vftrain.config",
    "RLTrainer": "vftrain.rl.trainer",
    "get_model_and_tokenizer": "vftrain.models",
    "load_rows": "vftrain.data.load",
    "exact_match": "vftrain.rewards",
}

if TYPE_CHECKING:
    from vftrain.config import RLConfig, SFTConfig, TrainerConfig
    from vftrain.data.load import load_rows
    from vftrain.models import get_model_and_tokenizer
    from vftrain.rewards import exact_match
    from vftrain.rl.trainer import RLTrainer
    from vftrain.sft.trainer import SFTTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vftrain' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
