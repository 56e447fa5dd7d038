"""The report's explanatory sections: the concepts (with this model's own numbers), each recipe as its runs
recorded it, and the sparsity reached."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from harness.layout import SPARSITY_FILE
from harness.report.format import number, run_link, table
from harness.report.runs import ModelRuns, Run, fp32_recipe
from harness.report.speed import SPEED_ENGINES, accuracy_metric, sorted_scenarios
from harness.rundir import level_name

BACKENDS_DIR = Path(__file__).resolve().parents[1] / "backends"

CONCEPTS = """\
- **Sparsification** is the umbrella term: make most of a model's arithmetic or storage involve zeros,
  so that a runtime able to skip zeros does less work and the file compresses. The zeros can be static
  (weights removed once) or dynamic (parts of the network skipped per input).
- **Pruning** is static weight sparsity: weights chosen by a criterion (magnitude, or a second-order
  or gradient-based score) are set to zero and stay zero. *Unstructured* pruning may remove any single
  weight (highest accuracy for a given sparsity, hardest to speed up); *semi-structured* (N:M, e.g. 2:4)
  and *structured* pruning (blocks, channels, heads) remove regular groups that kernels exploit more
  easily. *One-shot* pruning needs no training; *gradual* pruning removes weights over fine-tuning
  steps so the remaining ones compensate.
- **Quantization** keeps every weight but stores and computes it with fewer bits (e.g. INT8 instead of
  FP32): the model shrinks by the bit ratio and integer kernels run faster, whatever the values are.
  It is orthogonal to pruning and combines with it (sparse + INT8 is DeepSparse's fastest path).
- **Distillation** trains a student to reproduce a teacher's outputs (or hidden states). It changes the
  model's weights or architecture rather than zeroing entries, costs training compute, and is often
  used to recover the accuracy a pruned or smaller model lost.
- **MoEfication** splits each dense feed-forward layer into groups of neurons (experts) and adds a router
  that activates only a few of them per token: conditional computation. The parameter count stays; the
  work per token drops. It is dynamic activation sparsity, decided per input, not static weight sparsity.

How they differ: pruning lowers the number of non-zero weights, quantization the bits per weight,
distillation the model's size or its accuracy loss through training, and MoEfication the share of
weights each token uses. Only quantization pays off on any runtime; pruning needs sparse-aware kernels
(DeepSparse here; ONNX Runtime and PyTorch compute zeros like any other value), and MoEfication needs
routing support. This report measures pruning and quantization (INT8), alone and combined.
"""


def section_concepts(models: ModelRuns) -> list[str]:
    return [CONCEPTS, *measured_concepts(models)]


def measured_concepts(models: ModelRuns) -> list[str]:
    """Pruning vs quantization in this model's own numbers: at the highest level at which a composed INT8 run and
    its FP32 pruning run were both benched, the INT8 run fastest against the dense FP32 engines and its FP32 run,
    in their largest-batch scenario (nothing without such a pair). Each speedup is the one its run's bench
    recorded against the dense engines it timed itself."""
    fp32_of = {recipe: fp32_recipe(recipe) for recipe in models.recipes}  # each recipe looked up once
    benched = {(run.recipe, run.level): run for run in models.with_output("bench") if run.bench.speedups}
    pairs = [(run, twin) for run in benched.values() if run.level > 0 and fp32_of[run.recipe] not in (run.recipe, None)
             and (twin := benched.get((fp32_of[run.recipe], run.level)))]
    pairs = [(int8, fp32, shared[-1]) for int8, fp32 in pairs
             if (shared := sorted_scenarios(set(int8.bench.fastest_dense) & set(fp32.bench.fastest_dense)))]
    if not pairs:
        return []

    def fastest_int8_run(pair) -> tuple:
        int8, _, scenario = pair
        best = int8.bench.fastest_dense[scenario].get("fp32")
        return int8.level, (best.speedup or 0) if best else 0

    int8, fp32, scenario = max(pairs, key=fastest_int8_run)
    pruned, both = fp32.bench.fastest_dense[scenario], int8.bench.fastest_dense[scenario]
    metric = accuracy_metric([run for run in models.runs if run.evaluation])
    dense = next((run for run in models.runs if run.level == 0 and run.evaluation and run.recovery is None
                  and fp32_of[run.recipe] == run.recipe), None)

    def accuracy(run: Run | None) -> str:
        result = run.evaluation.benchmarks.get(metric[0]) if run and run.evaluation and metric else None
        value = result.metrics.get(metric[1]) if result and result.status == "done" and result.metrics else None
        return f", {metric[0]} {metric[1]} {number(value.value)}" if value else ""

    def speedup(fastest: dict, precision: str) -> str:
        best = fastest.get(precision)
        return f"{number(best.speedup)}×" if best and best.speedup else "–"

    dense_fp32, dense_int8 = pruned.get("fp32"), pruned.get("int8")
    quantized = dense_fp32.median_ms / dense_int8.median_ms if dense_fp32 and dense_int8 else None
    level, sizes = f"{level_name(fp32.level)} %", fp32.bench.sizes
    lines = [f"**In this model's runs** ({scenario}; the dense model{accuracy(dense)}, its fastest FP32 engine "
             f"{_engine(dense_fp32)}; the fastest INT8 run at the highest level benched with its FP32 run):", ""]
    if quantized:
        lines.append(f"- Quantization alone: the fastest dense INT8 engine, {_engine(dense_int8)}, is "
                     f"{number(quantized)}× faster (no sparse kernels needed).")
    lines += [f"- Pruning alone (`{fp32.recipe}`, {level}): DeepSparse is {speedup(pruned, 'fp32')} the fastest "
              f"dense FP32 engine; {number(sizes.sparse_bitmask.bits_per_weight)} bits per weight in the "
              f"sparse-bitmask format against {number(sizes.checkpoint.bits_per_weight)} dense{_share(fp32)}"
              f"{accuracy(fp32)}.",
              f"- Both (`{int8.recipe}`, {level}): DeepSparse is {speedup(both, 'fp32')} the fastest dense FP32 "
              f"engine and {speedup(both, 'int8')} the fastest dense INT8 one; "
              f"{_bits(int8.bench.sizes.sparse_bitmask_int8)} bits per weight as sparse INT8 (INT8 alone "
              f"{_bits(int8.bench.sizes.checkpoint_int8)}){accuracy(int8)}."]
    if quantized and dense_fp32.speedup:
        lines.append(f"- Had the two gains multiplied, both together would be {number(quantized * dense_fp32.speedup)}×.")
    return [*lines, ""]


def _engine(best) -> str:
    return f"{SPEED_ENGINES.get(best.engine, best.engine)} at {number(best.median_ms)} ms" if best else "not measured"


def _share(run: Run) -> str:
    """What share of all weights the pruned layers hold (the rest, embeddings included, stays dense)."""
    if not run.sparsity or not run.sparsity.total_params:
        return ""
    return (f" (the pruned layers hold {number(100 * run.sparsity.prunable_params / run.sparsity.total_params)} % of "
            "the weights; the rest stays dense)")


def _bits(entry) -> str:
    return number(entry.bits_per_weight) if entry else "–"


def recipe_header(run: Run) -> dict:
    """The harness header of the recipe file a run was made with (from its manifest)."""
    try:
        header = yaml.safe_load(run.manifest.get("recipe_text", "")) or {}
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


def backend_summary(backend: str) -> str:
    """The first paragraph of the backend module's docstring (read from source; nothing is imported)."""
    path = BACKENDS_DIR / f"{backend}.py"
    try:
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError):
        return ""
    return " ".join(docstring.split("\n\n")[0].split())


def section_methods(models: ModelRuns) -> list[str]:
    lines = ["Each recipe as recorded in its runs' manifests (the recipe file's header and the backend's own "
             "recipe text).", ""]
    for recipe in models.recipes:
        runs = [run for run in models.runs if run.recipe == recipe and run.manifest]
        if not runs:
            lines += [f"### `{recipe}`", "", "No run directory exists for this recipe (see the gaps).", ""]
            continue
        header = recipe_header(runs[0])
        backend = header.get("backend", "?")
        lines += [f"### `{recipe}`", "", f"{header.get('description', '(no description)').rstrip('.')}.", "",
                  f"- backend `{backend}`: {backend_summary(backend) or '(no description)'}",
                  f"- prunes: {_targets(header.get('targets', 'default'))}",
                  f"- calibration sequences: {number((header.get('calibration') or {}).get('samples', 0))}",
                  f"- parameters: {_params(runs[0].manifest.get('params') or {})}",
                  f"- levels run: {', '.join(level_name(r.level) + ' %' for r in runs)}", ""]
        body = header.get("recipe")
        if isinstance(body, str) and body.strip():
            lines += ["<details><summary>backend recipe</summary>", "", "```yaml", body.rstrip(), "```", "",
                      "</details>", ""]
    return lines


def _targets(targets) -> str:
    if targets == "default":
        return ("the Linear/Conv1D weights inside the transformer blocks (embeddings, LM head, norms, biases "
                "stay dense)")
    return "parameters matching " + ", ".join(f"`{t}`" for t in targets)


def _params(params: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in params.items()) or "none"


def section_sparsity(models: ModelRuns) -> list[str]:
    runs = models.with_output("prune")
    if not runs:
        return [f"Missing: no run has `{SPARSITY_FILE}` (run the prune stage).", ""]
    rows = [[run.recipe, level_name(run.level), number(run.sparsity.target_percent),
             number(run.sparsity.achieved_percent), number(run.sparsity.overall_percent),
             number(run.sparsity.prunable_params), number(run.sparsity.total_params), run_link(run)]
            for run in runs]
    lines = ["Target and measured sparsity (percent of weights that are exactly zero in the saved checkpoint).", ""]
    lines += table(["recipe", "level %", "target %", "achieved % (prunable)", "overall % (all weights)",
                    "prunable weights", "all weights", "run directory"], rows)
    return lines
