"""Prompt optimization: LLM rewriting through any OpenAI-compatible server, and Promptist.

- `PromptRewrite`: asks a chat model (OpenAI, or a local vLLM / llama.cpp / Ollama server through `base_url`) to
  rewrite each prompt; with a reward, runs OPT2I's loop (Manas et al. 2024, https://arxiv.org/abs/2403.17804): the
  model proposes candidates over rounds, each is rendered with the same initial noise and scored, the best is kept.
- `Promptist` (Hao et al. 2022, https://arxiv.org/abs/2212.09611): a GPT-2 fine-tuned to rewrite prompts for Stable
  Diffusion, run through transformers with the reference generation settings.

Both act at the `prompt` stage and record the original and rewritten prompts in `out.traces`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ttalign.hooks import AlignmentMethod, GenerationState, Stage
from ttalign.openai_compat import check_client_settings, openai_client, redact
from ttalign.rewards.base import check_scores, reward_name
from ttalign.sampler import DifferentiableSampler
from ttalign.sampling import init_noise_sigma

DEFAULT_SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-image model. Keep every object, count, colour and spatial relation of the "
    "user's prompt, make them explicit and unambiguous, and add nothing that contradicts them. Answer with the "
    "rewritten prompt only, one per line when asked for several."
)


#: Replies kept in memory per method object with `cache=True` (the oldest is dropped first).
CACHE_SIZE = 1024


def _lines(text: str) -> list[str]:
    """The prompts of a reply: one per line, list numbering, bullets and quotes stripped."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line).strip().strip('"').strip()
        if line:
            out.append(line)
    return out


@dataclass(eq=False)
class PromptRewrite(AlignmentMethod):
    """Rewrites each prompt with a chat model behind an OpenAI-compatible API.

    Args:
        model (`str`): the model name the server knows.
        base_url (`str`, *optional*): the server, e.g. `http://127.0.0.1:8000/v1` (default: `OPENAI_BASE_URL`, else
            OpenAI's).
        api_key_env (`str`, defaults to `"OPENAI_API_KEY"`): the environment variable holding the key (read when a
            request is made, never logged; local servers usually need none).
        system_prompt (`str`): the instruction given to the model.
        candidates (`int`, defaults to 1): rewrites requested per round.
        reward (`Callable`, *optional*): with a reward, every candidate (and the user's prompt) is rendered with the
            same initial noise and scored, and the best prompt over `rounds` is kept (OPT2I).
        rounds (`int`, defaults to 1): proposal rounds; each shows the model the best prompts so far with scores.
        temperature (`float`, defaults to 0.7), timeout (`float`, seconds, defaults to 30), max_retries (`int`,
            defaults to 2).
        cache (`bool`, defaults to `True`): identical requests are answered from memory (the last `CACHE_SIZE`).

    When the server fails (after the retries), the user's prompt is kept and a warning names the error.
    `out.traces["prompt_rewrite"]` holds, per prompt, the original, the chosen prompt and every candidate with its
    score.

    Example:

    ```py
    >>> from ttalign.methods import PromptRewrite
    >>> rewrite = PromptRewrite(model="qwen2.5-7b-instruct", base_url="http://127.0.0.1:8000/v1")
    >>> out = pipe("two cats on a sofa", alignment=[rewrite])
    >>> out.traces["prompt_rewrite"][0]["chosen"]
    ```
    """

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    candidates: int = 1
    reward: Callable | None = None
    rounds: int = 1
    temperature: float = 0.7
    timeout: float = 30.0
    max_retries: int = 2
    cache: bool = True
    _responses: dict = field(default_factory=dict, init=False, repr=False)

    stages = (Stage.PROMPT,)
    costly_options = ("candidates", "rounds")

    def __post_init__(self):
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"PromptRewrite needs candidates >= 1, got {self.candidates!r}.")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"PromptRewrite needs rounds >= 1, got {self.rounds!r}.")
        if self.reward is not None and not callable(self.reward):
            raise ValueError(f"PromptRewrite's reward must be callable, got {self.reward!r}.")
        check_client_settings("PromptRewrite", self.timeout, self.max_retries)

    def _client(self):
        return openai_client(self.base_url, self.api_key_env, self.timeout, self.max_retries, "PromptRewrite")

    def _ask(self, user_message: str, n: int) -> list[str]:
        request = (self.base_url, self.model, self.system_prompt, user_message, n, self.temperature)
        if self.cache and request in self._responses:
            return self._responses[request]
        reply = self._client().chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user_message}],
            temperature=self.temperature,
            n=1,
        )
        proposals = _lines(reply.choices[0].message.content or "")[:n]
        if not proposals:
            raise ValueError("the model answered with no prompt")
        if self.cache:
            self._responses[request] = proposals
            while len(self._responses) > CACHE_SIZE:  # dicts keep insertion order: drop the oldest
                self._responses.pop(next(iter(self._responses)))
        return proposals

    @staticmethod
    def _message(prompt: str, scored: list[tuple[str, float]], n: int) -> str:
        if not scored:
            return f"Rewrite this prompt{f' in {n} different ways' if n > 1 else ''}:\n{prompt}"
        shown = "\n".join(f"{score:.4f}: {text}" for text, score in sorted(scored, key=lambda x: -x[1])[:5])
        return (
            f"Original prompt:\n{prompt}\n\nPrompts tried so far, with their scores (higher is better):\n{shown}\n\n"
            f"Write {n} new prompt{'s' if n > 1 else ''} that should score higher, one per line."
        )

    def _propose(self, prompt: str, scored: list[tuple[str, float]]) -> list[str]:
        try:
            return self._ask(self._message(prompt, scored, self.candidates), self.candidates)
        except Exception as err:  # noqa: BLE001 - any server failure falls back to the user's prompt
            message = redact(str(err), self.api_key_env)
            warnings.warn(
                f"PromptRewrite: the server failed ({type(err).__name__}: {message[:200]}); keeping the prompt "
                f"{prompt!r}.",
                stacklevel=3,
            )
            return []

    @torch.no_grad()
    def _score(self, state: GenerationState, prompts: list[str]) -> torch.Tensor:
        """Renders every candidate prompt from the same initial noise with the call's settings, and scores it."""
        family = state.family
        family.set_timesteps(
            state.num_inference_steps, state.device, state.height, state.width, **state.schedule_options
        )
        negative = state.negative_prompt if isinstance(state.negative_prompt, str) else None  # one for all candidates
        cond = family.encode_prompt(
            prompts,
            state.device,
            negative_prompt=negative,
            do_cfg=state.do_classifier_free_guidance,
            height=state.height,
            width=state.width,
            guidance_scale=state.guidance_scale,
            clip_skip=state.clip_skip,
            **state.encode_options,
        )
        sampler = DifferentiableSampler(family, cond, guidance_scale=state.guidance_scale, eta=state.eta)
        shape = family.latents_shape(1, state.height, state.width)
        generator = state.derived_generator(salt=3)
        dtype = cond.prompt_embeds.dtype
        noise = torch.randn(shape, generator=generator).to(state.device, dtype) * init_noise_sigma(family.scheduler)
        rows = (len(prompts),) + shape[1:]
        latents = noise.expand(rows)
        noises = [
            None if e is None else e.expand(rows) for e in sampler.draw_noises(shape, generator, state.device, dtype)
        ]
        images = sampler.decode(sampler.sample(latents, noises))
        sampler.account(state)
        state.reward_calls += 1
        return check_scores(self.reward(images, prompts), len(prompts), reward_name(self.reward)).float().cpu()

    def renders_per_image(self, num_inference_steps: int) -> float:
        if self.reward is None:
            return 1.0
        return float(1 + self.rounds * self.candidates + 1)  # the user's prompt and each candidate scored; the call

    def on_prompt(self, state: GenerationState) -> None:
        if state.prompt is None:
            raise ValueError("PromptRewrite rewrites `prompt`; it cannot act on `prompt_embeds` alone.")
        traces = []
        new_prompts = []
        rounds = self.rounds if self.reward is not None else 1
        with state.pipe.progress_bar(total=len(state.prompt) * rounds) as bar:  # one tick per prompt and round
            for prompt in state.prompt:
                scored: list[tuple[str, float]] = []
                if self.reward is not None:
                    scored.append((prompt, float(self._score(state, [prompt])[0])))
                tried = {prompt}
                for done in range(rounds):
                    proposals = [p for p in dict.fromkeys(self._propose(prompt, scored)) if p not in tried]
                    if not proposals:
                        bar.update(rounds - done)
                        break
                    tried.update(proposals)
                    if self.reward is None:
                        scored.append((proposals[0], float("nan")))
                    else:
                        scored += list(zip(proposals, self._score(state, proposals).tolist()))
                    bar.update()
                if self.reward is None:
                    chosen = scored[0][0] if scored else prompt
                else:
                    chosen = max(scored, key=lambda x: x[1])[0]
                new_prompts.append(chosen)
                traces.append({"original": prompt, "chosen": chosen, "candidates": scored})
        state.prompt = new_prompts
        state.traces["prompt_rewrite"] = traces


@dataclass(eq=False)
class Promptist(AlignmentMethod):
    """Promptist: rewrites each prompt with a GPT-2 fine-tuned for Stable Diffusion.

    The reference settings: input `prompt + " Rephrase:"`, beam search with `num_beams=8`, `max_new_tokens=75`,
    `length_penalty=-1.0`, the first beam is kept.

    Args:
        model (`str`, defaults to `"microsoft/Promptist"`): hub id or folder of the GPT-2.
        tokenizer (`str`, defaults to `"gpt2"`): its tokenizer (Promptist uses GPT-2's).
        num_beams, max_new_tokens, length_penalty: generation settings.
        device (`str`, *optional*): where the rewriter runs (the pipeline's device by default).

    Example:

    ```py
    >>> from ttalign.methods import Promptist
    >>> out = pipe("a cat", alignment=[Promptist()])
    >>> out.traces["promptist"]  # [("a cat", "a cat, digital art, highly detailed, ...")]
    ```
    """

    model: str = "microsoft/Promptist"
    tokenizer: str = "gpt2"
    num_beams: int = 8
    max_new_tokens: int = 75
    length_penalty: float = -1.0
    device: str | None = None
    _loaded: tuple | None = field(default=None, init=False, repr=False)

    stages = (Stage.PROMPT,)

    def load(self):
        """Loads (once) and returns `(model, tokenizer)`."""
        if self._loaded is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(self.model).eval().requires_grad_(False)
            self._loaded = (model, AutoTokenizer.from_pretrained(self.tokenizer))
        return self._loaded

    @torch.no_grad()
    def rewrite(self, prompt: str, device=None) -> str:
        model, tokenizer = self.load()
        model.to(self.device or device or "cpu")
        text = prompt.strip() + " Rephrase:"
        input_ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
        eos = tokenizer.eos_token_id
        outputs = model.generate(
            input_ids,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            num_return_sequences=1,
            eos_token_id=eos,
            pad_token_id=eos,
            length_penalty=self.length_penalty,
        )
        decoded = tokenizer.decode(outputs[0], skip_special_tokens=True)
        return decoded.replace(text, "").strip() or prompt

    def on_prompt(self, state: GenerationState) -> None:
        if state.prompt is None:
            raise ValueError("Promptist rewrites `prompt`; it cannot act on `prompt_embeds` alone.")
        rewritten = [self.rewrite(p, state.device) for p in state.prompt]
        state.traces["promptist"] = list(zip(state.prompt, rewritten))
        state.prompt = rewritten
