"""``MethodConformance``: the contract tests a plugin author runs against a method in a few lines.

::

    # plugins/<name>/tests/test_conformance.py
    from hf_lowrank_plugins.testing import MethodConformance

    class TestMyMethod(MethodConformance):
        method = "my_method"
        settings = {"r": 4}

A plugin not yet installed (tested from its source tree) sets ``plugin`` to its module; the kit
registers it by hand before each test whenever the registry does not know the method (tests may
reload the registry from entry points in between).

pytest then runs every check of :mod:`.contract` over the model matrix (:data:`.models.MODEL_CASES`:
Llama, GPT-2 with ``Conv1D`` layers, T5, a BERT sequence classifier) on every device of
:func:`.models.kit_devices` (the CPU, and CUDA when present: ids then end in ``-cuda``), plus
the config checks. A
cell that cannot pass yet is declared in ``expected_failures`` with its reason; it runs as a strict
expected failure, so it turns into an error the day it starts passing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from ..api import make_config
from ..errors import ConfigError
from ..method import config_fields, peft_internal_fields
from ..registry import get_registry
from . import contract
from .models import MODEL_CASES, ModelCase, kit_devices, kit_models, rel_err

#: The checks of the matrix, by test name; ``expected_failures`` keys use these names (or ``"*"``).
CHECKS = (
    "identity_at_init",
    "merged_equals_adapted",
    "round_trip",
    "plain_peft",
    "saved_tensors",
    "resume",
    "optimizer_state",
    "compiles",
)


class MethodConformance:
    """Base class of a method's contract tests (see the module docstring).

    Attributes:
        method: the method name to test.
        settings: keyword fields for ``attach`` (keep ranks small: the models are 64 wide).
        load_in_4bit: train on a 4-bit base.
        models: the model matrix.
        expected_failures: ``{(model name, check name or "*"): reason}`` for cells that cannot pass yet.
        bad_settings: ``(fields, message pattern)`` pairs that must raise :class:`ConfigError`.
        plugin: the plugin module, registered by hand when the method is not installed.
        learning_rate: the runs' peak learning rate (default 5e-3).
    """

    method: ClassVar[str] = ""
    settings: ClassVar[dict[str, Any]] = {}
    load_in_4bit: ClassVar[bool] = False
    models: ClassVar[tuple[ModelCase, ...]] = MODEL_CASES
    expected_failures: ClassVar[dict[tuple[str, str], str]] = {}
    bad_settings: ClassVar[list[tuple[dict[str, Any], str]]] = []
    plugin: ClassVar[object | None] = None
    #: the runs' peak learning rate: the contract's 5e-3 suits the adapters here; a method whose
    #: parameters start at ones and move by the rate per step (IA3's scaling vectors) may need more
    learning_rate: ClassVar[float] = 5e-3
    _runs: ClassVar[dict[str, contract.TrainedRun]]

    # ------------------------------------------------------------------ parametrisation

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize every check over :attr:`models` and the devices, marking declared cells as strict
        expected failures."""
        if "case" not in metafunc.fixturenames:
            return
        check = metafunc.function.__name__.removeprefix("test_")
        params = []
        for device in kit_devices():
            for case in kit_models(self.models):
                reason = self.expected_failures.get((case.name, check)) or self.expected_failures.get((case.name, "*"))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                name = case.name if device == "cpu" else f"{case.name}-{device}"
                params.append(pytest.param(case, device, id=name, marks=marks))
        metafunc.parametrize("case, device", params)

    @pytest.fixture(autouse=True)
    def _method_registered(self) -> None:
        """Register :attr:`plugin` by hand when the method is not installed (or the registry was reloaded)."""
        registry = get_registry()
        if self.plugin is not None and self.method not in registry.methods:
            registry.register(self.plugin, name=f"{self.method}-by-hand")

    def _run(self, case: ModelCase, device: str, tmp_path_factory: pytest.TempPathFactory) -> contract.TrainedRun:
        """The method trained on ``case`` on ``device`` once per test class; every check reads the same run."""
        runs = type(self).__dict__.get("_runs")
        if runs is None:
            runs = {}
            type(self)._runs = runs
        key = f"{case.name}-{device}"
        if key not in runs:
            work = Path(tmp_path_factory.mktemp(f"{self.method}-{key}"))
            runs[key] = contract.train_run(
                case, self.method, dict(self.settings), work, self.load_in_4bit, device, self.learning_rate
            )
        return runs[key]

    def _info(self) -> Any:
        return get_registry().get(self.method)

    # ------------------------------------------------------------------ the matrix

    def test_identity_at_init(self, case: ModelCase, device: str) -> None:
        """The output right after ``attach`` equals the base's (where the method declares it)."""
        if not self._info().identity_at_init:
            pytest.skip(f"method '{self.method}' declares identity_at_init=False")
        error = contract.identity_error(case, self.method, dict(self.settings), self.load_in_4bit, device)
        assert error <= contract.IDENTITY_TOL, contract.within("adapted vs base at init", error, contract.IDENTITY_TOL)

    def test_merged_equals_adapted(
        self, case: ModelCase, device: str, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        """``merged/`` loaded by plain transformers reproduces the trained model."""
        run = self._run(case, device, tmp_path_factory)
        assert run.losses[-1] < run.losses[0], f"the run did not train: losses {run.losses}"
        error = rel_err(contract.merged_output(run), run.trained_output)
        assert error <= contract.MERGE_TOL, contract.within("merged/ vs the trained model", error, contract.MERGE_TOL)

    def test_round_trip(self, case: ModelCase, device: str, tmp_path_factory: pytest.TempPathFactory) -> None:
        """The exported adapter, loaded with ``load_adapter`` onto the base it names, reproduces the trained model."""
        if not self._info().trains_adapter:
            pytest.skip(f"method '{self.method}' trains the weights themselves: merged/ is its deliverable")
        run = self._run(case, device, tmp_path_factory)
        error = rel_err(contract.reloaded_output(run), run.trained_output)
        assert error <= contract.PLAIN_PEFT_TOL, contract.within("load_adapter", error, contract.PLAIN_PEFT_TOL)

    def test_plain_peft(self, case: ModelCase, device: str, tmp_path_factory: pytest.TempPathFactory) -> None:
        """Plain PEFT, in a process that never imports this package, reproduces the trained model silently."""
        if not self._info().trains_adapter:
            pytest.skip(f"method '{self.method}' trains the weights themselves: merged/ is its deliverable")
        run = self._run(case, device, tmp_path_factory)
        plain, report = contract.plain_peft_output(run)
        error = rel_err(plain, run.trained_output)
        assert error <= contract.PLAIN_PEFT_TOL, contract.within("plain PEFT", error, contract.PLAIN_PEFT_TOL)
        assert report["warnings"] == [], f"plain PEFT warned: {report['warnings']}"

    def test_saved_tensors(self, case: ModelCase, device: str, tmp_path_factory: pytest.TempPathFactory) -> None:
        """The adapter's saved tensors on the original base, with no initialisation re-run, reproduce the model."""
        if not self._info().trains_adapter:
            pytest.skip(f"method '{self.method}' trains the weights themselves: merged/ is its deliverable")
        run = self._run(case, device, tmp_path_factory)
        error = rel_err(contract.saved_tensors_output(run), run.trained_output)
        assert error <= contract.PLAIN_PEFT_TOL, contract.within(
            "the saved tensors on the original base, no init re-run", error, contract.PLAIN_PEFT_TOL
        )

    def test_resume(self, case: ModelCase, device: str, tmp_path_factory: pytest.TempPathFactory) -> None:
        """Resuming from the halfway checkpoint logs the uninterrupted run's losses."""
        run = self._run(case, device, tmp_path_factory)
        resumed = contract.resumed_losses(run)
        assert len(resumed) == len(run.losses) == contract.STEPS, (
            f"steps: resumed {resumed}, uninterrupted {run.losses}"
        )
        tail, expected = resumed[contract.SAVE_AT :], run.losses[contract.SAVE_AT :]
        assert tail == pytest.approx(expected, abs=contract.RESUME_TOL), (
            f"resumed losses {tail} vs uninterrupted {expected} (tolerance {contract.RESUME_TOL:.0e})"
        )

    def test_optimizer_state(self, case: ModelCase, device: str, tmp_path_factory: pytest.TempPathFactory) -> None:
        """The checkpointed optimizer state loads with ``weights_only=True`` (no pickled objects)."""
        contract.optimizer_state_loads_weights_only(self._run(case, device, tmp_path_factory))

    @pytest.mark.slow  # torch.compile takes seconds per method: the full suite, not the inner loop
    def test_compiles(self, case: ModelCase, device: str) -> None:
        """``torch.compile`` finds no graph break in a training forward that the base model does not have."""
        base, adapted = contract.graph_breaks(case, self.method, dict(self.settings), self.load_in_4bit, device)
        assert len(adapted) <= len(base), f"graph breaks added: {adapted} (the base model alone: {base})"

    # ------------------------------------------------------------------ configuration

    def test_bad_configs_raise_config_error(self) -> None:
        """Unknown options, wrong types and the declared bad settings raise :class:`ConfigError`."""
        info = self._info()
        with pytest.raises(ConfigError, match="unknown option"):
            make_config(self.method, no_such_option_xyz=1)
        wrong = {int: "many", float: "much", bool: "maybe"}
        unchecked = peft_internal_fields() | set(getattr(info.config_class, "UNCHECKED_FIELDS", ()))
        for name, f in config_fields(info.config_class).items():
            if type(f.default) in wrong and name not in unchecked:
                bad: dict[str, Any] = {name: wrong[type(f.default)]}
                with pytest.raises(ConfigError, match=name):
                    make_config(self.method, **bad)
        for fields, pattern in self.bad_settings:
            with pytest.raises(ConfigError, match=pattern):
                make_config(self.method, **fields)
