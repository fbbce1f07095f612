"""Build assets/addition-noisy/ for the SFT -> RL demonstration (examples/sft_then_rl/), offline.

The rows and splits are those of assets/addition (scripts/make_tiny.py). The training rows' completions come from a
careless teacher that drops the carry from the units into the tens in half of the sums that have one (45% of sums
carry, so 77.5% of the labels are right), while every row's `answer` column holds the true sum. SFT imitates the
teacher, mistakes included; RL, which only checks `answer` with exact_match, can fix them. The test split's
completions and answers are right.
"""
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE, TARGET = ROOT / "assets" / "addition", ROOT / "assets" / "addition-noisy"


def teacher(a: int, b: int, rng: random.Random) -> int:
    if (a % 10) + (b % 10) >= 10 and rng.random() < 0.5:
        return a + b - 10  # the carry into the tens is forgotten
    return a + b


def main() -> None:
    TARGET.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split in ("train", "test"):
        lines = (SOURCE / f"{split}.jsonl").read_text().splitlines()
        right = 0
        with open(TARGET / f"{split}.jsonl", "w", encoding="utf-8") as out:
            for line in lines:
                row = json.loads(line)
                a, b = map(int, row["prompt"][0]["content"].split("+"))
                label = teacher(a, b, rng) if split == "train" else a + b
                right += label == a + b
                row["completion"] = [{"role": "assistant", "content": str(label)}]
                row["answer"] = str(a + b)
                out.write(json.dumps(row) + "\n")
        print(f"{split}: {len(lines)} rows, {right / len(lines):.1%} of completions right")


if __name__ == "__main__":
    main()
