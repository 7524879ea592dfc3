"""Tiny models for the agents tests: a BPE tokenizer trained on the fly and randomly initialised Llamas.

Nothing is downloaded. The tokenizer gets SmolLM2's ChatML chat template, so
prompts have the real shape, and the model folder is an ordinary Hugging Face
folder, so the tests go through the same loading path as a real model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = (
    "the boundary layer flow over a flat plate heat transfer at high speed supersonic wing pressure "
    "distribution shock wave cylinder buckling of shells under load theory experiment results "
    "please represent user queries the document the embedding is what how why which"
).split()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder with a 2-layer random Llama (hidden 32) and the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_embedder(tiny_model_dir):
    from agents.embedder import LLMEmbedder
    from agents.models import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir)
    return LLMEmbedder(model, tokenizer, name="tiny", max_doc_tokens=24, max_query_tokens=16, batch_size=4)


@pytest.fixture(scope="session")
def tiny_beir(tmp_path_factory) -> Path:
    """A 40-document, 24-query BEIR folder whose queries share words with their relevant documents."""
    import json
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tiny-beir")
    docs = {f"d{i}": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for i in range(40)}
    with open(path / "corpus.jsonl", "w") as f:
        for doc_id, text in docs.items():
            title = " ".join(text.split()[:3]) if int(doc_id[1:]) % 2 else ""
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    (path / "qrels").mkdir()
    with open(path / "queries.jsonl", "w") as f, open(path / "qrels" / "test.tsv", "w") as q:
        q.write("query-id\tcorpus-id\tscore\n")
        for i in range(24):
            relevant = rng.sample(sorted(docs), 3)
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(docs[relevant[0]].split()[:4])}) + "\n")
            for doc_id in relevant:
                q.write(f"q{i}\t{doc_id}\t{rng.randint(1, 2)}\n")
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread: on a shared 2-core machine, thread sync costs more than it saves."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def train_until_killed():
    """Run ``<module>.train(config)`` in a child process that is SIGKILLed (no cleanup) right after it logs
    ``key`` at ``step``: its log then holds a step that its last checkpoint does not."""

    def run(module: str, config, step: int, key: str) -> None:
        script = f"""
import os, signal, torch
torch.set_num_threads(1)
import {module} as trainer
import agents.config, agents.metrics_log as metrics_log
write = metrics_log.MetricsLog.write
def write_then_die(self, step, **values):
    write(self, step, **values)
    if step == {step} and {key!r} in values:
        os.kill(os.getpid(), signal.SIGKILL)
metrics_log.MetricsLog.write = write_then_die
trainer.train(agents.config.{type(config).__name__}(**{asdict(config)!r}))
"""
        root = Path(__file__).parents[2]
        child = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(root)})
        assert child.returncode == -9, child.stderr[-2000:]

    return run
