"""Subprocess body for the RL tests: a few RL steps of the tiny model on addition prompts, with a reward that
varies on an untrained model (the share of digits in the completion), optionally killed at a step."""

from __future__ import annotations

import os
import signal
import sys

import datasets
import torch
from transformers import TrainerCallback

import vftrain as vf
from conftest import TINY, addition_rows
from vftrain.guards import close_process_group


def digits(completion: str, reference: str) -> float:
    """Share of the completion's characters that are digits: graded, so an untrained model's groups differ."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


class KillAt(TrainerCallback):
    def __init__(self, step: int, sig: int):
        self.step, self.sig = step, sig

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), self.sig)


def per_prompt_sampling(trainer):
    """Rollouts independent of how the prompts are spread over processes and micro-batches: each prompt sampled
    with its own seed (the trainer samples a process's prompts together, from one seed per process and step)."""
    from vftrain.sampling.tokens import sample, seed_for

    def _sample(prompts, step):
        args, out = trainer.args, []
        for ids in prompts:
            index = trainer.prompts.ids.index(ids)
            out += sample(trainer.accelerator.unwrap_model(trainer.model), [ids], n=args.rollouts_per_example,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          stop_ids=trainer.stop_ids, pad_id=trainer.processing_class.pad_token_id,
                          seed=seed_for(args.seed, step, index))[0]
        return out
    trainer._sample = _sample
    return trainer


def one_sgd_step(out_dir: str, **overrides):
    """One step of SGD with learning rate 1 and no clipping: the weights move by exactly the gradient. The final
    weights are saved to out_dir/weights.pt."""
    cfg = config(out_dir, 1, save_strategy="no", optim="sgd", learning_rate=1.0, max_grad_norm=0.0, **overrides)
    trainer = per_prompt_sampling(vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(
        addition_rows(40)), args=cfg, reward_funcs=[digits]))
    trainer.train()
    if trainer.args.should_save:
        torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                   os.path.join(out_dir, "weights.pt"))
    return trainer


def config(out_dir: str, max_steps: int, **overrides) -> "vf.RLConfig":
    base = dict(output_dir=out_dir, max_steps=max_steps, batch_size=16, rollouts_per_example=4, micro_batch_size=4,
                max_seq_len=32, max_prompt_len=24, max_new_tokens=6, learning_rate=3e-3, logging_steps=1,
                save_steps=2, save_total_limit=2, disable_tqdm=True, seed=0, dataloader_pin_memory=False,
                temperature=1.0, use_cpu=True)  # exact comparisons: CPU semantics also where a GPU is
    base.update(overrides)
    return vf.RLConfig(**base)


def main(out_dir: str, max_steps: int, kill_at: int, resume: bool, num_iterations: int, save_steps: int) -> None:
    torch.set_num_threads(1)
    if max_steps == 0:  # the split-invariance run
        one_sgd_step(out_dir, micro_batch_size=2)
        return close_process_group()
    micro = 16 // int(os.environ.get("WORLD_SIZE", "1")) // 2
    cfg = config(out_dir, max_steps, num_iterations=num_iterations, micro_batch_size=micro, save_steps=save_steps)
    trainer = vf.RLTrainer(model=TINY, train_dataset=datasets.Dataset.from_list(addition_rows(40)), args=cfg,
                           reward_funcs=[digits])
    if kill_at:
        trainer.add_callback(KillAt(kill_at, signal.SIGKILL))
    trainer.train(resume_from_checkpoint=True if resume else None)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]), int(sys.argv[6]))
