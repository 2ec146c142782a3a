"""`fnsft templates MODEL DATASET [DATASET ...]`: find a model's functional networks and write a template file.

Also `build_templates(...)`, which `fnsft train --mask_mode ...` uses to build templates from its training data
when no template file is given.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from functionalnetworkssft import __version__
from functionalnetworkssft.errors import UsageError
from functionalnetworkssft.networks.collect import TokenReservoir, collect_mlp_outputs
from functionalnetworkssft.networks.ica import ICA_MAX_ITER, ICA_TOL, find_networks
from functionalnetworkssft.networks.layout import decoder_blocks, hidden_size, parse_layers
from functionalnetworkssft.networks.options import ica_components_arg, ica_percentile_arg, ica_threshold_arg, ica_z_arg
from functionalnetworkssft.networks.templates import Templates, read_templates
from functionalnetworkssft.options import Options, arg, field_problems, parse

DEFAULT_SAMPLES = 100
# The plot of how many channels each component holds, written beside the template file.
COVERAGE_FILE = "coverage.png"
# Written into the plot's PNG metadata, so that a later run knows the plot is one it may replace.
PLOT_MARK = "fnsft templates"
DEFAULT_MAX_TOKENS = 4096


@dataclass
class TemplatesConfig(Options):
    """Find functional networks (ICA over MLP outputs) of a model on some data and write them as a template file."""

    model: str = arg("Model: a Hub id, a local folder, a .gguf file or pkg:PACKAGE/FILE. May be given as the first "
                     "positional argument.")
    datasets: list[str] = arg("Datasets (any format `fnsft train` reads); the positional arguments after the model.")
    ica_components: int = ica_components_arg()
    ica_threshold: Literal["zscore", "percentile"] = ica_threshold_arg()
    ica_percentile: float = ica_percentile_arg()
    ica_z: float = ica_z_arg()
    samples_per_dataset: int = arg("Examples drawn (seeded) from each dataset.", default=DEFAULT_SAMPLES,
                                   positive=True)
    max_seq_length: int = arg("Tokens per example at most (longer ones are truncated).", default=512, positive=True)
    max_tokens: int = arg("Token budget: at most this many token rows (a seeded uniform sample of all tokens) are kept "
                          "for ICA, which bounds memory at max_tokens x layers x hidden x 4 bytes.",
                          default=DEFAULT_MAX_TOKENS, positive=True)
    layers: str | None = arg("Decoder layers to capture, e.g. 0:4,9: (default: all).", default=None)
    seed: int = arg("Seed of the sampling, PCA and ICA.", default=0, minimum=0, below=2**32)
    output: str = arg("Template file to write; coverage.png is written beside it. Neither replaces a file fnsft did "
                      "not write, nor any input.", default="global_templates.json")
    trust_remote_code: bool = arg("Allow model code from the Hub to run.", default=False)


def main(argv: list[str] | None, prog: str = "fnsft templates") -> None:
    argv = list(argv or [])
    positional = []
    while argv and not argv[0].startswith("-"):
        positional.append(argv.pop(0))
    if positional:
        argv = ["--model", positional[0], *(["--datasets", *positional[1:]] if positional[1:] else []), *argv]
    cfg = parse(TemplatesConfig, argv, prog)
    problems = field_problems(cfg)
    if problems:
        raise UsageError(problems)
    from functionalnetworkssft import data, modeling
    from functionalnetworkssft.outputs import writable_problem

    output = Path(cfg.output)
    problems = [problem for problem in (writable_problem(output.parent, "--output"),) if problem]
    problems += _output_problems(cfg, output)
    if problems:
        raise UsageError(problems)
    examples_by_source = [(name, data.load(name, None, 0.0, cfg.seed)) for name in cfg.datasets]
    source = modeling.resolve(cfg.model)
    problem = modeling.remote_code_problem(source, cfg.trust_remote_code)
    if problem:
        raise UsageError(problem)
    tokenizer = modeling.load_tokenizer(source, cfg.trust_remote_code)
    model = modeling.load_model(source, "auto", trust_remote_code=cfg.trust_remote_code).eval()
    examples = []
    for name, raw in examples_by_source:
        examples += sample_token_ids(raw.train, tokenizer, cfg.samples_per_dataset, cfg.max_seq_length, cfg.seed)
    templates, summary = build_templates(
        model, examples, n_components=cfg.ica_components, threshold=cfg.ica_threshold,
        percentile=cfg.ica_percentile, z=cfg.ica_z, max_tokens=cfg.max_tokens, layers_spec=cfg.layers, seed=cfg.seed,
        provenance={"model": source.hub_id or Path(cfg.model).name, "datasets": [Path(d).name for d in cfg.datasets],
                    "samples_per_dataset": cfg.samples_per_dataset, "max_seq_length": cfg.max_seq_length})
    output.parent.mkdir(parents=True, exist_ok=True)
    templates.write(output)
    plot_coverage(templates, output.parent / COVERAGE_FILE)
    print(summary)
    print(f"Wrote {output} and {output.parent / COVERAGE_FILE}")


def _output_problems(cfg: TemplatesConfig, output: Path) -> list[str]:
    """What writing the template file and its plot would destroy: an input of this run, or a file that an earlier
    `fnsft templates` did not write (the plot is replaced only beside a template file it belongs to)."""
    from functionalnetworkssft.paths import within

    coverage = output.parent / COVERAGE_FILE
    found = []
    for flag, value in (("--model", cfg.model), *(("--datasets", d) for d in cfg.datasets)):
        local = Path(value).expanduser()
        hit = next((target for target in (output, coverage) if os.path.lexists(local) and within(local, target)), None)
        if hit is not None:
            found.append(f"{flag} {value} lies inside {hit}, which this run would write; choose another --output.")
    if os.path.lexists(output) and not (output.is_file() and _is_template_file(output)):
        found.append(f"--output {output} exists and is not a template file fnsft wrote; move it or choose another "
                     "name.")
    if os.path.lexists(coverage) and not _is_our_plot(coverage):
        found.append(f"--output {output}: {coverage} exists beside it and is not a plot fnsft made, and this run "
                     "writes its plot there; move it or write the templates into another folder.")
    return found


def _is_our_plot(path: Path) -> bool:
    """A coverage plot an earlier `fnsft templates` made: a PNG carrying PLOT_MARK in its text metadata."""
    if path.is_symlink() or not path.is_file():  # a link, a folder, or a FIFO that a read would wait on forever
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(8192)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and PLOT_MARK.encode() in head


def _is_template_file(path: Path) -> bool:
    try:
        read_templates(path, "--output")
    except UsageError:
        return False
    return True


def sample_rows(items, count: int, seed: int) -> list:
    """`count` items in their original order, chosen by a seeded draw: the same inputs and seed, the same items."""
    order = np.random.default_rng(seed).permutation(len(items))[:count]
    return [items[int(i)] for i in sorted(order)]


def sample_token_ids(rows, tokenizer, count: int, max_length: int, seed: int) -> list[list[int]]:
    """`count` examples (seeded choice) rendered as at training time: chat data with the model's template."""
    from functionalnetworkssft.data import tokenize_example

    picked = [tokenize_example(tokenizer, row, train_on_prompt=True, max_length=max_length)["input_ids"]
              for row in sample_rows(rows, count, seed)]
    return [ids for ids in picked if ids]


def build_templates(model, examples: list[list[int]], *, n_components: int, threshold: str, percentile: float,
                    z: float, max_tokens: int, layers_spec: str | None, seed: int,
                    provenance: dict, log=None) -> tuple[Templates, str]:
    """Collect, reduce, separate and select: the templates and a printed summary (sizes, budget, peak memory)."""
    import resource

    from tqdm.auto import tqdm

    from functionalnetworkssft import distributed

    log = log or (lambda line: print(line, file=sys.stderr, flush=True) if distributed.is_main() else None)
    blocks = decoder_blocks(model)
    layers = parse_layers(layers_spec, len(blocks), "--layers")
    chosen = [b for b in blocks if b.index in layers]
    hidden = hidden_size(model)
    if n_components > hidden * len(chosen):  # ICA cannot find more components than there are channels
        raise UsageError(f"--ica_components {n_components} is more than the {hidden * len(chosen)} MLP channels "
                         f"captured ({len(chosen)} layers x {hidden}); ask for at most {hidden * len(chosen)}.")
    reservoir = TokenReservoir(max_tokens, hidden * len(chosen), seed)
    log(f"Collect: MLP outputs of {len(chosen)} layers x {hidden} channels over {len(examples)} examples "
        f"(token budget {max_tokens}: {reservoir.nbytes / 2**20:.0f} MiB)")
    with tqdm(total=len(examples), unit="example", desc="collecting", leave=False, disable=None) as progress:
        collect_mlp_outputs(model, examples, chosen, reservoir, progress)
    matrix = reservoir.matrix()
    result = find_networks(matrix, n_components, threshold, percentile, z, seed, log)
    components = {}
    for k, flat in result.selected.items():
        per_layer: dict[int, list[int]] = {}
        for index in flat.tolist():
            per_layer.setdefault(chosen[index // hidden].index, []).append(index % hidden)
        components[k] = per_layer
    cut = {"ica_percentile": percentile} if threshold == "percentile" else {"ica_z": z}
    parameters = {"ica_components": n_components, "ica_threshold": threshold, **cut, "max_tokens": max_tokens,
                  "layers": layers_spec or "all", "pca_components": result.pca_components,
                  "ica_max_iter": ICA_MAX_ITER, "ica_tol": ICA_TOL}
    templates = Templates(name=f"{provenance.get('model', 'model')}-ica{n_components}", layers=layers,
                          hidden_size=hidden, components=components,
                          provenance={**provenance, "parameters": parameters, "seed": seed,
                                      "tokens_used": int(len(matrix)), "tokens_seen": int(reservoir.seen),
                                      "ica_converged": result.converged, "fnsft_version": __version__})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    lines = [f"{len(components)} networks from {len(matrix)} of {reservoir.seen} tokens (budget {max_tokens}, "
             f"{reservoir.nbytes / 2**20:.0f} MiB; peak process memory {peak / 2**20:.0f} MiB); PCA "
             f"{result.pca_seconds:.1f} s, ICA {result.ica_seconds:.1f} s"
             + ("" if result.converged else " (ICA did not converge: consider more tokens)")]
    total = hidden * len(layers)
    for k, per_layer in components.items():
        count = sum(len(c) for c in per_layer.values())
        top = sorted(per_layer.items(), key=lambda kv: -len(kv[1]))[:3]
        lines.append(f"  component {k}: {count} channels ({count / total:.1%}) in {len(per_layer)} layers"
                     + (f"; most in {', '.join(f'layer {layer} ({len(c)})' for layer, c in top)}" if top else ""))
    union = templates.network(None, layers, "templates")
    counts = " ".join(f"{layer}:{len(c)}" for layer, c in union.items())
    lines.append(f"  all components: {sum(len(c) for c in union.values())} channels of {total}; per layer {counts}")
    return templates, "\n".join(lines)


def plot_coverage(templates: Templates, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(templates.layers)
    ids = sorted(templates.components)
    grid = np.zeros((len(ids), len(layers)))
    for row, k in enumerate(ids):
        for col, layer in enumerate(layers):
            grid[row, col] = len(templates.components[k].get(layer, []))
    fig, ax = plt.subplots(figsize=(max(5, len(layers) * 0.3 + 2), max(3, len(ids) * 0.35 + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_yticks(range(len(ids)), [str(k) for k in ids], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("component")
    ax.set_title(f"{templates.name}: channels per component and layer")
    fig.colorbar(image, ax=ax, label="channels")
    fig.tight_layout()
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(staging, dpi=100, metadata={"Software": f"{PLOT_MARK} {__version__}"})
        os.replace(staging, path)  # replaces a link standing there rather than writing through it
    finally:
        if os.path.lexists(staging):
            os.unlink(staging)
    plt.close(fig)

