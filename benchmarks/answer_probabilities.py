"""Can a checkpoint emit <|embed_token|> by itself? Per-token probabilities of its fixed answer after test queries.

The answer "The embedding is <|embed_token|>" follows every query. A model that
gives its last token (the embed token) no probability can never end a reasoning
by itself, and GRPO's format reward then has nothing to separate. This prints,
for the first N judged test queries, each answer token's probability given the
query and the tokens before it (teacher-forced, no reasoning).

    .venv/bin/python benchmarks/answer_probabilities.py --data ../shared/data/cranfield --run runs/sft-cranfield-r
"""

from __future__ import annotations

import argparse

import torch

from agents.policy import load_agent
from searchr3_env.task import resolve_dataset


def answer_probabilities(run: str, data: str, n_queries: int) -> tuple[list[str], list[list[float]]]:
    """(answer tokens, per query the probability of each answer token)."""
    agent, _ = load_agent(run)
    test = resolve_dataset(data).split("test")
    texts = [test.queries[q] for q in test.judged_query_ids[:n_queries]]
    starts = agent.query_response_starts(texts)
    with torch.inference_mode():
        ids, mask, lengths = agent.pad(agent.query_sequences(texts))
        logp = agent.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    probs = []
    for i, (start, length) in enumerate(zip(starts, lengths.tolist())):
        targets = ids[i, start:length]
        probs.append(logp[i, start - 1 : length - 1].gather(1, targets[:, None]).exp().squeeze(1).tolist())
    tokens = [agent.tokenizer.decode([t]) for t in ids[0, starts[0] : int(lengths[0])].tolist()]
    return tokens, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="BEIR folder; its first judged test queries are used")
    parser.add_argument("--run", required=True, help="SFT or GRPO-initialising SFT checkpoint or run folder")
    parser.add_argument("--queries", type=int, default=8, help="how many test queries")
    args = parser.parse_args()
    tokens, probs = answer_probabilities(args.run, args.data, args.queries)
    print("| token | " + " | ".join(f"q{i + 1}" for i in range(len(probs))) + " |")
    print("|---|" + "---|" * len(probs))
    for j, token in enumerate(tokens):
        print(f"| {token!r} | " + " | ".join(f"{p[j]:.3f}" for p in probs) + " |")


if __name__ == "__main__":
    main()
