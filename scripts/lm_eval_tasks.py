"""The lm-evaluation-harness tasks a config asks for (``evaluate.lm_eval``) and their data.

Cheap on purpose (no torch, no model): rules/common.smk calls ``check_config`` while it
validates the config, so a bad task name or a task whose data cannot be had stops the run
with one sentence before any job; scripts/downstream.py calls ``task_specs`` at the start
of each job, before it loads a model.

Where a task's data comes from:

- tasks in this repository's ``tasks/`` folder may read a data set the pipeline prepares
  (``metadata.pipeline_data: wikitext`` = results/data/wikitext.txt); the job points the
  task's ``data_files`` at its own input, so the task runs offline;
- a task whose ``dataset_path`` is a Hub data set with a ``data.mirror`` entry reads the
  local copy instead (a file: loaded with the builder of its suffix as the task's test
  split; a folder: a local snapshot of the Hub repository, loaded as the Hub one would be);
- otherwise lm-eval asks the Hub (``data.hub_access`` mirror forbids that).
"""

import copy
import hashlib
import re
from pathlib import Path

import yaml

from config_check import ConfigError
from runtime import PROJECT_ROOT, resolve_path, sha256_file

TASKS_DIR = PROJECT_ROOT / "tasks"
# The pipeline's prepared data sets a task may read, by name: file under results/data/.
PIPELINE_DATA = {"wikitext": "wikitext.txt"}
# Builders of datasets.load_dataset for a single local file, by suffix.
FILE_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".txt": "text",
    ".raw": "text",
}
DEFAULTS = {
    "enabled": False,
    "tasks": [{"name": "wikitext_pipeline", "num_fewshot": 0, "limit": None}],
    "batch_size": 8,
    "max_length": None,
    "bootstrap_iters": 100000,
    "fewshot_seed": 1234,
}


class TaskDataError(RuntimeError):
    """A task's data set cannot be found; the message names the task and the data set."""


def settings(config: dict) -> dict:
    """evaluate.lm_eval with the defaults filled in (the section is optional)."""
    given = (config.get("evaluate") or {}).get("lm_eval") or {}
    merged = {**DEFAULTS, **given}
    merged["tasks"] = [{"num_fewshot": None, "limit": None, **task} for task in merged["tasks"]]
    return merged


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval task YAML: ``!function module.name`` kept as text (nothing is imported)."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def repo_tasks(tasks_dir: Path = TASKS_DIR) -> dict[str, dict]:
    """{task name: its YAML config} of the task definitions shipped in tasks/."""
    found = {}
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        config = yaml.load(path.read_text(), Loader=_TaskYamlLoader)  # noqa: S506 (a SafeLoader subclass)
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            found[config["task"]] = {**config, "_yaml_path": str(path)}
    return found


def pipeline_data(task_config: dict) -> str | None:
    return (task_config.get("metadata") or {}).get("pipeline_data")


def pipeline_inputs(config: dict, results_dir: str) -> dict[str, str]:
    """{data set name: prepared file} the enabled repository tasks read (rule inputs)."""
    ours = repo_tasks()
    names = {pipeline_data(ours[t["name"]]) for t in settings(config)["tasks"] if t["name"] in ours}
    return {name: f"{results_dir}/data/{PIPELINE_DATA[name]}" for name in sorted(n for n in names if n)}


def mirror_for(dataset_path: str, mirror: list[dict]) -> dict | None:
    return next((entry for entry in mirror if entry["hub_id"] == dataset_path), None)


def _is_hub_id(dataset_path: str) -> bool:
    """owner/name that is not a local folder (builders like json or text have no slash)."""
    return dataset_path.count("/") == 1 and not resolve_path(dataset_path).exists()


def data_problem(name: str, task_config: dict, data: dict) -> str | None:
    """The one sentence why this task's data cannot be had, or None; no download."""
    wanted = pipeline_data(task_config)
    if wanted is not None:
        if wanted not in PIPELINE_DATA:
            return (
                f"lm-eval task {name!r}: pipeline_data {wanted!r} is not a prepared data set ({sorted(PIPELINE_DATA)})"
            )
        return None
    dataset_path = str(task_config.get("dataset_path") or "")
    files = (task_config.get("dataset_kwargs") or {}).get("data_files")
    for file in [files] if isinstance(files, str) else (files or {}).values() if isinstance(files, dict) else []:
        if isinstance(file, str) and not resolve_path(file).exists():
            return f"lm-eval task {name!r}: its data file {file} does not exist"
    if not _is_hub_id(dataset_path):
        return None
    entry = mirror_for(dataset_path, data["mirror"])
    if entry is not None:
        path = resolve_path(entry["path"])
        if not path.exists():
            return f"lm-eval task {name!r}: the data.mirror copy {path} of data set {dataset_path} does not exist"
        return None
    if data["hub_access"] == "mirror":
        return (
            f"lm-eval task {name!r}: data set {dataset_path} has no data.mirror entry and "
            "data.hub_access is mirror (add a mirror entry or allow the Hub)"
        )
    return None


def folder_sha256(folder: Path) -> str:
    """sha256 of a folder copy: of its sorted lines "<relative path> <file sha256>"."""
    lines = "".join(
        f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n" for p in sorted(Path(folder).rglob("*")) if p.is_file()
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def dataset_of(name: str, spec) -> str:
    """The data set a task spec reads, for messages."""
    config = spec if isinstance(spec, dict) else _builtin_config(name, resolve_functions=False) or {}
    return str(config.get("dataset_path") or "its lm-eval data set(s)")


def _with_mirror(task_config: dict, entry: dict) -> dict:
    """The task reading the mirror's local copy of its Hub data set."""
    path = resolve_path(entry["path"])
    patched = copy.deepcopy(task_config)
    if not path.is_dir() and path.suffix.lower() not in FILE_BUILDERS:
        raise TaskDataError(f"data.mirror file {path}: unsupported type (use {', '.join(FILE_BUILDERS)} or a folder)")
    digest = folder_sha256(path) if path.is_dir() else sha256_file(path)
    if digest != entry["sha256"]:
        raise TaskDataError(f"data.mirror copy {path}: sha256 {digest} != expected {entry['sha256']}")
    if path.is_dir():  # a local snapshot of the Hub repository: same configs and splits
        patched["dataset_path"] = str(path)
        return patched
    split = patched.get("test_split") or patched.get("validation_split") or "test"
    patched["dataset_path"] = FILE_BUILDERS[path.suffix.lower()]
    patched.pop("dataset_name", None)
    kwargs = dict(patched.get("dataset_kwargs") or {}, data_files={split: str(path)})
    if patched["dataset_path"] == "text":
        kwargs["sample_by"] = "document"  # a raw text is one document, as fetch_data reads it
    patched["dataset_kwargs"] = kwargs
    return patched


def task_specs(lm_eval: dict, data: dict, pipeline_files: dict[str, str]) -> list[tuple[dict, str | dict]]:
    """(configured task, spec for lm-eval's TaskManager.load) per task, data resolved.

    A repository task or a mirrored Hub task becomes an inline config dict; any other name
    is left to lm-eval. Raises TaskDataError (one sentence) when data cannot be had."""
    ours = repo_tasks()
    specs = []
    for task in lm_eval["tasks"]:
        name = task["name"]
        config = ours.get(name) or _builtin_config(name)
        if config is None:  # a group or tag: lm-eval resolves its members
            specs.append((task, name))
            continue
        problem = data_problem(name, config, data)
        if problem:
            raise TaskDataError(problem)
        config = {k: v for k, v in config.items() if k != "_yaml_path"}
        wanted = pipeline_data(config)
        if wanted is not None:
            path = pipeline_files.get(wanted)
            if path is None or not Path(path).is_file():
                raise TaskDataError(f"lm-eval task {name!r}: the prepared data set {wanted} ({path}) is missing")
            config["dataset_kwargs"] = dict(config.get("dataset_kwargs") or {}, data_files={"test": str(path)})
            specs.append((task, config))
        elif (entry := mirror_for(str(config.get("dataset_path")), data["mirror"])) is not None:
            specs.append((task, _with_mirror(config, entry)))
        else:
            specs.append((task, name))
    return specs


_TASK_OR_GROUP = re.compile(r"^['\"]?(task|group)['\"]?:[ \t]*['\"]?([^\s'\"#]+)['\"]?[ \t]*(?:#.*)?$", re.M)
_TAG_LINE = re.compile(r"^['\"]?tag['\"]?:[ \t]*['\"]?([^\s'\"#\[]+)['\"]?[ \t]*$", re.M)
_TAG_LIST = re.compile(r"^['\"]?tag['\"]?:[ \t]*\n((?:[ \t]+-[ \t]*\S+[ \t]*\n?)+)", re.M)
_WORD = re.compile(r"[\w\-.]+")
_BUILTIN: dict[str, tuple[str, Path]] = {}
_WORDS: set[str] = set()  # every word of lm-eval's task YAMLs: a registered name is among them


def builtin_names() -> dict[str, tuple[str, Path]]:
    """{name: (task | group | tag, YAML file)} of lm-eval's own task YAMLs, by a text scan
    (~1 s; lm-eval's TaskManager parses all ~14k files, ~20 s): for the checks only."""
    if not _BUILTIN:
        import lm_eval

        # *_yaml files are templates others include: their tags count, their task names do not.
        for path in sorted((Path(lm_eval.__file__).parent / "tasks").rglob("*yaml")):
            text = path.read_text(errors="replace")
            _WORDS.update(_WORD.findall(text))
            for kind, name in _TASK_OR_GROUP.findall(text) if path.suffix == ".yaml" else []:
                _BUILTIN.setdefault(name, (kind, path))
            tags = _TAG_LINE.findall(text) + [
                item.strip().lstrip("-").strip().strip("'\"")
                for block in _TAG_LIST.findall(text)
                for item in block.splitlines()
            ]
            for name in filter(None, tags):
                _BUILTIN.setdefault(name, ("tag", path))
    return _BUILTIN


def _builtin_config(name: str, resolve_functions: bool = True) -> dict | None:
    """The full config (includes merged) of one of lm-eval's own leaf tasks, else None."""
    kind, path = builtin_names().get(name, (None, None))
    if kind != "task":
        return None
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=resolve_functions)


def known_task(name: str) -> bool:
    """A task, group or tag of tasks/ or of lm-eval. Every name lm-eval registers is written
    in one of its task YAMLs: a name in none is unknown at once; for a word the scan does not
    recognise as a name (some tags), lm-eval's full index decides."""
    if name in repo_tasks() or name in builtin_names():
        return True
    return name in _WORDS and name in task_manager(include_defaults=True).all_tasks


_MANAGERS: dict[bool, object] = {}


def task_manager(include_defaults: bool):
    """lm-eval's TaskManager over tasks/ (and its own ~15k tasks when include_defaults:
    indexing those takes ~20 s, so only when a configured name is not one of ours)."""
    if include_defaults not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[include_defaults] = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    return _MANAGERS[include_defaults]


def needs_builtin_tasks(lm_eval: dict) -> bool:
    ours = repo_tasks()
    return any(task["name"] not in ours for task in lm_eval["tasks"])


def check_config(config: dict) -> None:
    """Raise ConfigError for an unknown task name or task data that cannot be had (enabled only)."""
    lm_eval = settings(config)
    if not lm_eval["enabled"]:
        return
    ours = repo_tasks()
    for index, task in enumerate(lm_eval["tasks"]):
        name, key = task["name"], f"evaluate.lm_eval.tasks[{index}].name"
        if not known_task(name):
            raise ConfigError(
                f"config key '{key}': lm-eval has no task {name!r} (neither in tasks/ nor among lm-eval's own tasks)"
            )
        config_of_task = ours.get(name) or _builtin_config(name, resolve_functions=False)
        problem = data_problem(name, config_of_task, config["data"]) if config_of_task else None
        if problem:
            raise ConfigError(f"config key '{key}': {problem}")
