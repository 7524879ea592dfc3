"""The token sequences the embedder reads: chat-templated prompts that end at ``<|embed_token|>``.

A query becomes (system "Please represent user queries.", user = the query,
assistant = [reasoning] "The embedding is <|embed_token|>"); a document the
same with the document system prompt and never any reasoning. The embedding is
the final hidden state at the embed token.

Every sequence *stops* at the embed token. In a causal LM nothing after it can
change its hidden state, so the closing "." and end-of-turn marker the issue's
template shows would cost compute and change nothing.

The chat template is rendered once around a placeholder and tokenized in
pieces, so the user content can be truncated to a token budget without
decoding and re-encoding text, and each prompt costs one tokenizer call.
"""

from __future__ import annotations

from dataclasses import dataclass

EMBED_TOKEN = "<|embed_token|>"
QUERY_SYSTEM = "Please represent user queries."
DOCUMENT_SYSTEM = "Please represent the document."
ANSWER = f"The embedding is {EMBED_TOKEN}"
# Grows whenever the way sequences are assembled changes: part of the embedder's cache key, with the template's ids.
PROMPT_FORMAT = 1
_PLACEHOLDER = "\u2063USER\u2063"  # invisible separators: never part of real text


@dataclass(frozen=True)
class PromptTemplate:
    """Token ids around the user content: ``before + content + after [+ reasoning + newline] + answer``."""

    before: list[int]  # chat template up to the user content
    after: list[int]  # end of the user turn and the assistant header
    newline: list[int]  # between a reasoning and the answer
    answer: list[int]  # "The embedding is <|embed_token|>"; its last id is the embed token

    @classmethod
    def build(cls, tokenizer, system: str) -> "PromptTemplate":
        if tokenizer.chat_template is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; set tokenizer.chat_template")
        messages = [{"role": "system", "content": system}, {"role": "user", "content": _PLACEHOLDER}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(_PLACEHOLDER) != 1:
            raise ValueError("the chat template must render the user content exactly once")
        before, after = text.split(_PLACEHOLDER)
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        answer = encode(ANSWER)
        embed_id = tokenizer.convert_tokens_to_ids(EMBED_TOKEN)
        if not answer or answer[-1] != embed_id:
            raise ValueError(f"{EMBED_TOKEN} is not a single special token of this tokenizer; call add_embed_token")
        return cls(encode(before), encode(after), encode("\n"), answer)

    def prompt(self, content: list[int]) -> list[int]:
        """Ids up to the start of the assistant turn (where reasoning is generated)."""
        return self.before + content + self.after

    def sequence(self, content: list[int], reasoning: list[int] | None = None) -> list[int]:
        """The full sequence, ending at the embed token.

        A reasoning that already ends with the embed token (the model emitted it)
        is the whole response; otherwise the answer is appended after it.
        """
        if reasoning and reasoning[-1] == self.answer[-1]:
            return self.prompt(content) + reasoning
        middle = reasoning + self.newline if reasoning else []
        return self.prompt(content) + middle + self.answer

    def response_start(self, content: list[int]) -> int:
        """Position of the first response token (reasoning or answer) in :meth:`sequence`."""
        return len(self.before) + len(content) + len(self.after)
