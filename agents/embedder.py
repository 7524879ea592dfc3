"""LLMEmbedder: a causal LM that (optionally) reasons, then embeds at ``<|embed_token|>``.

It is the env's encoder protocol (``name``, ``dim``, ``version``,
``encode_documents``, ``encode_queries`` -> float32 unit rows) over any Hugging
Face causal LM, so the env can index and refresh documents with it, and it
gives differentiable embeddings (:meth:`LLMEmbedder.forward`) for training.

Batches are right-padded and every row's embedding is read at its own last
position, so the padding (and hence the rest of the batch) never changes a
text's embedding: positions count from each row's first token and padding is
masked out of attention. Texts are sorted by length before batching so little
compute goes to padding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from searchr3_env.cache_keys import cache_key

from .prompts import DOCUMENT_SYSTEM, EMBED_TOKEN, PROMPT_FORMAT, QUERY_SYSTEM, PromptTemplate


def add_embed_token(model, tokenizer) -> int:
    """Add ``<|embed_token|>`` as a special token (once) and grow the embedding matrix to fit; returns its id.

    New rows start at the mean of the existing ones: deterministic, so the
    untrained model embeds identically on every load (a random row would make a
    cached corpus index disagree with the next load's queries), and a
    non-informative start that fine-tuning can move.
    """
    from transformers import AddedToken

    if EMBED_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(EMBED_TOKEN, special=True, normalized=False)], special_tokens=True)
    old = model.get_input_embeddings().num_embeddings
    if old < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for matrix in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                if matrix is not None and matrix.weight.shape[0] >= len(tokenizer):
                    matrix.weight[old:] = matrix.weight[:old].mean(0)
    return tokenizer.convert_tokens_to_ids(EMBED_TOKEN)


@dataclass
class Forward:
    """One padded forward pass over a batch of sequences (rows in input order)."""

    embeddings: torch.Tensor  # (n, dim) float32, unit rows
    hidden: torch.Tensor  # (n, T, dim) final hidden states, right-padded
    lengths: torch.Tensor  # (n,) int64 true lengths; the embed token sits at lengths - 1
    input_ids: torch.Tensor  # (n, T) right-padded with the pad id
    attention_mask: torch.Tensor  # (n, T) 1 on real tokens


class LLMEmbedder:
    """Encoder protocol over a causal LM that embeds at ``<|embed_token|>``.

    Args:
        model, tokenizer: a Hugging Face causal LM (plain or wrapped by peft) and its tokenizer;
            the embed token is added if missing (the embedding matrix is resized).
        name: the encoder name the corpus index records (make it differ per checkpoint).
        max_doc_tokens, max_query_tokens: user content is truncated to this many tokens.
        lowercase: case-fold queries and documents first. For collections whose case is an artifact
            (NPL: upper-case queries, lower-case documents), where a cased tokenizer would otherwise
            see unrelated tokens for the same words; the baselines are uncased already.
        reasoning_tokens: 0 embeds queries directly; N > 0 first generates up to N tokens.
        batch_size: sequences per forward pass in ``encode_*``.
        version: starting encoder version; :meth:`bump_version` after every optimiser step.
        weights_id: what the weights are, e.g. a digest of the model files (``cache_keys.folder_digest``) and of
            a checkpoint's weights; None (an embedder that cannot say) is never cached. An optimiser step
            clears it.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str = "llm",
        max_doc_tokens: int = 128,
        max_query_tokens: int = 64,
        lowercase: bool = False,
        reasoning_tokens: int = 0,
        batch_size: int = 16,
        version: int = 0,
        weights_id: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.embed_id = add_embed_token(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("tokenizer has neither a pad nor an eos token to pad batches with")
        self.query_template = PromptTemplate.build(tokenizer, QUERY_SYSTEM)
        self.document_template = PromptTemplate.build(tokenizer, DOCUMENT_SYSTEM)
        self.name = name
        self.dim = int(model.config.hidden_size)
        self._version = version
        self.max_doc_tokens = max_doc_tokens
        self.max_query_tokens = max_query_tokens
        self.lowercase = lowercase
        self.reasoning_tokens = reasoning_tokens
        self.batch_size = batch_size
        self.weights_id = weights_id

    @property
    def cache_key(self) -> str | None:
        """Names everything that produces this embedder's document rows (the corpus-index cache key):
        weights, dtype, prompt format and template, case folding, truncation. None if the weights are unnamed."""
        if self.weights_id is None:
            return None
        template = self.document_template
        return cache_key(self.weights_id, self.model.dtype, PROMPT_FORMAT, template.before, template.after,
                         template.answer, self.lowercase, self.max_doc_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        """Another version means other weights, which ``weights_id`` no longer names (whoever sets it)."""
        if value != self._version:
            self.weights_id = None
        self._version = value

    def with_options(self, *, reasoning_tokens: int | None = None, batch_size: int | None = None) -> "LLMEmbedder":
        """The same model (shared, not copied) embedding with another reasoning budget or batch size: an agent to
        evaluate, while the original keeps its own settings."""
        view = copy.copy(self)
        view.reasoning_tokens = self.reasoning_tokens if reasoning_tokens is None else reasoning_tokens
        view.batch_size = self.batch_size if batch_size is None else batch_size
        return view

    def bump_version(self) -> None:
        """Record that the weights changed, so indexes know their rows are stale."""
        self.version += 1

    # ------------------------------------------------------------------ token sequences
    def _content(self, texts: Sequence[str], limit: int) -> list[list[int]]:
        texts = [t.lower() for t in texts] if self.lowercase else list(texts)
        return self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]

    def document_sequences(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.document_template.sequence(c) for c in self._content(texts, self.max_doc_tokens)]

    def query_sequences(self, texts: Sequence[str], reasoning: Sequence[list[int]] | None = None) -> list[list[int]]:
        """Query sequences; ``reasoning[i]`` (token ids, possibly empty) goes before the answer."""
        contents = self._content(texts, self.max_query_tokens)
        if reasoning is None:
            return [self.query_template.sequence(c) for c in contents]
        if len(reasoning) != len(contents):
            raise ValueError(f"{len(contents)} queries but {len(reasoning)} reasonings")
        return [self.query_template.sequence(c, r) for c, r in zip(contents, reasoning)]

    def query_response_starts(self, texts: Sequence[str]) -> list[int]:
        """Where each query's response (reasoning or answer) begins in its sequence: the LM loss covers the rest."""
        return [self.query_template.response_start(c) for c in self._content(texts, self.max_query_tokens)]

    # ------------------------------------------------------------------ forward passes
    def pad(self, sequences: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, attention mask, lengths) of right-padded sequences, on the model's device."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("every sequence needs at least one token")
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        ids = torch.full((len(sequences), int(lengths.max())), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
        return ids.to(self.device), mask.long().to(self.device), lengths.to(self.device)

    def forward(self, sequences: Sequence[list[int]]) -> Forward:
        """Differentiable embeddings (and hidden states for LM losses) of sequences ending at the embed token."""
        ids, mask, lengths = self.pad(sequences)
        last = ids.gather(1, (lengths - 1)[:, None]).squeeze(1)
        if (last != self.embed_id).any():
            bad = int(torch.nonzero(last != self.embed_id)[0, 0])
            raise ValueError(f"sequence {bad} does not end with {EMBED_TOKEN} (id {self.embed_id})")
        hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (n, T, dim)
        at_embed = hidden[torch.arange(len(ids), device=ids.device), lengths - 1]  # (n, dim)
        return Forward(F.normalize(at_embed.float(), dim=-1), hidden, lengths, ids, mask)

    def _encode(self, sequences: list[list[int]]) -> np.ndarray:
        """Unit float32 embeddings, batched longest-first (so padding is minimal and peak memory comes early)."""
        out = np.empty((len(sequences), self.dim), dtype=np.float32)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                out[rows] = self.forward([sequences[i] for i in rows]).embeddings.cpu().numpy()
        return out

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.empty((0, self.dim), dtype=np.float32)
        return self._encode(self.document_sequences(texts))

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.empty((0, self.dim), dtype=np.float32)
        reasoning = self.generate_reasoning(texts) if self.reasoning_tokens > 0 else None
        return self._encode(self.query_sequences(texts, reasoning))

    # ------------------------------------------------------------------ reasoning
    def generate_reasoning(self, texts: Sequence[str], max_new_tokens: int | None = None,
                           temperature: float | None = None) -> list[list[int]]:
        """Up to N generated response tokens per query: greedy, or sampled at ``temperature`` (RL rollouts).

        Generation stops at the embed token or an end-of-turn token. A response
        that emitted the embed token keeps it (the model placed it); otherwise the
        end marker is dropped and :meth:`query_sequences` appends the answer.
        """
        n_new = self.reasoning_tokens if max_new_tokens is None else max_new_tokens
        prompts = [self.query_template.prompt(c) for c in self._content(texts, self.max_query_tokens)]
        stops = {self.embed_id, *as_list(self.model.generation_config.eos_token_id), self.tokenizer.eos_token_id}
        stops.discard(None)
        out: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                width = max(len(prompts[i]) for i in rows)
                # Left padding for generation: new tokens must follow every prompt directly.
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                    mask[r, width - len(prompts[i]) :] = 1
                generated = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=n_new,
                    do_sample=temperature is not None,
                    temperature=temperature,
                    top_p=None,
                    top_k=None,
                    eos_token_id=sorted(stops),
                    pad_token_id=self.pad_id,
                )[:, width:].tolist()
                for r, i in enumerate(rows):
                    out[i] = cut_at_stop(generated[r], stops, self.embed_id)
        return out

    def __repr__(self) -> str:
        return (
            f"LLMEmbedder(name={self.name!r}, dim={self.dim}, version={self.version}, "
            f"reasoning_tokens={self.reasoning_tokens}, max_doc_tokens={self.max_doc_tokens})"
        )


def as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def cut_at_stop(tokens: list[int], stops: set[int], embed_id: int) -> list[int]:
    """Tokens up to the first stop token; the embed token is kept, other stop tokens are dropped."""
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[: j + 1] if t == embed_id else tokens[:j]
    return tokens


def reference_logits(policy: LLMEmbedder, reference, input_ids, attention_mask, rows, cols) -> torch.Tensor:
    """The reference model's next-token logits at (rows, cols)."""
    with torch.no_grad():
        if reference is None:  # LoRA: the reference is the policy with its adapters off
            with policy.model.disable_adapter():
                hidden = policy.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
            return policy.model.get_output_embeddings()(hidden.last_hidden_state[rows, cols])
        hidden = reference.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
        return reference.get_output_embeddings()(hidden.last_hidden_state[rows, cols])
