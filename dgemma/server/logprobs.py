"""Log-probabilities in OpenAI's shapes, from the engine's entries (RequestOutput.logprobs: per token, its
log-probability and its position's most probable tokens). What the numbers are: SERVING.md, "Log-probabilities".

chat:         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
completions:  {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}
"""

from __future__ import annotations

# JSON has no -inf: a token the model gives no probability (EOS where it may not be sampled) reads as this, as
# vLLM writes it
FLOOR = -9999.0


class LogprobWriter:
    """Writes one response's log-probabilities. Tokens are their text (decoded alone, special tokens kept), or
    "token_id:<id>" with vLLM's return_tokens_as_token_ids or without a tokenizer."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer = None if as_ids else tokenizer
        self._texts: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], False)
        return text

    def _item(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        return {"token": text, "logprob": max(logprob, FLOOR), "bytes": list(text.encode("utf-8"))}

    def chat(self, ids: list[int], entries: list) -> dict:
        """A chat choice's (or chunk's) `logprobs`."""
        return {"content": [dict(self._item(t, lp), top_logprobs=[self._item(a, v) for a, v in top])
                            for t, (lp, top) in zip(ids, entries)]}

    def completion(self, ids: list[int], entries: list, offset: int) -> dict:
        """A completion choice's (or chunk's) `logprobs`; `offset`: the characters of token text before these
        tokens (text_offset counts token text from the start of the output)."""
        tokens = [self.token(t) for t in ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [max(lp, FLOOR) for lp, _ in entries],
                "top_logprobs": [{self.token(a): max(v, FLOOR) for a, v in top} for _, top in entries],
                "text_offset": offsets}
