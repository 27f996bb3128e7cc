"""Text completions from a routed (or plain) causal LM: greedy or sampled, stop strings, the chat template.

    completion = complete(routed, tokenizer, "2+2=", GenerateConfig(temperature=0.7, seed=0, stop=["\\n"]))
    completion.text, completion.stop

Sampling is `sample_next`, transformers' own recipe (``generate(do_sample=True)``: its temperature, top-k and
top-p warpers in that order, a softmax, then one ``torch.multinomial`` draw per token), run inside ``generate``
as a logits processor; ``moerge serve`` samples with the same function, so a seeded request draws the same
tokens. With a seed, the generator is seeded just before each prompt, so a prompt's completion does not depend
on the prompts before it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from moerge.routing.inputs import RoutingInputs


class GenerateConfig(BaseModel):
    """How to complete a prompt. The same object drives the Python API and `moerge generate`'s flags."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(
        default=0.0, ge=0, description="0 = greedy decoding (the default); > 0 samples"
    )
    top_p: float = Field(
        default=1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set with this mass"
    )
    top_k: int = Field(
        default=0, ge=0, description="keep the k most likely tokens when sampling; 0 = no limit"
    )
    seed: int | None = Field(
        default=None, description="seed for sampling (reproducible completions); None = unseeded"
    )
    stop: list[str] = Field(
        default_factory=list, description="stop at the first of these strings; it is cut from the text"
    )
    chat_template: bool = Field(
        default=False,
        description="wrap the prompt in the tokenizer's chat template (a user turn), if it has one",
    )

    def model_post_init(self, _context: Any) -> None:
        if any(not s for s in self.stop):
            from moerge.errors import MalformedConfigError

            raise MalformedConfigError("stop strings must not be empty")


@dataclass
class Completion:
    """One prompt's completion: ``text`` (cut before the stop string), the whole token sequence ``ids``
    (prompt and generated tokens, the stop string's included), where the prompt ends, and the stop string met."""

    prompt: str
    text: str
    ids: torch.Tensor
    prompt_tokens: int
    stop: str | None = None

    @property
    def new_tokens(self) -> int:
        return int(self.ids.shape[0]) - self.prompt_tokens


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = False) -> dict[str, torch.Tensor]:
    """The prompt's ``input_ids`` and ``attention_mask`` (batch of one).

    With ``chat_template`` and a tokenizer that has one: the prompt as a user turn followed by the assistant's
    generation prompt. Otherwise as the experts were trained on it: ``<bos>`` first where the tokenizer has one
    and does not add it itself (moerge's training encodes ``<bos> prompt completion <eos>``)."""
    if chat_template and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (ids.shape[1] == 0 or int(ids[0, 0]) != bos):
        ids = torch.cat([torch.tensor([[bos]], dtype=ids.dtype), ids], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, str | None]:
    """``(text before the earliest stop string, that string)``, or ``(text, None)`` when none occurs."""
    hits = [(text.find(s), i, s) for i, s in enumerate(stop) if s in text]
    if not hits:
        return text, None
    at, _, s = min(hits)
    return text[:at], s


def sample_next(
    scores: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, generator: Any = None
) -> torch.Tensor:
    """One sampled token per row of ``scores [B, V]``: transformers' temperature, top-k and top-p warpers (each
    only where it changes something, as ``generate`` adds them), a softmax, one ``torch.multinomial`` draw from
    ``generator`` (None: torch's default generator). Returns ``[B]`` token ids."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = scores.float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k=top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def new_generator(seed: int | None, device: Any) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed`` (its draws are torch's after ``torch.manual_seed(seed)``);
    None without a seed (draw from torch's default generator)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _sampler(config: GenerateConfig):
    from transformers import LogitsProcessor

    class Sample(LogitsProcessor):
        """Sample with `sample_next` inside greedy ``generate``: every score but the drawn token's is -inf."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            token = sample_next(scores, config.temperature, config.top_p, config.top_k)
            out = torch.full_like(scores, -float("inf"))
            return out.scatter_(1, token[:, None], 0.0)

    return Sample()


def _stop_criterion(tokenizer: Any, stop: list[str], prompt_tokens: int):
    from transformers import StoppingCriteria

    class StopStrings(StoppingCriteria):
        """Stop once the generated text (decoded, special tokens skipped) contains a stop string."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            done = [
                cut_at_stop(tokenizer.decode(row[prompt_tokens:], skip_special_tokens=True), stop)[1]
                is not None
                for row in input_ids
            ]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopStrings()


def complete(
    model: Any,
    tokenizer: Any,
    prompt: str,
    config: GenerateConfig | None = None,
    routing: RoutingInputs | None = None,
) -> Completion:
    """Complete ``prompt`` with ``model`` (a `MoErgedModel`, routed by ``routing``, or a plain causal LM)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from moerge.model.routed import MoErgedModel

    config = config or GenerateConfig()
    enc = encode_prompt(tokenizer, prompt, config.chat_template)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    n = int(enc["input_ids"].shape[1])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = dict(max_new_tokens=config.max_new_tokens, pad_token_id=pad)
    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if config.temperature > 0:  # greedy over the scores `sample_next` leaves: its draw
        kwargs["logits_processor"] = LogitsProcessorList([_sampler(config)])
    if config.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_stop_criterion(tokenizer, config.stop, n)])
    if isinstance(model, MoErgedModel):
        kwargs["routing"] = routing
    # A seeded completion leaves the caller's generator as it was; an unseeded one draws from it.
    rng = torch.random.fork_rng(devices=[]) if config.seed is not None else contextlib.nullcontext()
    with rng, torch.no_grad():
        if config.seed is not None:
            torch.manual_seed(config.seed)
        out = model.generate(**enc, **kwargs)
    ids = out[0].detach().cpu()
    text, hit = cut_at_stop(tokenizer.decode(ids[n:], skip_special_tokens=True), config.stop)
    return Completion(prompt=prompt, text=text, ids=ids, prompt_tokens=n, stop=hit)
