"""requirements.txt (the virtualenv) and envs/pipeline.yaml (conda) pin the same stack."""

import re

import yaml

from conftest import PROJECT


def file_pins(name: str) -> dict[str, str]:
    """A requirements file's pins, every line a plain ``name==version`` (no local tag like +cpu)."""
    pins = {}
    for line in (PROJECT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, _, version = line.partition("==")
            assert version and "+" not in version, f"{name}: {line!r} is not a plain == pin"
            pins[package.lower().replace("_", "-")] = version
    return pins


def requirement_pins() -> dict[str, str]:
    return file_pins("requirements.txt")


def conda_pins() -> dict[str, str]:
    env = yaml.safe_load((PROJECT / "envs" / "pipeline.yaml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    pins = {}
    for spec in pip_section:
        name, _, version = re.split(r"\s+", spec)[-1].partition("==")
        pins[name.lower().replace("_", "-")] = version
    return pins


def test_conda_env_matches_requirements():
    assert conda_pins() == requirement_pins()


def test_lock_pins_every_requirement_at_its_version():
    """make setup installs at the lock's versions (uv, -c requirements-lock.txt): a requirement
    changed without `make lock` would be refused there as a conflict, or drift silently."""
    locked = file_pins("requirements-lock.txt")
    assert {name: locked.get(name) for name in requirement_pins()} == requirement_pins()
    assert len(locked) > 3 * len(requirement_pins())  # the dependencies too, not only the named stack


def test_named_stack_is_pinned():
    pins = requirement_pins()
    for name in (
        "snakemake",
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "datasets",
        "huggingface-hub",
        "pandas",
        "seaborn",
    ):
        assert name in pins, name


def test_every_rule_uses_the_pinned_env():
    for smk in (PROJECT / "rules").glob("*.smk"):
        text = smk.read_text()
        rules = text.count("\nrule ")
        assert text.count("conda:\n        ENV") == rules, smk.name


def test_gpu_conda_env_adds_the_gpu_extras():
    """envs/pipeline-gpu.yaml (picked when the recipe needs Liger) = requirements.txt + requirements-gpu.txt."""
    gpu_env = yaml.safe_load((PROJECT / "envs" / "pipeline-gpu.yaml").read_text())
    pip_section = next(item["pip"] for item in gpu_env["dependencies"] if isinstance(item, dict))
    pins = dict(spec.lower().replace("_", "-").split("==") for spec in pip_section)
    extras = {}
    for line in (PROJECT / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            extras[name.lower().replace("_", "-")] = version
    assert pins == {**requirement_pins(), **extras}
