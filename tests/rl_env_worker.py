"""Subprocess body for tests/test_rl_env_fixes.py: one RL step on the tool environment `vf-sum-tools` (on PYTHONPATH)
under FSDP2 on 2 CPU processes (tests/cpu_fsdp.py), sampled by the embedded sampler. Rank 0's first turns are
replaced by a tool call after they were sampled (every forward's collectives ran), rank 1's stay the untrained
model's (no tool call): only rank 0's episodes have a second turn. Prints each rank's sampled turns as JSON. A second
argument, a server's base URL: sampled from that server by the OpenAI backend instead (rl_backend "openai"; "" for
the embedded sampler). A third, a token budget (micro_batch_tokens): rank 0's longer episodes then train in more
forwards than rank 1's."""

from __future__ import annotations

import faulthandler
import json
import os
import sys

import cpu_fsdp  # noqa: F401  (FSDP2 on CPU processes)
import torch

import vftrain as vf
from conftest import TINY
from rl_worker import config
from vftrain.guards import close_process_group
from vftrain.sampling.tokens import Sample

CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>'


def main(out_dir: str, base_url: str | None = None, budget: str | None = None) -> None:
    torch.set_num_threads(1)
    # A hung process exits with its stack (the test's timeout ends only the launcher, not its workers)
    faulthandler.dump_traceback_later(230, exit=True)
    server = dict(rl_backend="openai", sample_base_url=base_url, sample_timeout=60) if base_url else {}
    cfg = config(out_dir, 1, save_strategy="no", env="vf-sum-tools", fsdp=True, batch_size=8, max_seq_len=128,
                 max_prompt_len=24, max_new_tokens=4, micro_batch_size=4, mask_ratio_low=0.0, mask_ratio_high=1e30,
                 micro_batch_tokens=int(budget) if budget else None, **server)
    trainer = vf.RLTrainer(model=TINY, args=cfg)
    call = trainer.processing_class(CALL, add_special_tokens=False)["input_ids"]
    sample_groups, turns = trainer._sample_groups, []

    def scripted(prompts, step, n, turn=0):
        groups = sample_groups(prompts, step, n, turn)
        turns.append(turn)
        if turn or cfg.process_index:
            return groups
        return [[Sample(s.prompt_ids, call, [-0.5] * len(call), "stop") for s in group] for group in groups]

    trainer._sample_groups = scripted
    trainer.train()
    print(json.dumps({"rank": cfg.process_index, "turns": turns}), flush=True)
    close_process_group()
    sys.stdout.flush()
    os._exit(0)  # as tests/cpu_fsdp.py: no interpreter teardown after a finished CPU FSDP2 run (a gloo thread)


if __name__ == "__main__":
    main(*sys.argv[1:4])
