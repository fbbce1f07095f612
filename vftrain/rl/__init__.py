"""RL beside SFT: `RLTrainer` (trainer.py) over rollouts (rollouts.py: prompts, rewards, advantages, rows) and the
policy loss of `vftrain.loss`; statistics in stats.py."""
