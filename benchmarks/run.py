"""Runs a named benchmark suite and records how: `python benchmarks/run.py SUITE [--only STEP ...]`.

Each suite is a list of steps, each one script with its exact arguments. The suite's results (JSON, Markdown, PNG)
go to `benchmarks/results/SUITE/`; beside them `runs.json` records every step run: its command, seeds (in the
command), wall time, the files it wrote, the git commit and the library versions. `INDEX.md` in
`benchmarks/results/` maps every table and plot to the command that made it; it is rewritten after every run (and by
`python benchmarks/run.py --index`).

    python benchmarks/run.py --list                      # the suites and their steps
    python benchmarks/run.py headline                    # the README's efficacy table (about an hour)
    python benchmarks/run.py training --only dpo_guided  # one step of a suite

Timing suites (`overhead`, `attend_excite`, `real_width`, `sampler_memory`, `serving`, `rewards`) must run alone on the
machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import RESULTS_ROOT  # noqa: E402


@dataclass(frozen=True)
class Step:
    """One script run: `python benchmarks/SCRIPT ARGS` (`args` split as a shell splits them), known in its suite as
    `name`."""

    name: str
    script: str
    args: str = ""

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.args)

    @property
    def command(self) -> str:
        return shlex.join(["python", f"benchmarks/{self.script}", *self.argv])


@dataclass(frozen=True)
class Suite:
    description: str
    steps: tuple[Step, ...]
    #: Timings are the point: run it alone on the machine.
    timing: bool = False
    #: What the suite's figures are quoted in.
    quoted_in: tuple[str, ...] = field(default_factory=tuple)


#: The trainers of each shapes model's efficiency table, in parts of one or two trainers.
EFFICIENCY_PARTS = {
    "flow": (("a", "grpo,nft"), ("b", "raft,awm"), ("c", "rwr"), ("d", "d3po"), ("e", "spo")),
    "sd": (("a", "ddpo"), ("b", "grpo"), ("c", "raft"), ("d", "rwr"), ("e", "d3po"), ("f", "spo")),
}

#: The learning rates of the papers (REFERENCES.md) of the trainers that fell at the shared 3e-4 within 30 minutes.
PAPER_LR = {"rwr": "1e-5", "d3po": "3e-5", "raft": "9e-6", "spo": "6e-5"}

#: The trainers of each model whose 60-minute run trains at its paper's lr (`PAPER_LR`) instead of the shared 3e-4:
#: those that fell at the shared lr within 30 minutes (on flow, RAFT and RWR collapsed to under 4%; D3PO and SPO held).
PAPER_LR_TRAINERS = {"sd": ("rwr", "d3po", "raft", "spo"), "flow": ("raft", "rwr")}

#: The trainers given 60 minutes on the soft verifier, one a part (two parts side by side): every trainer of each
#: model's efficiency table (`_paper_lr`: at its paper's lr, `<model>_soft_60_<trainer>_paper_lr`, a table of its own).
LONG_RUNS = {
    "flow": ("grpo", "nft", "awm", "d3po", "spo", "raft", "rwr"),
    "sd": ("grpo", "ddpo", "spo", "d3po", "raft", "rwr"),
}

#: The trainers given 60 minutes on the learned shapes VQA reward, at the shared lr: SPO, the one trainer that rose on
#: it within 30 minutes on both models (`<model>_vqa_60_<trainer>`, tables of their own).
LONG_RUNS_VQA = {"flow": ("spo",), "sd": ("spo",)}


def _paper_lr(model: str, kind: str) -> str | None:
    """The lr of `kind`'s 60-minute run on `model` where it is not the shared one (`PAPER_LR_TRAINERS`)."""
    return PAPER_LR[kind] if kind in PAPER_LR_TRAINERS.get(model, ()) else None


def _long_run(model: str, kind: str, reward: str = "soft") -> Step:
    """`kind`'s 60-minute run on `model` with the reward `shapes_<reward>`, evaluated every 10 minutes (on the soft
    verifier `_paper_lr`: named `..._paper_lr`), its LoRA kept for `tuned_eval.py`."""
    lr = _paper_lr(model, kind) if reward == "soft" else None
    name = f"{model}_{reward}_60_{kind}" + ("_paper_lr" if lr else "")
    return Step(
        name,
        "train_efficiency.py",
        f"--model {model} --reward shapes_{reward} --trainers {kind} --minutes 60 --eval-every 10"
        + (f" --lr {lr}" if lr else "")
        + f" --save-lora benchmarks/.cache/efficiency/{name} --name train_efficiency_{name}",
    )


def _efficiency_parts(model: str, reward: str) -> tuple[Step, ...]:
    """`train_efficiency.py` on `model` with the reward `shapes_<reward>`, its trainers in parts (`EFFICIENCY_PARTS`,
    each about 40 minutes a trainer; two parts can run side by side with one thread each) and the step that merges
    them into one table."""
    parts = EFFICIENCY_PARTS[model]
    name = f"train_efficiency_{model}_{reward}"
    steps = [
        Step(
            f"{model}_{reward}_{part}",
            "train_efficiency.py",
            f"--model {model} --reward shapes_{reward} --trainers {trainers} --minutes 30 --name {name}_{part}",
        )
        for part, trainers in parts
    ]
    merged = ",".join(f"{name}_{part}" for part, _ in parts)
    return (*steps, Step(f"{model}_{reward}", "train_efficiency.py", f"--merge {merged} --name {name}"))


def _shapes(name: str, common: str, align: tuple[str, ...] = (), prefix: str = "") -> Step:
    """A `shapes_eval.py` run named `prefix + name` on the suite's common prompt set, with the methods `align`."""
    methods = "".join(f" --align {shlex.quote(spec)}" for spec in align)
    return Step(name, "shapes_eval.py", f"--name {prefix}{name} {common}{methods}")


AE_SD = "attend_and_excite:tokens=@ttalign.shapes.world:subject_words,attn_res=8x8,max_iter_to_alter=12,"
AE_SD += "thresholds=0:0.05;5:0.5;10:0.8"
AE_FLOW = "attend_and_excite:tokens=@ttalign.shapes.world:subject_words,attn_res=8x8,max_iter_to_alter=10,"
AE_FLOW += "thresholds=0:0.05;4:0.5;8:0.8"
REGIONS = "region_reweight:regions=@ttalign.shapes.world:layout_regions"
NOISE = "noise_optimization:reward=shapes_soft,steps=3,optimizer=adamw,lr=0.3,grad_clip=10"
METHODS = "--per-category 20 --seeds 2"
FLOW_METHODS = "--model flow " + METHODS
ATTENTION = "--categories two_objects,position,color_attribution --per-category 40 --seeds 4"
FLOW_ATTENTION = "--model flow " + ATTENTION
CONFIRM = "--categories position --per-category 200 --seeds 4 --prompt-seed 99"
HEADLINE = "--per-category 40 --seeds 4"
VS_BASELINE = HEADLINE + " --baseline headline_baseline"
COMPOSITE = "counting,two_objects,position,color_attribution"
WHOLE_SET = "--eval-per-category 40 --eval-seeds 4"


def _method_runs(common: str, eta: str = "") -> tuple[Step, ...]:
    """Every inference-time method on the shapes world against the baseline (the method benchmark)."""
    ae = AE_FLOW if "--model flow" in common else AE_SD
    runs = [
        ("baseline", ()),
        ("best_of_2", ("best_of_n:n=2,reward=shapes_soft",)),
        ("best_of_4", ("best_of_n:n=4,reward=shapes_soft",)),
        ("particle_steering_2", (f"particle_steering:particles=2,reward=shapes_soft{eta}",)),
        ("particle_steering_4", (f"particle_steering:particles=4,reward=shapes_soft{eta}",)),
        ("seed_search_4", ("seed_search:n=4,reward=shapes_soft",)),
        ("reward_guidance", ("reward_guidance:reward=shapes_soft,scale=5",)),
        ("noise_optimization_3", (NOISE,)),
        ("attend_and_excite", (ae,)),
        ("region_reweight", (REGIONS,)),
    ]
    return tuple(_shapes(name, common, align, prefix="methods_") for name, align in runs)


SUITES: dict[str, Suite] = {
    "overhead": Suite(
        "No-method overhead of each aligned pipeline against its diffusers parent, interleaved rounds.",
        tuple(
            Step(f"overhead_{family}", "overhead.py", f"--rounds 60 --steps 10 --family {family}")
            for family in ("sd", "sdxl", "sd3", "flux")
        ),
        timing=True,
        quoted_in=("README.md", "docs/benchmarks.md"),
    ),
    "attend_excite": Suite(
        "Attend-and-Excite against diffusers' deprecated pipeline (same images), and its cost on SDXL's and the "
        "joint-attention layouts; three repeats where the sides are timed against each other.",
        (
            Step("test_sizes", "attend_excite.py", "--size 128 --steps 8 --prompts 4 --repeat 3"),
            Step(
                "sd_layout",
                "attend_excite.py",
                "--layout sd --size 512 --steps 8 --prompts 2 --repeat 3 --name attend_excite_sd",
            ),
            Step("sdxl_layout", "attend_excite_sdxl.py", "--size 1024 --steps 4 --prompts 2"),
            Step("sd3", "attend_excite_flow.py", "--family sd3 --size 512 --steps 4 --prompts 2"),
            Step("flux", "attend_excite_flow.py", "--family flux --size 512 --steps 4 --prompts 2"),
            Step(
                "sd_256",
                "attend_excite.py",
                "--layout sd --size 256 --steps 8 --prompts 2 --threads 1 --kept --name attend_excite_sd_256",
            ),
            Step(
                "sdxl_256",
                "attend_excite_sdxl.py",
                "--size 256 --steps 8 --prompts 2 --threads 1 --name attend_excite_sdxl_256",
            ),
            Step(
                "sd3_256",
                "attend_excite_flow.py",
                "--family sd3 --size 256 --steps 8 --prompts 2 --threads 1 --name attend_excite_sd3_256",
            ),
            Step(
                "flux_256",
                "attend_excite_flow.py",
                "--family flux --size 256 --steps 8 --prompts 2 --threads 1 --name attend_excite_flux_256",
            ),
        ),
        timing=True,
        quoted_in=("README.md", "docs/benchmarks.md"),
    ),
    "real_width": Suite(
        "Every method's time and peak memory against the plain call on SD 1.5, SDXL, SD3.5-Medium and FLUX.1-dev "
        "built from their published configurations with random weights: on CPU in bf16 at 256 px (FLUX.1 with 2 + 4 "
        "of its blocks, T5-XXL with 2 of its layers); the `gpu` step runs every model whole at its native "
        "resolution in its own precision (not run yet). `cpu_joint_ae` re-measures A&E alone on the joint-attention "
        "models, `cpu_grad` the methods that backpropagate (after the VAE decode's block checkpointing) on all four, "
        "`cpu_noise_blocks` noise optimization with and without the denoiser's blocks checkpointed inside each step.",
        (
            Step("cpu", "real_width.py", "--size 256 --steps 4 --prompts 1 --refinements 5"),
            Step(
                "cpu_joint_ae",
                "real_width.py",
                "--size 256 --steps 4 --prompts 1 --refinements 5 --families sd3,flux "
                "--methods plain,attend_and_excite,attend_and_excite_kept --name real_width_joint_ae",
            ),
            Step(
                "cpu_grad",
                "real_width.py",
                "--size 256 --steps 4 --prompts 1 --refinements 5 "
                "--methods plain,reward_guidance,noise_optimization,attend_and_excite,attend_and_excite_kept "
                "--name real_width_grad",
            ),
            Step(
                "cpu_noise_blocks",
                "real_width.py",
                "--size 256 --steps 4 --prompts 1 --methods plain,noise_optimization,noise_optimization_blocks "
                "--name real_width_noise_blocks",
            ),
            Step("gpu", "real_width.py", "--full --device cuda --steps 8 --prompts 1 --refinements 5"),
        ),
        timing=True,
        quoted_in=("README.md", "docs/benchmarks.md"),
    ),
    "shapes": Suite(
        "The SD shapes model on the whole evaluation set: plain and best-of-4 by the soft verifier.",
        (
            Step("baseline", "shapes_eval.py", "--name baseline"),
            Step("best_of_4", "shapes_eval.py", "--name best_of_4 --align best_of_n:n=4,reward=shapes_soft"),
        ),
        quoted_in=("docs/shapes.md",),
    ),
    "methods": Suite(
        "Every inference-time method on the SD shapes model against the baseline (20 prompts per category x 2 "
        "images, the same seeds), then the equal-compute table and plot.",
        (*_method_runs(METHODS), Step("table", "equal_compute.py")),
        quoted_in=("docs/benchmarks.md",),
    ),
    "methods_flow": Suite(
        "The flow shapes model (SD3's layout): its baseline on the whole evaluation set, its attention maps, then "
        "every method against the baseline on the SD model's method prompts and seeds, and the equal-compute table.",
        (
            Step("baseline_whole_set", "shapes_eval.py", "--model flow --name baseline"),
            Step("attention_maps", "attention_maps.py", "--model flow --per-category 40 --seeds 2"),
            *_method_runs(FLOW_METHODS, eta=",eta=0.7"),
            Step("table", "equal_compute.py", "--model flow"),
        ),
        quoted_in=("README.md", "docs/benchmarks.md"),
    ),
    "attention": Suite(
        "Attention control on the SD shapes model: Attend-and-Excite and region re-weighting against the baseline on "
        "the categories they address (40 prompts per category x 4 images), paired; what its attention maps look "
        "like.",
        (
            Step("attention_maps", "attention_maps.py", "--per-category 40 --seeds 2"),
            _shapes("baseline", ATTENTION, prefix="attention_"),
            _shapes("attend_and_excite", ATTENTION, (AE_SD,), prefix="attention_"),
            _shapes("region_reweight", ATTENTION, (REGIONS,), prefix="attention_"),
            _shapes(
                "region_reweight_in_context", ATTENTION, (REGIONS + ",encode_phrases=false",), prefix="attention_"
            ),
            _shapes("region_reweight_cross3", ATTENTION, (REGIONS + ",cross_weight=3",), prefix="attention_"),
            _shapes("attend_and_excite_region_reweight", ATTENTION, (AE_SD, REGIONS), prefix="attention_"),
            Step("table", "attention_table.py"),
        ),
        quoted_in=("docs/benchmarks.md",),
    ),
    "attention_flow": Suite(
        "Attention control on the flow shapes model's joint attention, as the `attention` suite for the SD model.",
        (
            _shapes("baseline", FLOW_ATTENTION, prefix="attention_"),
            _shapes("attend_and_excite", FLOW_ATTENTION, (AE_FLOW,), prefix="attention_"),
            _shapes("region_reweight", FLOW_ATTENTION, (REGIONS,), prefix="attention_"),
            _shapes("region_reweight_cross3", FLOW_ATTENTION, (REGIONS + ",cross_weight=3",), prefix="attention_"),
            Step("table", "attention_table.py", "--prefix flow_attention"),
        ),
        quoted_in=("README.md", "docs/benchmarks.md", "docs/efficacy.md"),
    ),
    "region_confirm": Suite(
        "Region re-weighting on 200 fresh position captions (prompt seed 99) x 4 images against the baseline.",
        (
            _shapes("baseline", CONFIRM, prefix="confirm_"),
            _shapes("region_reweight", CONFIRM, (REGIONS,), prefix="confirm_"),
            _shapes("region_reweight_in_context", CONFIRM, (REGIONS + ",encode_phrases=false",), prefix="confirm_"),
            Step("table", "attention_table.py", "--prefix confirm"),
        ),
        quoted_in=("docs/benchmarks.md",),
    ),
    "headline": Suite(
        "The README's efficacy table: the strongest methods on the whole evaluation set of the SD shapes model (960 "
        "images per run), with the soft verifier (best case) and the shapes CLIP (honest case), paired with the plain "
        "run.",
        (
            _shapes("baseline", HEADLINE, prefix="headline_"),
            _shapes("best_of_4_soft", VS_BASELINE, ("best_of_n:n=4,reward=shapes_soft",), prefix="headline_"),
            _shapes("best_of_4_clip", VS_BASELINE, ("best_of_n:n=4,reward=shapes_clip",), prefix="headline_"),
            _shapes(
                "particle_steering_4_soft",
                VS_BASELINE,
                ("particle_steering:particles=4,reward=shapes_soft,lmbda=10",),
                prefix="headline_",
            ),
            _shapes(
                "particle_steering_4_clip",
                VS_BASELINE,
                ("particle_steering:particles=4,reward=shapes_clip,lmbda=0.1",),
                prefix="headline_",
            ),
            _shapes(
                "reward_guidance_soft",
                VS_BASELINE,
                ("reward_guidance:reward=shapes_soft,scale=5",),
                prefix="headline_",
            ),
            Step("table", "equal_compute.py", "--set headline"),
        ),
        quoted_in=("README.md", "docs/efficacy.md"),
    ),
    "scaling": Suite(
        "Compute scaling and over-optimization on the SD shapes model: noise optimization's per-iteration record on "
        "both rewards, then verified success against NFE for every reward-driven method.",
        (
            *(
                Step(
                    f"overoptimization_{reward}",
                    "overoptimization.py",
                    f"--reward {reward} --iterations 15 --batch-prompts 16 --categories {COMPOSITE}",
                )
                for reward in ("shapes_soft", "shapes_clip")
            ),
            Step("compute_scaling", "compute_scaling.py"),
        ),
        quoted_in=("README.md", "docs/efficacy.md"),
    ),
    "training": Suite(
        "LoRA training on the SD shapes model (captions disjoint from the evaluation set), each LoRA evaluated at 1x "
        "NFE and paired with the base model.",
        (
            Step(
                "dpo_guided",
                "train_shapes.py",
                f"--trainers dpo,dpo_guided --prompts 1200 --dpo-steps 2000 --lr 1e-3 {WHOLE_SET} "
                "--name training_guided",
            ),
            Step(
                "dpo_4000",
                "train_shapes.py",
                f"--trainers dpo --prompts 2400 --dpo-steps 4000 --lr 1e-3 {WHOLE_SET} --name training_dpo_4000",
            ),
            Step("dpo_draft", "train_shapes.py", "--prompts 400 --dpo-steps 1000 --draft-steps 60 --lr 1e-3"),
            Step(
                "ddpo",
                "train_shapes.py",
                "--prompts 400 --trainers ddpo --ddpo-steps 40 --lr 1e-3 --name training_ddpo",
            ),
        ),
        quoted_in=("README.md", "docs/benchmarks.md", "docs/efficacy.md", "docs/training.md"),
    ),
    "training_efficiency": Suite(
        "The online trainers side by side at equal training wall time (30 minutes each) on a shapes model, verified "
        "success against training minutes and images sampled. Each model's trainers run in parts of one or two "
        "(`flow_soft_a` .. `_e`, `sd_soft_a` .. `_f`; about 40 minutes a trainer, two parts at a time side by side "
        "with OMP_NUM_THREADS=1), merged into one table by `flow_soft`, `sd_soft`; the `_vqa` steps train on the "
        "learned shapes VQA reward instead of the soft verifier; `sd_soft_<trainer>_paper_lr` run RWR, D3PO, RAFT "
        "and SPO at their papers' learning rates (1e-5, 3e-5, 9e-6, 6e-5) instead of the shared 3e-4, "
        "`flow_soft_awm_lr_1e-4`, `flow_soft_nft_lr_1e-4` AWM and DiffusionNFT at 1e-4; "
        "`<model>_soft_60_<trainer>` train for 60 minutes (`LONG_RUNS`, evaluated every 10 minutes; about 70 minutes "
        "a part; `<model>_soft_60_<trainer>_paper_lr` at the paper's lr, a table of its own), merged at the shared lr "
        "by `<model>_soft_60`; `<model>_vqa_60_<trainer>` train 60 minutes on the learned reward (`LONG_RUNS_VQA`).",
        (
            *(
                step
                for model in ("flow", "sd")
                for reward in ("soft", "vqa")
                for step in _efficiency_parts(model, reward)
            ),
            # the SD trainers that fell at the shared lr, at their papers' rates (REFERENCES.md)
            *(
                Step(
                    f"sd_soft_{kind}_paper_lr",
                    "train_efficiency.py",
                    f"--model sd --reward shapes_soft --trainers {kind} --lr {lr} --minutes 30 "
                    f"--name train_efficiency_sd_soft_{kind}_paper_lr",
                )
                for kind, lr in PAPER_LR.items()
            ),
            # AWM and DiffusionNFT, which peaked at 20 minutes and then fell back (`flow_soft_60_awm`, `_nft`), at a
            # third of the shared lr
            *(
                Step(
                    f"flow_soft_{kind}_lr_1e-4",
                    "train_efficiency.py",
                    f"--model flow --reward shapes_soft --trainers {kind} --lr 1e-4 --minutes 30 --eval-every 10 "
                    f"--name train_efficiency_flow_soft_{kind}_lr_1e-4",
                )
                for kind in ("awm", "nft")
            ),
            # 60 minutes of training, one trainer a part (two side by side), evaluated every 10 minutes
            *(_long_run(model, kind) for model, kinds in LONG_RUNS.items() for kind in kinds),
            *(_long_run(model, kind, "vqa") for model, kinds in LONG_RUNS_VQA.items() for kind in kinds),
            *(
                Step(
                    f"{model}_soft_60",
                    "train_efficiency.py",
                    "--merge "
                    + ",".join(
                        f"train_efficiency_{model}_soft_60_{kind}" for kind in kinds if not _paper_lr(model, kind)
                    )
                    + f" --name train_efficiency_{model}_soft_60",
                )
                for model, kinds in LONG_RUNS.items()
                if len(kinds) > 1
            ),
            Step(
                "flow_vqa_ab",
                "train_efficiency.py",
                "--merge train_efficiency_flow_vqa_a,train_efficiency_flow_vqa_b --name train_efficiency_flow_vqa_ab",
            ),
        ),
        quoted_in=("docs/training.md",),
    ),
    "tuned_loras": Suite(
        "The tuned shapes LoRAs (`load_pipeline('sd-tuned')`, `'flow-tuned'`): per model, trainers on the soft "
        "verifier (SD RAFT 30 min, flow DiffusionNFT 50 min, flow AWM 20 min) and RAFT on the exact verifier's "
        "passing images (50 min), 1-thread training on captions disjoint from the evaluation set, with the learning "
        "curve on 120 evaluation images every 10 minutes; SD: Diffusion-DPO on verifier-labelled pairs whose winners "
        "region re-weighting drew (as `training --only dpo_guided`, 120 evaluation images after training), or "
        "particle steering on the soft verifier (`sd_dpo_particle`, 800 captions), or a second on-policy DPO round "
        "from the installed SD LoRA (`sd_dpo_round2`, saved stacked on it); LoRAs saved at half strength before "
        "`save_lora` kept alpha / rank, rescaled (`*_rescale`); the installed LoRAs' strength chosen on a selection "
        "set apart from the evaluation set (`<model>_scale`); then the LoRAs on "
        "the whole evaluation set (240 x 4) against their base, installed in ttalign/shapes/tuned/<model>/ where "
        "better than the base and than the LoRA installed there.",
        (
            Step(
                "sd",
                "train_efficiency.py",
                "--model sd --reward shapes_soft --trainers raft --lr 1e-4 --minutes 30 --eval-every 10 "
                "--save-lora benchmarks/.cache/tuned/sd --name tuned_sd",
            ),
            Step(
                "flow",
                "train_efficiency.py",
                "--model flow --reward shapes_soft --trainers nft --minutes 50 --eval-every 10 "
                "--save-lora benchmarks/.cache/tuned/flow --name tuned_flow",
            ),
            Step(
                "sd_exact",
                "train_efficiency.py",
                "--model sd --reward shapes_exact --raft-min-reward 0.5 --trainers raft --lr 1e-4 --minutes 50 "
                "--eval-every 10 --save-lora benchmarks/.cache/tuned_exact/sd --name tuned_sd_exact",
            ),
            Step(
                "flow_exact",
                "train_efficiency.py",
                "--model flow --reward shapes_exact --raft-min-reward 0.5 --trainers raft --lr 1e-4 --minutes 50 "
                "--eval-every 10 --save-lora benchmarks/.cache/tuned_exact/flow --name tuned_flow_exact",
            ),
            Step(
                "flow_exact_kl",
                "train_efficiency.py",
                "--model flow --reward shapes_exact --raft-min-reward 0.5 --kl-weight 1.0 --trainers raft --lr 1e-4 "
                "--minutes 30 --eval-every 10 --save-lora benchmarks/.cache/tuned_exact_kl/flow "
                "--name tuned_flow_exact_kl",
            ),
            Step(
                "sd_dpo_guided",
                "train_shapes.py",
                "--trainers dpo_guided --prompts 1200 --dpo-steps 2000 --lr 1e-3 --eval-per-category 10 "
                "--eval-seeds 2 --save-lora benchmarks/.cache/tuned/sd --name tuned_sd_dpo_guided",
            ),
            Step(
                "sd_dpo_particle",
                "train_shapes.py",
                "--trainers dpo_guided --guide particle_steering:particles=4,reward=shapes_soft --prompts 800 "
                "--dpo-steps 2000 --lr 1e-3 --eval-per-category 10 --eval-seeds 2 "
                "--save-lora benchmarks/.cache/tuned_particle/sd --name tuned_sd_dpo_particle",
            ),
            Step(
                "eval_sd",
                "tuned_eval.py",
                "--model sd --lora benchmarks/.cache/tuned/sd/raft --install "
                "--trained-by 'python benchmarks/run.py tuned_loras --only sd'",
            ),
            Step(
                "eval_sd_dpo_guided",
                "tuned_eval.py",
                "--model sd --lora benchmarks/.cache/tuned/sd/dpo_guided --install --name tuned_sd_dpo_guided_eval "
                "--trained-by 'python benchmarks/run.py tuned_loras --only sd_dpo_guided'",
            ),
            # Once, on LoRAs saved before `save_lora` wrote the scale alpha / rank (2 in `train_efficiency.py`) into
            # the file, so that they loaded at half their trained strength: the installed DiffusionNFT LoRA (`flow`)
            # and the AWM one (`flow_awm`), at full strength, evaluated again (LoRAs saved since are at full strength).
            Step(
                "flow_rescale",
                "rescale_lora.py",
                "--lora ttalign/shapes/tuned/flow --scale 2 --out benchmarks/.cache/rescaled/flow/nft",
            ),
            Step(
                "eval_flow_rescaled",
                "tuned_eval.py",
                "--model flow --lora benchmarks/.cache/rescaled/flow/nft --install --name tuned_flow_rescaled_eval "
                "--trained-by 'python benchmarks/run.py tuned_loras --only flow, then --only flow_rescale'",
            ),
            Step(
                "flow_awm_rescale",
                "rescale_lora.py",
                "--lora benchmarks/.cache/tuned_awm/flow/awm --scale 2 --out benchmarks/.cache/rescaled/flow/awm",
            ),
            Step(
                "eval_flow_awm_rescaled",
                "tuned_eval.py",
                "--model flow --lora benchmarks/.cache/rescaled/flow/awm --install "
                "--name tuned_flow_awm_rescaled_eval "
                "--trained-by 'python benchmarks/run.py tuned_loras --only flow_awm, then --only flow_awm_rescale'",
            ),
            # a second on-policy round: pairs drawn from the installed SD LoRA's model, which is also the DPO reference
            Step(
                "sd_dpo_round2",
                "train_shapes.py",
                "--start sd-tuned --trainers dpo_guided --prompts 1200 --dpo-steps 2000 --lr 1e-3 "
                "--eval-per-category 10 --eval-seeds 2 --save-lora benchmarks/.cache/tuned_round2/sd "
                "--name tuned_sd_dpo_round2",
            ),
            Step(
                "eval_sd_dpo_round2",
                "tuned_eval.py",
                "--model sd --lora benchmarks/.cache/tuned_round2/sd/dpo_guided --install "
                "--name tuned_sd_dpo_round2_eval --trained-by 'python benchmarks/run.py tuned_loras --only "
                "sd_dpo_guided, then --only sd_dpo_round2 (stacked)'",
            ),
            Step(
                "eval_sd_dpo_particle",
                "tuned_eval.py",
                "--model sd --lora benchmarks/.cache/tuned_particle/sd/dpo_guided --install "
                "--name tuned_sd_dpo_particle_eval "
                "--trained-by 'python benchmarks/run.py tuned_loras --only sd_dpo_particle'",
            ),
            Step(
                "eval_flow",
                "tuned_eval.py",
                "--model flow --lora benchmarks/.cache/tuned/flow/nft --install "
                "--trained-by 'python benchmarks/run.py tuned_loras --only flow'",
            ),
            # AWM for the 20 minutes where its 60-minute efficiency run peaked (`flow_soft_60_awm`)
            Step(
                "flow_awm",
                "train_efficiency.py",
                "--model flow --reward shapes_soft --trainers awm --minutes 20 --eval-every 10 "
                "--save-lora benchmarks/.cache/tuned_awm/flow --name tuned_flow_awm",
            ),
            Step(
                "eval_flow_awm",
                "tuned_eval.py",
                "--model flow --lora benchmarks/.cache/tuned_awm/flow/awm --install --name tuned_flow_awm_eval "
                "--trained-by 'python benchmarks/run.py tuned_loras --only flow_awm'",
            ),
            # the shipped LoRAs' strength, chosen on a selection set apart from the evaluation set, then judged on it
            # (the record of the LoRA `lora_scale.py` writes carries the command that trained it and its own)
            *(
                step
                for model, scales in (("flow", "0.5,1,1.25,1.5,1.75,2"), ("sd", "0.75,1,1.25,1.5"))
                for step in (
                    Step(
                        f"{model}_scale",
                        "lora_scale.py",
                        f"--model {model} --lora ttalign/shapes/tuned/{model} --scales {scales} "
                        f"--out benchmarks/.cache/scaled/{model} --name lora_scale_{model}",
                    ),
                    Step(
                        f"eval_{model}_scaled",
                        "tuned_eval.py",
                        f"--model {model} --lora benchmarks/.cache/scaled/{model} --install "
                        f"--name tuned_{model}_scaled_eval",
                    ),
                )
            ),
        ),
        quoted_in=("docs/training.md",),
    ),
    "preferences": Suite(
        "The preference loop on the SD shapes model: verifier-labelled pairs through the judgment store, a reward "
        "fitted in at most 20 minutes, its held-out accuracy against the shapes CLIP and the soft verifier, and "
        "best-of-8 with it and with the shapes CLIP among the same candidates on the evaluation set (240 x 4), and "
        "particle steering with it (120 prompts x 2).",
        (
            Step(
                "loop_first",
                "preference_loop.py",
                "--captions 1200 --pairs 2000 --minutes 20 --lr 1e-4 --name preference_loop_first",
            ),
            Step(
                "loop",
                "preference_loop.py",
                "--captions 2000 --pairs 2000 --minutes 20 --lr 1e-5 --name preference_loop",
            ),
        ),
        quoted_in=("docs/preferences.md",),
    ),
    "verifier_quality": Suite(
        "How well each shapes reward ranks a shapes model's own candidates, judged by the exact verifier: ROC AUC per "
        "category and best-of-8 (960 candidates per model: 10 prompts per category x 2 groups of 8).",
        (
            Step(
                "sd",
                "verifier_quality.py",
                "--model sd --per-category 10 --seeds 2 --candidates 8 --name verifier_quality_sd",
            ),
            Step(
                "flow",
                "verifier_quality.py",
                "--model flow --per-category 10 --seeds 2 --candidates 8 --name verifier_quality_flow",
            ),
        ),
        quoted_in=("docs/composition.md", "docs/efficacy.md"),
    ),
    "compat_matrix": Suite(
        "Every method and the plain call on every family's tiny components with each runtime feature (VAE tiling and "
        "slicing, offloading, the attention-backend switch, regional torch.compile, a LoRA, quantized weights): same "
        "images, a refusal, or a failure.",
        (Step("matrix", "compat_matrix.py", "--name compat_matrix"),),
        quoted_in=("docs/runtime.md",),
    ),
    "composition_targets": Suite(
        "Best-of-8 with each shapes reward on the whole evaluation set (240 prompts x 4 seeds, 8 candidates each: "
        "7,680 images per model, 8x the baseline's NFE), judged by the exact verifier; the learned rewards "
        "(shapes_clip, shapes_vqa, shapes_questions) against the composition targets, the soft verifier beside them.",
        (
            Step(
                "sd",
                "verifier_quality.py",
                "--model sd --per-category 40 --seeds 4 --candidates 8 --name composition_targets_sd",
            ),
            Step(
                "flow",
                "verifier_quality.py",
                "--model flow --per-category 40 --seeds 4 --candidates 8 --name composition_targets_flow",
            ),
        ),
        quoted_in=("docs/composition.md", "docs/efficacy.md"),
    ),
    "training_flow": Suite(
        "Flow-GRPO and Flow-DPO on the flow shapes model (captions disjoint from the evaluation set), with their "
        "over-optimization monitors, and Flow-GRPO's learning signal on one caption.",
        (
            Step(
                "grpo_soft",
                "train_shapes_flow.py",
                "--trainers grpo --minutes 25 --kl-weight 0.01 --name training_flow_grpo_soft",
            ),
            Step(
                "grpo_exact",
                "train_shapes_flow.py",
                "--trainers grpo --minutes 30 --reward shapes_exact --sde-window 3 --group-size 8 --groups 3 "
                "--grpo-lr 3e-4 --kl-weight 0.01 --prompts 400 --monitor-every 40 --name training_flow_grpo_exact",
            ),
            Step(
                "dpo",
                "train_shapes_flow.py",
                "--trainers dpo --minutes 30 --prompts 600 --max-steps 20000 --monitor-every 300 "
                "--name training_flow_dpo",
            ),
            Step("grpo_one_caption", "grpo_one_caption.py", "--lrs 3e-4,1e-3,5e-3 --steps 40"),
        ),
        quoted_in=("docs/benchmarks.md", "docs/training.md"),
    ),
    "serving": Suite(
        "The server under load: 200 concurrent clients, merged batches.",
        (Step("load", "serve_load.py", "--clients 200 --requests 1 --steps 10"),),
        timing=True,
        quoted_in=("docs/benchmarks.md", "docs/serving.md"),
    ),
    "rewards": Suite(
        "The built-in rewards' speed and memory.",
        (Step("rewards", "rewards.py", "--images 64 --rounds 5"),),
        timing=True,
        quoted_in=("docs/benchmarks.md",),
    ),
    "sampler_memory": Suite(
        "The differentiable sampler's memory with and without gradient checkpointing.",
        (Step("sampler_memory", "sampler_memory.py", "--steps 10 25 --batch 64"),),
        timing=True,
        quoted_in=("docs/benchmarks.md",),
    ),
}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _snapshot(folder: str) -> dict[str, float]:
    if not os.path.isdir(folder):
        return {}
    return {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}


def run_suite(name: str, only: list[str] | None = None, python: str = sys.executable) -> list[dict]:
    """Runs the suite's steps (those named in `only`), each as a fresh process, and appends each to `runs.json`."""
    from common import environment

    suite = SUITES[name]
    steps = [s for s in suite.steps if not only or s.name in only]
    unknown = sorted(set(only or ()) - {s.name for s in suite.steps})
    if unknown:
        raise SystemExit(f"{name} has no steps {unknown}; its steps: {[s.name for s in suite.steps]}")
    folder = os.path.join(RESULTS_ROOT, name)
    os.makedirs(folder, exist_ok=True)
    env = dict(os.environ, TTALIGN_RESULTS=folder, TTALIGN_QUIET="1")
    records = []
    for step in steps:
        before = _snapshot(folder)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        commit = _git_commit()  # the code the step runs (a long step may end after later commits)
        print(f"== {name}/{step.name}: {step.command}", flush=True)
        start = time.perf_counter()
        subprocess.run([python, os.path.join(HERE, step.script), *step.argv], cwd=ROOT, env=env, check=True)
        after = _snapshot(folder)
        wrote = sorted(f for f, t in after.items() if before.get(f) != t and f != "runs.json")
        records.append(
            {
                "step": step.name,
                "command": step.command,
                "started": started,
                "wall_s": round(time.perf_counter() - start, 1),
                "wrote": wrote,
            }
        )
        log_path = os.path.join(folder, "runs.json")
        log = json.load(open(log_path)) if os.path.isfile(log_path) else {"suite": name, "runs": []}
        log["description"] = suite.description
        log["runs"].append({**records[-1], "git_commit": commit, "environment": environment()})
        with open(log_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(log, f, indent=2)
            f.write("\n")
        os.replace(log_path + ".tmp", log_path)
    write_index()
    return records


def _made_by(folder: str) -> dict[str, str]:
    """File -> the command that made it: a results JSON's own `command` (for it and its same-named `.md` / `.png`),
    else the step of the suite's `runs.json` that last wrote it."""
    made = {}
    log_path = os.path.join(folder, "runs.json")
    if os.path.isfile(log_path):
        for run in json.load(open(log_path))["runs"]:
            for file in run["wrote"]:
                made[file] = run["command"]
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and name != "runs.json":
            try:
                command = json.load(open(os.path.join(folder, name))).get("command")
            except (ValueError, AttributeError):
                command = None
            if command:
                stem = name[: -len(".json")]
                for other in os.listdir(folder):
                    if other.rsplit(".", 1)[0] == stem:
                        made[other] = command.strip()
    return made


def write_index() -> str:
    """Writes `benchmarks/results/INDEX.md`: per suite, its command and every table and plot with what made it."""
    lines = [
        "# Benchmark results",
        "",
        "Every table (`.md`) and plot (`.png`) below, by suite, with the command that made it. Rerun a suite with "
        "`python benchmarks/run.py SUITE` (or one step with `--only STEP`); each suite's `runs.json` records its runs "
        "(commit, library versions, wall time). This file is written by `python benchmarks/run.py --index`.",
        "",
    ]
    for name, suite in SUITES.items():
        folder = os.path.join(RESULTS_ROOT, name)
        lines += [f"## {name}", "", suite.description + (" Timings: run alone." if suite.timing else ""), ""]
        lines += [
            f"`python benchmarks/run.py {name}`"
            + (f"; quoted in {', '.join(suite.quoted_in)}" if suite.quoted_in else ""),
            "",
        ]
        if not os.path.isdir(folder):
            lines += ["(not run yet)", ""]
            continue
        made = _made_by(folder)
        shown = [f for f in sorted(os.listdir(folder)) if f.endswith((".md", ".png"))]
        lines += ["| file | made by |", "|---|---|"]
        suite_command = f"python benchmarks/run.py {name}"
        lines += [f"| [{f}]({name}/{f}) | `{made.get(f, suite_command)}` |" for f in shown]
        lines.append("")
    text = "\n".join(lines)
    path = os.path.join(RESULTS_ROOT, "INDEX.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("suite", nargs="?", choices=sorted(SUITES))
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps of the suite")
    parser.add_argument("--list", action="store_true", help="list the suites and their steps")
    parser.add_argument("--index", action="store_true", help="rewrite results/INDEX.md and stop")
    args = parser.parse_args(argv)
    if args.list:
        for name, suite in SUITES.items():
            print(f"{name}{' (timing: run alone)' if suite.timing else ''}: {suite.description}")
            for step in suite.steps:
                print(f"  {step.name}: {step.command}")
        return
    if args.index:
        print(write_index())
        return
    if args.suite is None:
        parser.error("name a suite (--list shows them)")
    run_suite(args.suite, args.only)


if __name__ == "__main__":
    main()
