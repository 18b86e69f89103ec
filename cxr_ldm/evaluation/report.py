"""The human-readable evaluation report: a Markdown file beside the JSON, with PNG sample grids per
prompt and the worst memorization pairs (generated | nearest training image) in an assets folder."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr_ldm.evaluation import augmentation
from cxr_ldm.io.images import make_grid, save_png


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _scale(images: np.ndarray, min_side: int = 128) -> int:
    """Pixel repetition factor that makes tiles at least min_side wide (readable labels)."""
    return max(1, -(-min_side // images.shape[2]))


def save_prompt_grids(assets: Path, prompts: Sequence[str], images: Sequence[np.ndarray],
                      verdicts: Sequence[np.ndarray] | None = None, max_images: int = 16) -> list[str]:
    """One grid PNG per prompt (its first max_images images, labelled ok/miss); returns relative file names."""
    names = []
    for i, (prompt, batch) in enumerate(zip(prompts, images)):
        batch = batch[:max_images]
        labels = None if verdicts is None else ["ok" if v else "miss" for v in verdicts[i][:max_images]]
        name = f"prompt_{i:02d}.png"
        save_png(assets / name, make_grid(batch, labels, ncols=min(8, len(batch)), label_height=12,
                                          scale=_scale(batch)), metadata={"prompt": prompt})
        names.append(name)
    return names


def save_pair_grid(path: Path, left: np.ndarray, right: np.ndarray, left_labels: Sequence[str],
                   right_labels: Sequence[str]) -> None:
    """Rows of (left, right) image pairs (N, H, W, C) in [0, 1], each image under its label."""
    tiles, labels = [], []
    for a, b, label_a, label_b in zip(left, right, left_labels, right_labels):
        tiles += [a, b]
        labels += [label_a, label_b]
    save_png(path, make_grid(np.stack(tiles), labels, ncols=2, label_height=24, scale=_scale(left)))


def unprompted_section(unprompted: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines of the table prompted finding x unprompted finding (`unprompted_by_finding` of the
    conditioning summary); none when no image shows an unprompted finding."""
    added = sorted({other for others in unprompted.values() for other in others})
    if not added:
        return []
    lines = ["## Unprompted findings", "",
             "Rows: the finding a prompt states alone; columns: the fraction of those prompts' generated images "
             "that show another major finding (blank: none).", ""]
    return lines + _table(["prompted finding"] + added,
                          [[name] + [others.get(other, "") for other in added] for name, others in unprompted.items()])


def guidance_sweep_section(rows: Sequence[dict] | None, headline_guidance: float) -> list[str]:
    """The guidance sweep's table (evaluate --guidance-sweep), [] without one."""
    if not rows:
        return []
    lines = ["## Guidance sweep", "",
             "The headline's prompts and seeds at each classifier-free guidance scale (* marks the headline's).", ""]
    return lines + _table(
        ["guidance", "conditioning_accuracy", "presence_accuracy", "by wording", "side accuracy",
         "false positives (normal)", "domain FID"],
        [[f"{row['guidance']:g}" + (" *" if row["guidance"] == headline_guidance else ""),
          row["conditioning_accuracy"], row["presence_accuracy"],
          " / ".join(f"{style} {_fmt(v)}" for style, v in row["conditioning_accuracy_by_style"].items()),
          row["side_accuracy_overall"], row["normal_false_positive_rate_any"], row["domain_fid"]] for row in rows])


def _interval(results: dict) -> str:
    ci = results.get("conditioning_accuracy_ci")
    return f"; 95 % interval [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""


def _optional_rows(results: dict) -> list[list]:
    """The headline table's rows of the optional sections (FID, diversity, reconstruction, memorization)."""
    fid = results["fid"]
    return [
        ["domain FID generated vs real", fid["domain"]["generated_vs_real"], f"classifier features, n = {fid['domain']['n']}"],
        ["domain FID real vs real (floor)", fid["domain"]["real_vs_real"], "validation vs test split"],
        ["Inception FID generated vs real", (fid["inception"] or {}).get("generated_vs_real"), "pool3, if weights given"],
        ["Inception FID real vs real", (fid["inception"] or {}).get("real_vs_real"), ""],
        ["MS-SSIM within prompt (generated)", results["diversity"]["generated_mean"], "lower = more diverse"],
        ["MS-SSIM same findings (real)", results["diversity"]["real_same_findings"], ""],
        ["VAE PSNR / SSIM / RMSE", " / ".join(_fmt(results["reconstruction"][k]) for k in ("psnr", "ssim", "rmse")),
         "real test split through the VAE and back"],
        ["copies (SSIM >= threshold)", results["memorization"]["generated"]["copy_fraction"],
         f"threshold {results['memorization']['copy_threshold']}; held-out real: "
         f"{_fmt(results['memorization']['heldout_real']['copy_fraction'])}"],
    ]


def write_markdown(path: Path, results: dict, assets: Path, grid_files: Sequence[str], pairs_file: str | None) -> None:
    """Writes the Markdown report of `results` (the evaluation JSON object) atomically."""
    rel = os.path.relpath(assets, path.parent)
    cond, clf = results["conditioning"], results["classifier"]
    settings = results["settings"]
    lines = [f"# Evaluation of `{settings['checkpoint']}`", "",
             f"Data set `{settings['dataset']}/{settings['dataset_config']}`; {settings['num_samples']} images per prompt, "
             f"{settings['steps']} {settings['sampler']} steps, guidance {settings['guidance']}, seed {settings['seed']}.", "",
             "## Headline", ""]
    fid = results["fid"]
    lines += _table(["metric", "value", "note"], [
        ["conditioning_accuracy", results["conditioning_accuracy"],
         "strict: mean over prompts of the fraction of images with every prompted finding, on its side, with its "
         "grade, location and devices, and no other major finding" + _interval(results)],
        ["presence_accuracy", results["presence_accuracy"], "the same counting finding types only"],
        ["prompt set", results["prompt_set"]["name"],
         f"{results['prompt_set']['num_prompts']} prompts, {results['prompt_set']['verbatim_in_training']} "
         "of them word for word in a training report"],
        ["  real phantom studies of the same prompts", results.get("conditioning_accuracy_real_studies"),
         "the ceiling: what a perfect generator gets under this classifier"],
        ["  the same studies through the VAE", results.get("conditioning_accuracy_vae_reconstructed"),
         "the ceiling for a diffusion model that is perfect in this autoencoder's latent space"],
        *[[f"  {style} wording", value, ""] for style, value in cond["conditioning_accuracy_by_style"].items()],
        *[[f"  {attribute} accuracy (generated)", value, "detected findings whose stated attribute is right"]
          for attribute, value in cond["attribute_accuracy"].items()],
        ["classifier_accuracy_real", results["classifier_accuracy_real"], results["classifier_accuracy_real_definition"]],
        ["classifier exact match (real)", results["classifier_exact_match_real"],
         "test images with every major finding right"],
        ["side accuracy (generated)", cond["side_accuracy_overall"], "detected findings on the prompted side"],
        *(_optional_rows(results) if fid else []),
    ])
    if not fid:
        lines += ["The ceilings and the optional sections (FID, diversity, reconstruction, memorization) were "
                  "skipped (`--headline-only`).", ""]
    lines += guidance_sweep_section(results.get("guidance_sweep"), settings["guidance"])
    lines += ["## Per finding", ""]
    normal_fp = cond["normal_false_positive_rate"] or {}
    per_obs = clf["test"]["per_observation"]
    real_detection = (results.get("conditioning_real_studies") or {}).get("detection_rate", {})
    vae_detection = (results.get("conditioning_vae_reconstructed") or {}).get("detection_rate", {})
    lines += _table(["finding", "detection rate (generated)", "detection rate (real studies, same prompts)",
                     "detection rate (those studies through the VAE)",
                     "side accuracy (generated)", "false positives on normal prompts",
                     "classifier accuracy (real test)", "sensitivity (real test)", "AUROC (real test)"],
                    [[name, cond["detection_rate"].get(name), real_detection.get(name), vae_detection.get(name),
                      cond["side_accuracy"].get(name),
                      normal_fp.get(name), per_obs[name]["accuracy"], per_obs[name]["sensitivity"],
                      per_obs[name]["auroc"]]
                     for name in per_obs])
    lines += unprompted_section(cond.get("unprompted_by_finding") or {})
    lines += ["## Prompts", ""]
    for prompt, grid in zip(cond["per_prompt"], grid_files):
        detail = ", ".join(f"{k} {_fmt(v)}" for k, v in prompt["detection_rate"].items()) or "normal study"
        extra = ", ".join(f"{k} {_fmt(v)}" for k, v in prompt["unprompted_rate"].items())
        lines += [f"### {prompt['prompt']}  ({prompt['style']})", "",
                  f"success {_fmt(prompt['success_rate'])} (presence {_fmt(prompt['presence_rate'])}); "
                  f"detected: {detail}" + (f"; unprompted: {extra}" if extra else ""),
                  "", f"![{prompt['prompt']}]({rel}/{grid})", ""]
    if results.get("skipped_prompts"):
        lines += ["Skipped prompts (findings the classifier does not know): "
                  + "; ".join(results["skipped_prompts"]), ""]
    if results["memorization"] is None:
        lines += _timings_section(results)
        _write_atomically(path, lines)
        return
    lines += ["## Memorization", "",
              "Nearest training image of every generated image (exact pixel search over the training split, "
              "shifts up to 1 px, then SSIM); the "
              "held-out real test images give the SSIM two different patients reach.", ""]
    mem = results["memorization"]
    lines += _table(["set", "copy fraction", "median SSIM", "99th percentile", "max"],
                    [[name, s["copy_fraction"], s["ssim_median"], s["ssim_p99"], s["ssim_max"]]
                     for name, s in (("generated", mem["generated"]), ("held-out real", mem["heldout_real"]))])
    if pairs_file:
        lines += [f"![worst pairs]({rel}/{pairs_file})", ""]
    if results.get("augmentation"):
        lines += ["## Augmentation experiment", ""]
        lines += _table(*augmentation.report_rows(results["augmentation"]))
    lines += _timings_section(results)
    _write_atomically(path, lines)


def _timings_section(results: dict) -> list[str]:
    return (["## Time per section", "",
             "The headline (strict conditioning with its intervals) is `conditioning`; the rest are optional.", ""]
            + _table(["section", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in results["timings_s"].items()]))


def _write_atomically(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def write_autoencoder_markdown(path: Path, results: dict, grid: Path) -> None:
    """Writes the Markdown report of an autoencoder-only evaluation (`evaluate --vae-only`) atomically."""
    settings, recon = results["settings"], results["reconstruction"]
    lines = [f"# Autoencoder evaluation of `{settings['checkpoint']}`", "",
             f"Data set `{settings['dataset']}/{settings['dataset_config']}`; no diffusion model.", "",
             "## Headline", ""]
    lines += _table(["metric", "value", "note"], [
        ["VAE PSNR / SSIM / RMSE", " / ".join(_fmt(recon[k]) for k in ("psnr", "ssim", "rmse")),
         f"{recon['num_images']} real test images through the VAE and back"],
        ["real phantom studies of the evaluation prompts", results["conditioning_accuracy_real_studies"],
         "conditioning accuracy of real studies: what a perfect generator gets under this classifier"],
        ["  the same studies through the VAE", results["conditioning_accuracy_vae_reconstructed"],
         "the ceiling for a diffusion model that is perfect in this autoencoder's latent space"],
        ["classifier_accuracy_real", results["classifier_accuracy_real"], "on the real test split"],
    ])
    real = (results["conditioning_real_studies"] or {}).get("detection_rate", {})
    through = (results["conditioning_vae_reconstructed"] or {}).get("detection_rate", {})
    if real:
        lines += ["## Per finding", ""]
        lines += _table(["finding", "detection rate (real studies)", "detection rate (through the VAE)"],
                        [[name, real[name], through.get(name)] for name in real])
    lines += ["## Test images and their reconstructions", "",
              f"![reconstructions]({os.path.relpath(grid, path.parent)})", ""]
    _write_atomically(path, lines)


def _with_ci(score: dict | None) -> str:
    if not score or score["mean"] is None:
        return "-"
    return f"{score['mean']:.3f} [{score['ci'][0]:.3f}, {score['ci'][1]:.3f}]"


def save_edit_grid(path: Path, columns: dict[str, np.ndarray], captions: Sequence[str]) -> None:
    """One row per edit, one column per named set of films (N, H, W, 1) in [0, 1]; each row's first tile is
    captioned with captions[i], the others with their column's name."""
    names = list(columns)
    tiles, labels = [], []
    for i, caption in enumerate(captions):
        tiles += [columns[name][i] for name in names]
        labels += [caption] + names[1:]
    first = columns[names[0]]
    save_png(path, make_grid(np.stack(tiles), labels, ncols=len(names), label_height=24, scale=_scale(first)))


def write_edits_markdown(path: Path, results: dict, grid: Path) -> None:
    """Writes the Markdown report of a counterfactual-edit evaluation (`evaluate --edits`) atomically."""
    edits, settings = results["edits"], results["settings"]
    lines = [f"# Counterfactual edits of `{settings['checkpoint']}`", "",
             f"{edits['num_edits']} edits ({edits['num_add']} add, {edits['num_remove']} remove one finding) of "
             f"`{edits['edit_set']}` studies of `{settings['dataset']}/{settings['dataset_config']}`; "
             f"strength {edits['strength']}, {settings['steps']} steps, guidance {settings['guidance']}. "
             "Means over edits with 95 % bootstrap intervals (docs/evaluation.md, 'Counterfactual edits').", "",
             "| method | strict success | add | remove | preservation PSNR | preservation SSIM | "
             "fidelity PSNR | fidelity SSIM | judge agreement |", "|" + "---|" * 9]
    rows = {**edits["methods"], **{f"({name})": row for name, row in edits["references"].items()}}
    for name, row in rows.items():
        keys = ("success", "success_add", "success_remove", "preservation_psnr", "preservation_ssim",
                "fidelity_psnr", "fidelity_ssim", "judge_agreement")
        lines.append(f"| {name} | " + " | ".join(_with_ci(row.get(k)) for k in keys) + " |")
    lines += ["", f"DDIM inversion and redraw ({settings['steps']} steps, no guidance) against the VAE round trip: "
              f"PSNR {_with_ci(edits['inversion_redraw_psnr_vs_vae'])} dB.", "",
              "## Edits", "", f"![edits]({os.path.relpath(grid, path.parent)})", ""]
    _write_atomically(path, lines)
