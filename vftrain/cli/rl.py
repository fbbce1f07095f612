"""`vf-rl @ config.toml [--rl.key value ...] [--model M] [--dataset D] [--inspect N]`: the `vf-sft` command line
for RL; the same TOML layout with an [rl] table, so SFT -> RL is renaming the table and pointing `model` at the
SFT run's output."""

from __future__ import annotations

import sys

from vftrain.cli.args import import_beside_config, parse_argv
from vftrain.cli.sft import inspect_setup, print_help, report_generation_accuracy, resolve, train, training_split
from vftrain.errors import VFTrainError

FLAGS = {"inspect": True, "help": False}
USAGE = """usage: vf-rl @ path/to/config.toml [--rl.<field> VALUE ...] [--model M] [--dataset D] [--inspect N]

RL (GRPO family) against reward functions. The TOML file holds top-level `model` (e.g. an SFT run's output
folder) and `dataset` (prompt rows: `prompt` messages or string, or `question`, with an `answer`, `reference` or
`completion` column the reward functions check) and an [rl] table of the fields below; command-line values
override the file. --inspect N prints the first N prompts as the sampler continues them, without training.
With eval_split (or eval_size) and eval_generation_rows set, held-out greedy generations are scored before and
after training: exact match and the reward functions' weighted score.
Ctrl-C (or SIGTERM) during training saves a checkpoint at the end of the current step and stops, exit status 130
(143); a second one stops at once."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or "-h" in argv or "--help" in argv:
        try:
            print_help("rl", USAGE)
        except BrokenPipeError:
            sys.stderr.close()
        return 0
    try:
        inv = parse_argv(argv, "rl", FLAGS)
        model, config = resolve(inv, section="rl")
        import_beside_config(inv)
        if "inspect" in inv.flags:
            return inspect(model, config, inv.flags["inspect"])
        from vftrain.rl.trainer import RLTrainer
        from vftrain.sampling.vllm_server import launched_vllm

        # vLLM starts only when there is something to train (not for a requeued finished run) and is stopped on
        # return, error and Ctrl-C.
        return train(model, config, RLTrainer, lambda trainer: report_generation_accuracy(trainer, config,
                                                                                          " before RL"), launched_vllm)
    except VFTrainError as exc:
        print(f"vf-rl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vf-rl: interrupted", file=sys.stderr)
        return 130


def inspect(model: str, config, n_text: str) -> int:
    from vftrain.rewards import resolve_rewards
    from vftrain.rl.rollouts import PromptSet

    n, tokenizer = inspect_setup(model, config, n_text, "prompts")
    if config.env:  # the environment's tasks, rendered with its tools as the trainer renders them
        from vftrain.rl.environment import VerifiersEnv

        env = VerifiersEnv(config.env, config.env_args, tokenizer, config.max_prompt_len, config.max_turns)
        prompts, rewards = env.prompts, env.reward_names
        tools = [f"tools: {', '.join(t.name for t in env.tools) or 'none'}"]
    else:
        prompts = PromptSet.build(training_split(config)[0], tokenizer, config.max_prompt_len)  # as RL trains
        rewards, tools = resolve_rewards(config.reward_funcs), []  # import errors show here
    for line in prompts.lines() + ["reward functions: " + ", ".join(rewards)] + tools:
        print(line)
    for ids, reference in list(zip(prompts.ids, prompts.references))[:n]:
        print(f"--- {len(ids)} prompt tokens" + ("" if config.env else f"; reference {reference!r}"))
        print(tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
