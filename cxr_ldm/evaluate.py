"""Evaluates a text-to-CXR checkpoint: does the generated image show what the prompt says?

    python -m cxr_ldm.evaluate --checkpoint workdir/default --out r.json [--prompts test|dev|FILE.json]
        [--dataset phantom_cxr]
        [--num-samples 10] [--steps 25] [--guidance G] [--guidance-sweep 2,3,4]
        [--inception-weights pt_inception.safetensors] [--variant fp16] [--allow-pickle]

Writes the JSON (top level: conditioning_accuracy (strict: finding, side, grade, location, device types,
nothing unprompted), presence_accuracy (finding types only), attribute_accuracy, prompt_set,
classifier_accuracy_real and the sections below) and a Markdown report beside it (r.md, with PNG grids in
r_assets/). Prompts: the held-out `test` set by default (report it), `dev` (choose recipes on it), the
`handwritten` set or its `reworded` part, or a prompt file (cxr_ldm/evaluation/prompts.py has the schema);
a malformed file stops the run before any work with a one-line error naming the entry, key and value, as do
counts below 1 and guidance settings out of range. Prompts longer than the text encoder's window are listed in
truncated_prompts, with the part the encoder reads.

  classifier      a finding classifier trained on the real training split, its accuracy on the real
                  test split; cached beside the data (<data_dir>/cxr_ldm_eval/) so that every checkpoint
                  evaluated on a data set is judged by the same classifier (retrained if the data or
                  the recipe change)
  conditioning    generated images per evaluation prompt, classified (evaluation/conditioning.py);
                  for phantom_cxr also real phantom studies of each prompt scored the same way
                  (conditioning_accuracy_real_studies: what a perfect generator would get) and the
                  same studies through the checkpoint's VAE (conditioning_accuracy_vae_reconstructed:
                  the most its diffusion model can reach with this autoencoder), each with the share
                  of studies whose film hides a stated finding and the strict accuracy on the others
                  (occluded_share, conditioning_accuracy_visible)
  fid             domain FID (classifier features) of images generated from the test studies' prompts
                  vs those real test images; the fair floor (phantom_cxr): the same studies against a
                  second rendering of their cases (other patients); real vs real (validation vs test);
                  Inception-V3 FID with --inception-weights, torchxrayvision DenseNet-121 FID with
                  --xrv-weights
  diversity       mean pairwise MS-SSIM within a prompt, and among real images with the same findings
  reconstruction  VAE round trip PSNR / SSIM / RMSE on the real test split
  memorization    nearest training image of each generated image (evaluation/memorization.py)
  augmentation    (--augmentation-experiment) classifier on a small real set vs plus synthetic images (generated,
                  or read from a synthetic data set with --augmentation-data DIR)
  guidance_sweep  (--guidance-sweep) conditioning accuracy and domain FID at other guidance scales, on the
                  headline's prompts and seeds: the trade-off a recipe's guidance scale is chosen on

`--judge-only` (no --checkpoint) measures the judge itself: the classifier's accuracy on real test images and,
on phantom_cxr, the strict and presence ceilings of the prompt set.

`--edits` scores counterfactual edits of held-out phantom films instead (cxr_ldm/evaluation/edits.py): one
finding added or removed by prompt with SDEdit, masked SDEdit, inpainting and DDIM-inversion editing, against the
true counterfactual the phantom renders for the same patient: strict edit success, preservation outside the
finding's region, fidelity to the counterfactual, each with intervals; `--prompts dev` edits validation studies
(choose --edit-strength and --guidance there), `test` (the default) test studies.

`--vae-only` judges an autoencoder alone (a train.py workdir's, a pipeline folder's `vae/`, or an
AutoencoderKL folder), with no diffusion model: the classifier, the reconstruction section and, for
phantom_cxr, the two conditioning ceilings above; r.md then holds those and a grid of test images beside
their reconstructions.
"""
from __future__ import annotations

import argparse
import json
import logging

from cxr_ldm.cli_types import number, positive_int, strength
from cxr_ldm.data.builders import BUILDERS
from cxr_ldm.diffusion.samplers import SAMPLERS
from cxr_ldm.evaluation.evaluator import (
    DEFAULT_DATA_DIR,
    DEFAULT_DATASET,
    DEFAULT_GUIDANCE,
    EvalSettings,
    evaluate,
    evaluate_autoencoder,
    evaluate_edits,
    evaluate_judge,
    resolve_prompts,
)
from cxr_ldm.evaluation.edits import EDIT_SETS
from cxr_ldm.evaluation.prompts import PROMPT_SETS, PromptFileError
from cxr_ldm.io.compilation_cache import NO_CACHE_HELP, enable_compilation_cache
from cxr_ldm.io.weights import PickleRefusedError


def _scales(text: str) -> tuple[float, ...]:
    """"2,3,4.5" -> (2.0, 3.0, 4.5), for --guidance-sweep."""
    try:
        scales = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 2,3,4, got {text!r}") from None
    if any(scale < 1.0 for scale in scales):
        raise argparse.ArgumentTypeError(f"guidance scales must be >= 1 (1 = no guidance), got {text!r}")
    return scales


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def main(argv=None) -> None:
    defaults = EvalSettings(checkpoint="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="train.py workdir or diffusers pipeline folder")
    parser.add_argument("--out", required=True, help="output JSON file; the report goes beside it")
    parser.add_argument("--variant", default=None,
                        help="weight variant of the checkpoint's components, e.g. fp16 for *.fp16.safetensors")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read components whose only weights are .bin pickles; only for files you trust")
    parser.add_argument("--prompts", default="test",
                        help=f"a prompt set ({', '.join(PROMPT_SETS)}) or a prompt file (JSON list, see "
                             "cxr_ldm/evaluation/prompts.py); recipes are chosen on dev, test is reported")
    parser.add_argument("--dataset", default=None, choices=sorted(BUILDERS),
                        help=f"default: the workdir's training data set, else {DEFAULT_DATASET}")
    parser.add_argument("--dataset-config", default=None,
                        help="TFDS config (default: the workdir's, else the one at the checkpoint's image size)")
    parser.add_argument("--data-dir", default=None, help=f"default: the workdir's, else {DEFAULT_DATA_DIR}")
    parser.add_argument("--manual-dir", default=None, help="where MIMIC-CXR-JPG / Open-i lie (manual download)")
    parser.add_argument("--num-samples", type=positive_int, default=defaults.num_samples, help="images per prompt")
    parser.add_argument("--num-fid", type=positive_int, default=defaults.num_fid, help="images per FID set")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps)
    parser.add_argument("--guidance", type=number(1.0, note=" (1 = no guidance)"), default=None,
                        help=f"classifier-free guidance scale (default: the workdir config's sample.guidance_scale, "
                             f"else {DEFAULT_GUIDANCE})")
    parser.add_argument("--guidance-rescale", type=number(0.0, 1.0), default=defaults.guidance_rescale,
                        help="diffusers' guidance_rescale in [0, 1] (0 = off)")
    parser.add_argument("--apg-eta", type=number(0.0, 1.0), default=defaults.apg_eta,
                        help="adaptive projected guidance: weight in [0, 1] of the guidance update's part parallel "
                             "to the conditional prediction (default: plain classifier-free guidance)")
    parser.add_argument("--apg-norm-threshold", type=number(0.0), default=defaults.apg_norm_threshold,
                        help="with --apg-eta: cap on the guidance update's L2 norm per image (0 = none)")
    parser.add_argument("--guidance-sweep", type=_scales, default=defaults.guidance_sweep,
                        help="comma-separated guidance scales (e.g. 2,3,4,6) also scored on the headline's prompts "
                             "and seeds: conditioning accuracy and domain FID each (the guidance_sweep section)")
    parser.add_argument("--sampler", default=defaults.sampler, choices=SAMPLERS)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--seeds", type=_seed_list, default=defaults.seeds,
                        help="comma-separated sample seeds (e.g. 0,1,2) the strict headline is also scored at: "
                             "its spread over seeds (conditioning_by_seed)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--inception-weights", default=None,
                        help="pytorch-fid Inception-V3 weights as safetensors (see cxr_ldm/evaluation/inception.py)")
    parser.add_argument("--xrv-weights", default=None,
                        help="torchxrayvision DenseNet-121 (densenet121-res224-all) weights as safetensors: an FID in "
                             "the feature space RoentGen reported (see cxr_ldm/evaluation/xrv.py)")
    parser.add_argument("--classifier-dir", default=None,
                        help="classifier cache (default: <data-dir>/cxr_ldm_eval/classifier-<dataset>-<config>)")
    parser.add_argument("--copy-threshold", type=float, default=defaults.copy_threshold)
    parser.add_argument("--augmentation-experiment", action="store_true")
    parser.add_argument("--augmentation-data", default=None,
                        help="with --augmentation-experiment: read the synthetic images from this synthetic data "
                             "set (python -m cxr_ldm.synthesize --out) instead of generating them")
    parser.add_argument("--judge-only", action="store_true",
                        help="no checkpoint: the classifier's accuracy on real images and, on phantoms, the prompt "
                             "set's ceiling (real studies of each prompt scored as generated images are)")
    parser.add_argument("--vae-only", action="store_true",
                        help="judge the checkpoint's autoencoder alone: reconstruction and conditioning ceilings")
    parser.add_argument("--edits", action="store_true",
                        help="score counterfactual edits of phantom films (with --prompts dev or test) instead")
    parser.add_argument("--num-edits", type=positive_int, default=100, help="with --edits: studies edited")
    parser.add_argument("--edit-strength", type=strength, default=0.6,
                        help="with --edits: the SDEdit strength in (0, 1] (inpainting runs at 1)")
    parser.add_argument("--headline-only", action="store_true",
                        help="only the strict and presence conditioning accuracy with their intervals (no ceilings, "
                             "FID, diversity, reconstruction or memorization): for comparing recipes quickly")
    parser.add_argument("--no-compilation-cache", action="store_true", help=NO_CACHE_HELP)
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.judge_only:
        parser.error("--checkpoint is required (except with --judge-only)")
    if args.augmentation_data and not args.augmentation_experiment:
        parser.error("--augmentation-data needs --augmentation-experiment")
    if args.headline_only and (args.augmentation_experiment or args.guidance_sweep or args.vae_only
                               or args.judge_only or args.edits):
        parser.error("--headline-only skips every optional section; it does not go with --augmentation-experiment, "
                     "--guidance-sweep, --vae-only, --judge-only or --edits")
    if args.edits and args.prompts not in EDIT_SETS:
        parser.error(f"--edits takes --prompts {' or '.join(EDIT_SETS)} (the studies to edit), got {args.prompts!r}")
    try:
        resolve_prompts(args.prompts)
    except (PromptFileError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    enable_compilation_cache(not args.no_compilation_cache)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = {k: v for k, v in vars(args).items()
               if k not in ("checkpoint", "out", "vae_only", "judge_only", "variant", "allow_pickle",
                            "no_compilation_cache", "edits", "num_edits", "edit_strength")}
    if args.judge_only:
        results = evaluate_judge(args.out, **options)
        headline = ("conditioning_accuracy_real_studies", "conditioning_accuracy_real_studies_ci",
                    "presence_accuracy_real_studies", "presence_accuracy_real_studies_ci",
                    "classifier_exact_match_real", "classifier_attribute_accuracy_real")
        print(json.dumps({k: results[k] for k in headline}, indent=2))
        return
    if args.vae_only:
        try:
            results = evaluate_autoencoder(args.checkpoint, args.out, variant=args.variant,
                                           allow_pickle=args.allow_pickle, **options)
        except PickleRefusedError as err:
            parser.exit(2, f"{parser.prog}: error: cannot load the autoencoder of {args.checkpoint}: "
                           f"{err.with_hint('--allow-pickle')}\n")
        headline = ("conditioning_accuracy_vae_reconstructed", "classifier_accuracy_real")
        print(json.dumps({**{k: results[k] for k in headline}, **results["reconstruction"]}, indent=2))
        return
    from cxr_ldm.pipeline import Pipeline  # the pipeline pulls in every model; import when evaluating

    try:
        pipe = Pipeline.from_pretrained(args.checkpoint, variant=args.variant, allow_pickle=args.allow_pickle)
    except PickleRefusedError as err:
        parser.exit(2, f"{parser.prog}: error: cannot load checkpoint {args.checkpoint}: "
                       f"{err.with_hint('--allow-pickle')}\n")
    if args.edits:
        options.pop("prompts")
        results = evaluate_edits(args.checkpoint, args.out, pipe=pipe, edit_set=args.prompts,
                                 num_edits=args.num_edits, strength=args.edit_strength, **options)
        print(json.dumps({m: {k: row[k]["mean"] for k in ("success", "preservation_psnr", "fidelity_psnr")}
                          for m, row in results["edits"]["methods"].items()}, indent=2))
        return
    results = evaluate(args.checkpoint, args.out, pipe=pipe, **options)
    print(json.dumps({k: results[k] for k in ("conditioning_accuracy", "presence_accuracy", "classifier_accuracy_real")},
                     indent=2))


if __name__ == "__main__":
    main()
