"""A verifiers 0.4 environment (taskset) for `vf-rl @ examples/verifiers_env/rl.toml`: two-digit sums from the
bundled addition data, and one reward function, exact match of the reply against the true sum. `env` names it by path
(vftrain puts its folder on sys.path; verifiers imports it as `addition`); an installed environment is named by its
id, e.g. `env = "reverse-text"`."""

import json
from pathlib import Path

import verifiers.v1 as vf

DATA = Path(__file__).parents[2] / "assets" / "addition" / "train.jsonl"


class AdditionData(vf.TaskData):
    answer: str


class AdditionConfig(vf.TasksetConfig):
    num_tasks: int = 1000  # env_args = { num_tasks = ... }


class AdditionTask(vf.Task[AdditionData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def exact_match(self, task, trace) -> float:
        return float(trace.last_reply.strip() == task.answer)


class AdditionTaskset(vf.Taskset[AdditionTask, AdditionConfig]):
    def load(self):
        with open(DATA) as fh:
            for _, line in zip(range(self.config.num_tasks), fh):
                row = json.loads(line)
                yield AdditionTask(AdditionData(prompt=row["prompt"], answer=row["completion"][-1]["content"]),
                                   self.config.task)


__all__ = ["AdditionTaskset"]
