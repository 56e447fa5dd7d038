"""Recipes: YAML files under `recipes/<backend>/<name>.yaml` (and `recipes/common/`), named `<backend>/<name>`.

A recipe file has a short harness header and, under `recipe:`, the backend's own recipe text
(a SparseML recipe, an INC `WeightPruningConfig`), so SparseML and INC users recognise it:

    backend: sparseml                 # a name in harness.backends.REGISTRY
    description: one line
    architectures: [encoder, decoder, encoder-decoder]
    targets: default                  # or a list of regexes over parameter names
    calibration: {corpus: fineweb, samples: 128, seq_len: 2048}   # training text the method reads
    recovery: {tokens: ${tokens}}     # optional: training while the schedule prunes (a gradual recipe)
    params: {tokens: 2000000}         # values a user may override with --set name=value, typed by these defaults
    recipe: |
      ... backend's own YAML; ${sparsity} (a fraction), ${targets} and ${params} are substituted ...

A recipe with some parameters changed is a variant of its own name, `<backend>/<name>@<param>=<value>,...`
(e.g. `sparseml/oneshot-wanda@allocation=owl`): a recipe name accepts that form, `--set` gives the same
name, and its runs live in their own directory beside the defaults' runs.

A pruning recipe is composed with later steps by `+`:
`<backend>/<pruning>[+<recovery>][+<quantization>][@<param>=<value>,...]`, e.g.
`sparseml/oneshot-sparsegpt+distil+int8`. A step's recipe says its `kind:` (`recovery`: a `recovery`
section and no backend body, e.g. `recipes/common/distil.yaml`; `quantization`: e.g.
`recipes/sparseml/int8.yaml`) and is looked up in the pruning recipe's backend directory, then in `recipes/common/` (steps for every
backend, whose header names none). The prune stage runs the steps in that order (`harness.recovery`, then
`harness.quantize`), and starts from the finished run of the longest earlier part (`earlier_steps`): a
recovery experiment reuses its one-shot run, an INT8 one its FP32 run. The variant's parameters are those of
every step (their names must differ), and the composition supports the architectures all steps support.

A value `${name}` in `calibration` or `recovery` is the parameter `name`. In a recipe with `recovery`,
the body may also use `${train_steps}` (the optimizer steps of its token budget) and `${ramp_steps}`
(the first `ramp` fraction of them): a gradual recipe ramps its sparsity over those while distilling. Calibration reads
`samples` sequences of `seq_len` tokens (default: the model's `seq_len`, capped by its context) from
a training corpus (`harness/corpora.yaml`), never from an evaluation split; `recovery` holds fields
of `harness.recovery.RecoveryPlan`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.backends import backend_names
from harness.corpus import DEFAULT_CORPUS
from harness.errors import HarnessError
from harness.paths import RECIPES_DIR

DEFAULT_RECIPE = "sparseml/oneshot-magnitude"
HEADER_KEYS = {"backend", "kind", "description", "architectures", "targets", "calibration", "recovery", "params",
               "recipe"}
KINDS = ("pruning", "recovery", "quantization")  # a recipe's `kind:` (default pruning), in the order steps compose
KIND_VERBS = {"recovery": "recovers", "quantization": "quantizes"}
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
VARIANT_MARK = "@"  # `<recipe>@<param>=<value>,...`: the recipe with those parameters
STEP_MARK = "+"  # `<backend>/<pruning>+<recovery>+<quantization>`: prune, then recover, then quantize
COMMON_DIR = "common"  # recipes/common/: recovery and quantization steps for every backend
# Recipes that became compositions: their old names (in reports made before) fail with the new one.
RENAMED = {
    "sparseml/sparsegpt-recover": "sparseml/oneshot-sparsegpt+distil",
    "sparseml/magnitude-recover": "sparseml/oneshot-magnitude+distil@accumulation=2,batch_size=16,train_seq_len=128",
}
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Calibration:
    """The training text a recipe's method reads: `samples` sequences of `seq_len` tokens from `corpus`."""

    corpus: str = DEFAULT_CORPUS
    samples: int = 0
    seq_len: int | None = None  # None: the model's seq_len


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    text: str
    backend: str
    description: str
    architectures: tuple
    targets: object  # "default" or a list of regexes
    calibration_header: dict = field(default_factory=dict)
    recovery_header: dict | None = None
    params: dict = field(default_factory=dict)
    body: str = ""
    defaults: dict = field(default_factory=dict)  # the params as the file gives them
    kind: str = "pruning"
    quantization: "Recipe | None" = None  # the quantization recipe composed after this pruning recipe

    @property
    def base_name(self) -> str:
        """The recipe file's name, without a variant's parameters."""
        return self.name.partition(VARIANT_MARK)[0]

    @property
    def pruning_name(self) -> str:
        """The pruning recipe file's name: a composed recipe's first part (`a/b+distil@x=1` -> `a/b`)."""
        return self.base_name.partition(STEP_MARK)[0]

    @property
    def calibration(self) -> Calibration:
        calibration = Calibration(**self._section_fields(self.calibration_header, "calibration", Calibration))
        if type(calibration.samples) is not int or calibration.samples < 0 \
                or not (calibration.seq_len is None or (type(calibration.seq_len) is int and calibration.seq_len > 1)):
            raise HarnessError(f"recipe {self.name}: calibration samples must be a whole number >= 0 and seq_len "
                               f"one > 1 (or absent), got {calibration.samples!r} and {calibration.seq_len!r}")
        return calibration

    @property
    def recovery(self):
        """The recovery settings as a checked `harness.recovery.RecoveryPlan`, or None without recovery."""
        if self.recovery_header is None:
            return None
        from harness.recovery import RecoveryPlan  # imports torch: only for recipes that train

        plan = RecoveryPlan(**self._section_fields(self.recovery_header, "recovery", RecoveryPlan))
        plan.check()
        return plan

    def _section_fields(self, section: dict, where: str, record: type) -> dict:
        """A header section's values (parameters filled in), refusing a field `record` does not have."""
        values = self._header_values(section, where)
        unknown = sorted(set(values) - set(record.__dataclass_fields__))
        if unknown:
            raise HarnessError(f"recipe {self.name}: {where} has no field {unknown[0]} "
                               f"(fields: {', '.join(record.__dataclass_fields__)})")
        return values

    def _header_values(self, section: dict, where: str) -> dict:
        def value(item):
            match = PLACEHOLDER.fullmatch(item) if isinstance(item, str) else None
            if match and match.group(1) not in self.params:
                raise HarnessError(f"recipe {self.path}: {where} names ${{{match.group(1)}}}, which is not among "
                                   f"its params ({', '.join(self.params) or 'none'})")
            return self.params[match.group(1)] if match else item

        return {key: value(item) for key, item in section.items()}

    def render(self, sparsity: float, targets: list[str], **extra) -> dict:
        """The backend's recipe with the target sparsity (fraction), target names and params filled in."""
        try:
            return yaml.safe_load(self.render_text(sparsity, targets, **extra)) or {}
        except yaml.YAMLError as exc:
            raise HarnessError(f"{self.path}: the recipe body is not valid YAML after substitution: {exc}") from None

    def render_text(self, sparsity: float, targets: list[str], **extra) -> str:
        """`render` before YAML parsing, for recipe formats plain YAML cannot load (SparseML's `!Modifier` tags)."""
        plan = self.recovery
        training = {"train_steps": plan.steps, "ramp_steps": plan.ramp_steps} if plan else {}
        values = {**{k: json.dumps(v) for k, v in {**self.params, **training}.items()},
                  "sparsity": repr(round(sparsity, 6)), "targets": json.dumps(targets),
                  **{k: json.dumps(v) for k, v in extra.items()}}

        def substitute(match: re.Match) -> str:
            if match.group(1) not in values:
                raise HarnessError(f"{self.path}: unknown placeholder ${{{match.group(1)}}} "
                                   f"(known: {', '.join(sorted(values))})")
            return values[match.group(1)]

        return PLACEHOLDER.sub(substitute, self.body)

    def with_params(self, overrides: dict) -> "Recipe":
        """This recipe with some parameters set, each to a value of its default's type."""
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            raise HarnessError(f"recipe {self.name} has no parameter {', '.join(unknown)} "
                               f"(it has: {', '.join(self.params) or 'none'})")
        typed = {name: self._typed_value(name, value) for name, value in overrides.items()}
        params = {**self.params, **typed}
        changed = {name: value for name, value in sorted(params.items()) if value != self.defaults.get(name)}
        name = variant_name(self.base_name, {key: _text(value) for key, value in changed.items()})
        quantization = self.quantization and self.quantization.with_params(
            {key: value for key, value in typed.items() if key in self.quantization.params})
        return Recipe(**{**self.__dict__, "name": name, "params": params, "quantization": quantization})

    def _typed_value(self, name: str, value):
        """`value` as the type of the parameter's default: text is parsed like a `--set` value, an int
        becomes a float for a float parameter; anything else of another type is an error."""
        default = self.params[name]
        kind = type(default)
        parsed = parse_value(value) if isinstance(value, str) and kind is not str else value
        if kind is float and type(parsed) is int:
            parsed = float(parsed)
        if type(parsed) is not kind or (kind is float and not math.isfinite(parsed)):
            raise HarnessError(f"recipe {self.name}: parameter {name} must be "
                               f"{TYPE_NAMES.get(kind, kind.__name__)} like its default {default!r}, got {value!r}")
        return parsed


def available() -> list[str]:
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.glob("*/*.yaml"))


def load_recipe(name: str) -> Recipe:
    """Read and validate `recipes/<name>.yaml` (or a path to a recipe file), or a variant `<name>@<param>=<value>,...`."""
    name, mark, variant = name.partition(VARIANT_MARK)
    recipe = _load_composed(name)
    if not mark:
        return recipe
    if not variant:
        raise HarnessError(f"recipe variant {name}{VARIANT_MARK} names no parameters (e.g. {name}{VARIANT_MARK}steps=200)")
    return recipe.with_params(parse_overrides(variant.split(","), what=f"recipe variant {name}{VARIANT_MARK}{variant}"))


def variant_params(name: str) -> tuple[str, dict[str, str]]:
    """A recipe name's base and its variant's parameters as written: `a/b@x=1,y=z` -> (`a/b`, {x: 1, y: z})."""
    base, _, variant = name.partition(VARIANT_MARK)
    return base, {key: value for key, _, value in (pair.partition("=") for pair in variant.split(",") if pair)}


def variant_name(base: str, params: dict[str, str]) -> str:
    """The name of `base` with `params` (as written, in their order): the inverse of `variant_params`."""
    return base + (VARIANT_MARK + ",".join(f"{key}={value}" for key, value in params.items()) if params else "")


def canonical_name(name: str) -> str:
    """A recipe name as prune names its runs: a variant's parameters in any order give the same name."""
    return load_recipe(name).name if VARIANT_MARK in name else name


def earlier_steps(name: str) -> list[str]:
    """The names of a composed recipe's earlier parts, longest first, each with the parameters it has:
    `a/b+distil+int8@lr=1,smoothing=0.5` -> [`a/b+distil@lr=1`, `a/b`]; [] for a recipe of one step."""
    base = name.partition(VARIANT_MARK)[0]
    if STEP_MARK not in base:
        return []
    params = load_recipe(name).params
    parts = base.split(STEP_MARK)
    earlier = [_load_composed(STEP_MARK.join(parts[:count])) for count in range(len(parts) - 1, 0, -1)]
    return [part.with_params({key: value for key, value in params.items() if key in part.params}).name
            for part in earlier]


def unquantized(name: str) -> str:
    """The name of a composed recipe without its quantization step (`a/b+int8@head=x,y=1` -> `a/b@y=1`);
    other names unchanged."""
    if STEP_MARK not in name.partition(VARIANT_MARK)[0]:
        return name
    return earlier_steps(name)[0] if load_recipe(name).quantization else name


def _load_composed(name: str) -> Recipe:
    """A pruning recipe, or one composed with later steps: `<pruning>+<recovery>+<quantization>` (either optional)."""
    first, *step_names = name.split(STEP_MARK)
    recipe = _load_file(first)
    if step_names and recipe.kind != "pruning":
        raise HarnessError(f"recipe {name}: a composition starts with a pruning recipe, {recipe.name} "
                           f"{KIND_VERBS[recipe.kind]}")
    kind = recipe.kind
    for step_name in step_names:
        step = _load_step(recipe.backend, step_name)
        composed = f"{recipe.name}{STEP_MARK}{step.name.rpartition('/')[2]}"
        if KINDS.index(step.kind) <= KINDS.index(kind):
            raise HarnessError(f"recipe {composed}: steps compose as pruning, then recovery, then quantization, "
                               f"each at most once")
        if step.kind == "recovery" and recipe.recovery_header is not None:
            raise HarnessError(f"recipe {composed}: {recipe.name} trains already (its own recovery section)")
        shared = sorted(set(recipe.params) & set(step.params))
        if shared:
            raise HarnessError(f"recipe {composed}: both {recipe.name} and {step.name} have a parameter {shared[0]}")
        recipe = Recipe(**{**recipe.__dict__, "name": composed, "text": recipe.text + step.text,
                           "params": {**recipe.params, **step.params}, "defaults": {**recipe.defaults, **step.defaults},
                           "architectures": tuple(a for a in recipe.architectures if a in step.architectures),
                           "recovery_header": step.recovery_header if step.kind == "recovery" else recipe.recovery_header,
                           "quantization": step if step.kind == "quantization" else recipe.quantization})
        kind = step.kind
    return recipe


def _load_step(backend: str, name: str) -> Recipe:
    """A recovery or quantization step: `<backend>/<name>`, else `common/<name>` (or a name with its directory)."""
    if "/" not in name:
        own = RECIPES_DIR / backend / f"{name}.yaml"
        name = f"{backend}/{name}" if own.exists() or not (RECIPES_DIR / COMMON_DIR / f"{name}.yaml").exists() \
            else f"{COMMON_DIR}/{name}"
    step = _load_file(name)
    if step.kind == "pruning":
        raise HarnessError(f"recipe {step.name} prunes: only recovery and quantization recipes compose after "
                           f"a pruning recipe")
    if step.backend not in (backend, ""):
        raise HarnessError(f"recipe {step.name} is for backend {step.backend}, not {backend}")
    return step


def _load_file(name: str) -> Recipe:
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{name}.yaml"
    if not path.exists() and name in RENAMED:
        raise HarnessError(f"recipe {name} is now {RENAMED[name]} (the same steps, composed)")
    if not path.exists():
        raise HarnessError(f"unknown recipe '{name}': available are {', '.join(available())}")
    text = path.read_text()
    try:
        header = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HarnessError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(header, dict):
        raise HarnessError(f"recipe {path} must be a mapping with keys {', '.join(sorted(HEADER_KEYS))}")
    kind = header.get("kind", "pruning")
    if kind not in KINDS:
        raise HarnessError(f"recipe {path}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = sorted(set(header) - HEADER_KEYS)
    missing = sorted(({"recovery"} if kind == "recovery" else {"backend", "recipe"}) - set(header))
    if unknown or missing:
        problem = f"unknown keys {', '.join(unknown)}" if unknown else f"missing keys {', '.join(missing)}"
        raise HarnessError(f"recipe {path}: {problem}")
    if (kind != "recovery" or "backend" in header) and header["backend"] not in backend_names():
        raise HarnessError(f"recipe {path}: unknown backend '{header['backend']}' "
                           f"(available: {', '.join(backend_names())})")
    targets = header.get("targets", "default")
    if targets != "default" and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise HarnessError(f"recipe {path}: targets must be 'default' or a list of regexes")
    body = header.get("recipe", "")
    if not isinstance(body, str):
        body = yaml.safe_dump(body, sort_keys=False)
    recipe_name = name if not name.endswith((".yaml", ".yml")) else path.stem
    return Recipe(
        name=recipe_name, path=path, text=text, backend=header.get("backend", ""),
        description=header.get("description", ""),
        architectures=tuple(header.get("architectures") or ("encoder", "decoder", "encoder-decoder")),
        targets=targets, calibration_header=_section(header, "calibration", path) or {},
        recovery_header=_section(header, "recovery", path), params=dict(header.get("params") or {}), body=body,
        defaults=dict(header.get("params") or {}), kind=kind,
    )


def _section(header: dict, key: str, path: Path) -> dict | None:
    section = header.get(key)
    if section is not None and not isinstance(section, dict):
        raise HarnessError(f"recipe {path}: {key} must be a mapping of names to values")
    return section


def parse_value(text: str):
    """A `--set` value: JSON first (PyYAML reads `1e-4` as a string), then YAML; `2:4` stays a string
    (YAML 1.1 reads it as the base-60 number 124), and so does text YAML cannot read."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    if re.fullmatch(r"[\d_]+(:[\d_]+)+", text):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _text(value) -> str:
    """A parameter value as a variant name shows it; `parse_value` reads it back."""
    return value if isinstance(value, str) else json.dumps(value)


def parse_overrides(pairs: list[str], what: str = "--set") -> dict:
    """`["steps=200", "lr=1e-4", "pattern=2:4"]` -> `{"steps": 200, "lr": 0.0001, "pattern": "2:4"}`."""
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise HarnessError(f"{what} expects name=value, got {pair!r}")
        overrides[key] = parse_value(value)
    return overrides
