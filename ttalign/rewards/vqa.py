"""VQAScore: the probability that a vision-language model answers "Yes" to a question about the image.

Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text Generation",
https://arxiv.org/abs/2404.01291 (reference code: linzhiqiu/t2v_metrics). The score of `(image, prompt)` is
`P("Yes" | image, 'Does this figure show "{prompt}"? Please answer Yes or No.')`, read from the model's next-token
logits in one teacher-forced forward pass (no generation); an answer of several tokens scores the geometric mean of
their probabilities.

The model is any transformers vision-language model with a causal language-model head that
`AutoModelForImageTextToText` loads, with its own `AutoProcessor` (tested: Qwen2.5-VL and LLaVA). The processor
runs on float tensors (`do_rescale=False`), so gradients reach the pixels: the reward is differentiable.
"""

from __future__ import annotations

import torch

from .base import Reward

#: VQAScore's question template (t2v_metrics v3.1); `{}` is the prompt.
DEFAULT_TEMPLATE = 'Does this figure show "{}"? Please answer Yes or No.'
#: The answer whose probability is the score.
DEFAULT_ANSWER = "Yes"
#: The default checkpoint of `VQAScore.from_pretrained()` (loaded from the hub or a local folder).
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
#: Checkpoints of the architectures that are tested (on tiny models of the same classes).
KNOWN_MODELS: tuple[str, ...] = (
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "llava-hf/llava-1.5-7b-hf",
    "llava-hf/llava-1.5-13b-hf",
)


class VQAScore(Reward):
    """VQAScore (Lin et al. 2024, https://arxiv.org/abs/2404.01291): `P(answer | image, template.format(prompt))`
    under a transformers vision-language model, in `[0, 1]`.

    Args:
        model: a transformers image-text-to-text model with a language-model head
            (`Qwen2_5_VLForConditionalGeneration`, `LlavaForConditionalGeneration`, ...); frozen, in eval mode.
        processor: its `AutoProcessor` (tokenizer, image processor, chat template).
        template (`str`): the question, `{}` standing for the prompt.
        answer (`str`): the answer whose probability is the score (`"Yes"`).
        batch_size (`int`, *optional*): images per forward pass (all at once by default).

    `answer_probability(images, questions)` answers any yes/no questions (what :class:`QuestionScore` asks).
    Where the processor has a chat template, the question is a user turn holding the image and the text, followed by
    the generation prompt; the answer is appended as the model would write it (after a space where the generation
    prompt does not end in one).

    Example:

    ```py
    >>> from ttalign.rewards import VQAScore
    >>> reward = VQAScore.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", dtype=torch.bfloat16, device="cuda")
    >>> reward(images, ["two red circles left of a blue square"] * len(images))  # P("Yes"), [B]
    ```
    """

    differentiable = True
    native_range = (0.0, 1.0)
    license = "the vision-language model's license (Qwen2.5-VL: Apache-2.0 / Qwen; LLaVA-1.5: Llama 2)"

    def __init__(
        self,
        model,
        processor,
        template: str = DEFAULT_TEMPLATE,
        answer: str = DEFAULT_ANSWER,
        batch_size: int | None = None,
    ):
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"VQAScore's template must contain '{{}}' where the prompt goes, got {template!r}.")
        if not answer.strip():
            raise ValueError(f"VQAScore needs a non-empty answer, got {answer!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"VQAScore's batch_size must be a positive integer, got {batch_size!r}.")
        self.model = model.eval().requires_grad_(False)
        self.processor, self.template, self.answer, self.batch_size = processor, template, answer, batch_size
        self._answer_ids: dict[str, list[int]] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str = DEFAULT_MODEL,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        **kwargs,
    ) -> VQAScore:
        """Loads the model with `AutoModelForImageTextToText` and its `AutoProcessor` from a hub id or a folder;
        `dtype` (`torch.bfloat16`, `torch.float16`) where the model allows it. Other keyword arguments go to
        `__init__` (`template`, `answer`, `batch_size`)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if isinstance(dtype, str):  # from a reward spec: `vqascore:path=...,dtype=bfloat16`
            if dtype not in ("float32", "float16", "bfloat16"):
                raise ValueError(f"VQAScore's dtype must be float32, float16 or bfloat16, got {dtype!r}.")
            dtype = getattr(torch, dtype)
        model = AutoModelForImageTextToText.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        reward = cls(model, AutoProcessor.from_pretrained(path), **kwargs)
        return reward.to(device) if device else reward

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def question_for(self, prompt: str) -> str:
        """The question VQAScore asks about `prompt`."""
        return self.template.format(prompt)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.answer_probability(images, [self.question_for(p) for p in prompts])

    # --- building the inputs ---------------------------------------------------------------------------------

    def _prompt_text(self, question: str) -> str:
        """The text before the answer: the chat template's user turn and generation prompt, or the question alone
        after the image token where the processor has no template."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", None)
        if image_token is None:
            raise ValueError(
                f"{type(self.processor).__name__} has neither a chat template nor an image token: VQAScore cannot "
                "place the image in the text."
            )
        return f"{image_token}\n{question}\n"

    def _answer_text(self, prompt_text: str, answer: str) -> str:
        return answer if prompt_text[-1:].isspace() else " " + answer

    def _answer_token_ids(self, prompt_text: str, answer: str) -> list[int]:
        """The token ids of the answer as it follows `prompt_text` (tokenized in context, so that a tokenizer that
        merges across the boundary is caught)."""
        suffix = self._answer_text(prompt_text, answer)
        key = prompt_text[-32:] + "\x00" + suffix
        if key not in self._answer_ids:
            tok = self.tokenizer
            before = tok(prompt_text, add_special_tokens=False).input_ids
            whole = tok(prompt_text + suffix, add_special_tokens=False).input_ids
            if whole[: len(before)] != before or len(whole) == len(before):
                raise ValueError(
                    f"The answer {answer!r} does not tokenize apart from the text before it under "
                    f"{type(tok).__name__}; choose another answer or template."
                )
            if len(self._answer_ids) >= 1024:  # keys end with question text: bounded for a long-running server
                self._answer_ids.clear()
            self._answer_ids[key] = whole[len(before) :]
        return self._answer_ids[key]

    def _inputs(self, images: torch.Tensor, questions: list[str], answer: str):
        """Processor inputs for `images` `[B, 3, H, W]` with each question and the answer appended, left-padded so
        that every answer ends the sequence; returns `(inputs, answer_ids)`."""
        prompt_texts = [self._prompt_text(q) for q in questions]
        answer_ids = {tuple(self._answer_token_ids(t, answer)) for t in prompt_texts}
        if len(answer_ids) != 1:
            raise ValueError(f"The answer {answer!r} tokenizes differently after different questions: {answer_ids}.")
        texts = [t + self._answer_text(t, answer) for t in prompt_texts]
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            inputs = self.processor(
                images=list(images), text=texts, return_tensors="pt", padding=True, do_rescale=False
            )
        finally:
            tok.padding_side = side
        ids = torch.tensor(next(iter(answer_ids)))  # [K]
        tail = inputs["input_ids"][:, -len(ids) :]  # [B, K]
        if not (tail == ids).all():
            raise ValueError(
                f"{type(self.processor).__name__} did not end the sequences with the answer {answer!r} "
                f"(expected ids {ids.tolist()}, got {tail.tolist()}): it adds tokens after the text."
            )
        return inputs, ids

    # --- scoring ---------------------------------------------------------------------------------------------

    def answer_log_probability(
        self, images: torch.Tensor, questions: list[str], answer: str | None = None
    ) -> torch.Tensor:
        """`log P(answer | image, question)` per image, `[B]` float32: the mean log-probability of the answer's tokens
        (a single-token answer: its log-probability), differentiable with respect to `images`."""
        answer = answer or self.answer
        if len(questions) != images.shape[0]:
            raise ValueError(f"Got {len(questions)} questions for {images.shape[0]} images.")
        step = self.batch_size or images.shape[0]
        return torch.cat(
            [
                self._answer_log_probability(images[i : i + step], questions[i : i + step], answer)
                for i in range(0, images.shape[0], step)
            ]
        )

    def _answer_log_probability(self, images: torch.Tensor, questions: list[str], answer: str) -> torch.Tensor:
        param = next(self.model.parameters())
        inputs, ids = self._inputs(images, questions, answer)
        inputs = {
            k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
        k = len(ids)
        logits = self.model(**inputs, logits_to_keep=k + 1).logits  # [B, K + 1, V]
        logp = logits[:, :-1].float().log_softmax(-1)  # [B, K, V]: position j predicts answer token j
        picked = logp.gather(-1, ids.to(logp.device)[None, :, None].expand(logp.shape[0], -1, 1))  # [B, K, 1]
        return picked.squeeze(-1).mean(-1)  # [B]

    def answer_probability(
        self, images: torch.Tensor, questions: list[str], answer: str | None = None
    ) -> torch.Tensor:
        """`P(answer | image, question)` per image, `[B]` in `[0, 1]` (the geometric mean over the answer's
        tokens)."""
        return self.answer_log_probability(images, questions, answer).exp()
