"""A prompt's tokens where the answer did not say them: counted by the backend's own
tokenizer, off the answer's path, with what its chat template adds learnt from the counts
the backend gives in non-streamed answers (metering/accounting/prompt_template.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from backends.registry import BackendRegistry
from metering.accounting.prompt_template import TEXT_ONLY, TemplateTokens
from metering.accounting.prompt_text import prompt_text
from metering.accounting.report import Tokens
from proxy.relay.exchange import Exchange


@dataclass(slots=True)
class PromptCounter:
    registry: BackendRegistry
    # Per backend: the tokens its chat template adds to a prompt.
    templates: dict[str, TemplateTokens] = field(default_factory=dict)

    async def text_tokens(self, ex: Exchange, others_inflight: int = 1) -> int | None:
        """The prompt's text in tokens by the backend's own tokenizer; None where it has
        none, or a serial server has other work in flight (asking it then would cut off
        another client's stream). `others_inflight`: the backend's in-flight count that
        is this request's own (1 while it runs)."""
        b = ex.backend
        if b.spec.tokenizer is None or (b.spec.serial and b.traffic.inflight > others_inflight):
            return None
        return await self.registry.count_tokens(b, ex.model, prompt_text(ex.prompt.payload()))

    async def stream_tokens(self, ex: Exchange, tokens: Tokens) -> Tokens:
        """A stream that brought no usage: its prompt by the tokenizer, plus what the
        template adds where a non-streamed answer of the same model and shape showed it
        (the count the backend itself gives); else the text's count, its source labelled
        `prompt text only`."""
        text_n = await self.text_tokens(ex)
        if text_n is None:
            return tokens
        template = self.templates.get(ex.backend.name) or TemplateTokens()
        n, whole = template.count(ex.model, ex.prompt.shape, text_n)
        source = tokens.source if whole else f"{tokens.source}; {TEXT_ONLY}"
        return Tokens(n, tokens.completion, source)

    async def learn_template(self, ex: Exchange, backend_count: int) -> None:
        """After a non-streamed answer the backend counted: its text counted by the
        tokenizer once per model and shape, to learn what the template adds (after the
        answer was sent: the client has it already)."""
        shape = ex.prompt.shape
        template = self.templates.setdefault(ex.backend.name, TemplateTokens())
        if shape is None or not template.wants(ex.model, shape):
            return
        text_n = await self.text_tokens(ex)
        if text_n is None:
            template.failed(ex.model, shape)
        else:
            template.learn(ex.model, shape, backend_count, text_n)

    async def tally_cut(self, ex: Exchange) -> None:
        """A stream the client cut off brought no usage, yet the backend read its prompt:
        counted now (the upstream is closed, the energy settled), into the backend's tally
        only, so the cross-check does not call a hang-up's prompt work that went around
        the proxy."""
        n = await self.text_tokens(ex, others_inflight=0)
        if n:
            ex.backend.traffic.tally.prompt += n
