"""How the shapes model's cross-attention looks: does a subject word's map single out where its object is drawn?

Attend-and-Excite and region re-weighting act on the cross-attention maps of the subject words; they are made for
models whose word tokens lay out the image (SD 1.x). This script measures, on the embedded shapes model, the
conditional cross-attention at the 8x8 layers (averaged over heads, layers and the first `--fraction` of the steps,
where the layout forms) during ordinary sampling of two-object and position captions:

- peak / mean: a subject word's map at its highest pixel over its mean (1 = flat; a word that lays out its object
  peaks far above its mean);
- the share of the attention that goes to the start token, to the words, and to the end and padding tokens (which,
  in a causal text encoder, carry the whole caption).

With `--model flow` it measures the flow model (SD3's layout): joint attention of the image queries over the text
keys (its two CLIPs' tokens, then its T5's) at the 8x8 grid of image tokens, in every block; the shares are of the
attention on the text keys (the softmax also runs over the image keys: the share of the whole attention that goes to
text is reported beside them). A subject word's map sums its CLIP token and its T5 piece.

Writes `benchmarks/results/attention/attention_maps.json` and `.md` (`attention_maps_flow` for the flow model).

    python benchmarks/attention_maps.py --per-category 40 --seeds 2
    python benchmarks/attention_maps.py --model flow --per-category 40 --seeds 2
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_results  # noqa: E402

from ttalign.attention import attention_control, sync_step  # noqa: E402
from ttalign.hooks import AlignmentMethod, GenerationState, Stage  # noqa: E402
from ttalign.methods.attention import token_spans  # noqa: E402
from ttalign.shapes import evaluation_prompts, load_pipeline, sampling_defaults  # noqa: E402
from ttalign.shapes.world import subject_words  # noqa: E402


@dataclass(eq=False)
class CrossAttentionMaps(AlignmentMethod):
    """Sums the conditional cross-attention maps at one resolution over the first `fraction` of the steps, without
    changing them (a probability hook that returns `None`): `out.traces["cross_attention_maps"]` holds their sum
    `[N, hw, L]` (over heads' mean, layers and steps) and the number of layer calls summed, and the same per layer
    (`"layers"`: name -> sum)."""

    resolution: tuple = (8, 8)
    fraction: float = 0.3

    stages = (Stage.ATTENTION, Stage.STEP_START)

    def on_attention(self, state: GenerationState) -> None:
        store = {"sum": None, "count": 0, "layers": {}}
        state.traces["cross_attention_maps"] = store
        last = self.fraction * len(state.timesteps)
        res = tuple(self.resolution)

        class Observe:
            @staticmethod
            def wants(ctx):
                return ctx.is_cross and (ctx.height, ctx.width) == res and ctx.step_index < last

            def __call__(self, ctx, probs):
                n = state.batch_size
                heads = ctx.heads(probs.shape[0], n)
                cond = probs[-n * heads :].reshape(n, heads, *probs.shape[1:]).float().mean(1)  # [N, hw, L]
                store["sum"] = cond if store["sum"] is None else store["sum"] + cond
                store["count"] += 1
                layer = store["layers"].get(ctx.name)
                store["layers"][ctx.name] = cond if layer is None else layer + cond
                return None  # look only

        attention_control(state).prob_hooks.append(Observe())

    def on_step_start(self, state: GenerationState) -> None:
        sync_step(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.3, help="the first fraction of the steps observed")
    parser.add_argument("--model", choices=("sd", "flow"), default="sd")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    settings = sampling_defaults(pipe)
    flow = args.model == "flow"
    family, tokenizer = pipe.family, pipe.tokenizer
    prompts = [p for p, c in evaluation_prompts(args.per_category) if c in ("two_objects", "position")]
    ratios, shares = [], {"start": [], "words": [], "end_and_padding": []}
    layer_ratios: dict[str, list[float]] = {}
    text_share = []
    for first in range(0, len(prompts), 16):
        chunk = prompts[first : first + 16]
        out = pipe(
            chunk,
            num_images_per_prompt=args.seeds,
            generator=torch.Generator().manual_seed(first),
            output_type="pt",
            alignment=[CrossAttentionMaps(fraction=args.fraction)],
            **settings,
        )
        store = out.traces["cross_attention_maps"]
        maps = store["sum"] / store["count"]  # [N, hw, L]
        for name, layer in store["layers"].items():  # peak / mean of each layer's own maps (scale-free)
            for k, prompt in enumerate(p for p in chunk for _ in range(args.seeds)):
                spans = (
                    family.token_spans(prompt, subject_words(prompt))
                    if flow
                    else token_spans(tokenizer, prompt, subject_words(prompt))
                )
                for span in spans:
                    word = layer[k][:, span].sum(-1)  # [hw]
                    layer_ratios.setdefault(name, []).append(float(word.max() / word.mean()))
        if flow:  # joint attention: the text keys hold part of each query's attention; shares are of that part
            text_share += maps.sum(-1).mean(-1).tolist()
            maps = maps / maps.sum(-1, keepdim=True)
        for k, prompt in enumerate(p for p in chunk for _ in range(args.seeds)):
            end = len(tokenizer(prompt).input_ids) - 1  # the end token's position
            mass = maps[k].mean(0)  # [L], the attention share of each token
            words = list(range(1, end))
            if flow:  # the T5 tokens follow the CLIP ones: its words, then its end token and padding
                words += [family.clip_length + i for i in range(len(pipe.tokenizer_3(prompt).input_ids) - 1)]
            shares["start"].append(float(mass[0]))
            shares["words"].append(float(mass[words].sum()))
            shares["end_and_padding"].append(float(1 - mass[0] - mass[words].sum()))
            spans = (
                family.token_spans(prompt, subject_words(prompt))
                if flow
                else token_spans(tokenizer, prompt, subject_words(prompt))
            )
            for span in spans:
                word = maps[k][:, span].sum(-1)  # [hw]
                ratios.append(float(word.max() / word.mean()))
    ratios = np.array(ratios)
    summary = {
        "images": len(prompts) * args.seeds,
        "subject_words": len(ratios),
        "peak_over_mean": {
            "median": float(np.median(ratios)),
            "p10": float(np.percentile(ratios, 10)),
            "p90": float(np.percentile(ratios, 90)),
        },
        "attention_share": {
            k: {"mean": float(np.mean(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}
            for k, v in shares.items()
        },
    }
    summary["peak_over_mean_by_layer"] = {name: float(np.median(v)) for name, v in layer_ratios.items()}
    if flow:
        summary["text_share_of_attention"] = float(np.mean(text_share))
    command = "python benchmarks/attention_maps.py " + " ".join(sys.argv[1:])
    lines = ["| measure | mean or median | 10th percentile | 90th percentile |", "|---|---|---|---|"]
    peak = summary["peak_over_mean"]
    lines.append(
        f"| subject word: peak / mean of its 8x8 map | {peak['median']:.2f} (median) | {peak['p10']:.2f} | "
        f"{peak['p90']:.2f} |"
    )
    for name, value in summary["attention_share"].items():
        label = name.replace("_", " ")
        lines.append(
            f"| attention share: {label} | {value['mean']:.3f} (mean) | {value['p10']:.3f} | {value['p90']:.3f} |"
        )
    by_layer = ", ".join(f"{name} {value:.2f}" for name, value in summary["peak_over_mean_by_layer"].items())
    lines.append(f"\nMedian peak / mean of a subject word's map, layer by layer: {by_layer}.")
    steps, guidance = settings["num_inference_steps"], settings["guidance_scale"]
    if flow:
        where = (
            f"{steps} flow-matching Euler steps, guidance {guidance}; conditional joint attention of the 8x8 "
            "image tokens over the text keys (shares of the text part: "
            f"{summary['text_share_of_attention']:.3f} of the whole attention on average)"
        )
    else:
        where = f"{steps} DDIM steps, guidance {guidance}; conditional cross-attention at the 8x8 layers"
    markdown = (
        f"# Shapes {'flow ' if flow else ''}model: attention maps of the text tokens\n\n`{command}`\n\n"
        f"{summary['images']} images of two-object and position captions ({summary['subject_words']} subject words), "
        f"{where}, averaged over heads, layers and the first {args.fraction:.0%} of the steps. A word that lays out "
        "its object has a map that peaks far above its mean.\n\n" + "\n".join(lines) + "\n"
    )
    write_results(
        "attention_maps_flow" if flow else "attention_maps",
        {"benchmark": "attention_maps", "command": command, **summary, "environment": environment()},
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
