"""A user's own models, distillers, explainers and metrics: registered from a module named in the
config's ``plugins``, used by the CLI; and what xkd says when such a method breaks its contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xkd.config import RunConfig
from xkd.distill.base import check_forward
from xkd.errors import ConfigError, ContractError, RegistryError
from xkd.explain.base import check_map_shape
from xkd.metrics.base import metric
from xkd.plugins import import_plugins
from xkd.prepare import check_logits
from xkd.registry import METRICS, Registry

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> tuple[str, str]:
    """The plugin module and the config of README's "Your own methods"."""
    section = README.read_text().split("### Your own methods", 1)[1].split("\n## ", 1)[0]
    (module,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (config,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return module, config


def test_readmes_plugin_example_runs_from_the_cli(tmp_path, make_tiny_args):
    """The ``xkd`` command (whose sys.path lacks the current folder) imports ``plugins`` from it."""
    module, config = readme_example()
    (tmp_path / "myplugins.py").write_text(module)
    (tmp_path / "plugin.yaml").write_text(config)
    tiny = [o for o in make_tiny_args(tmp_path) if not o.startswith("student_model.")]  # the example's student
    cli = Path(sys.executable).parent / "xkd"
    args = [str(cli), "run", "--config", "plugin.yaml", "--no-progress", *(a for o in tiny for a in ("--set", o))]
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    explanations = json.loads((run / "records" / "explanations.json").read_text())
    for explainer in ("brightness", "grad_cam"):
        assert 0.0 <= explanations["per_model"]["soft"][explainer]["sparsity"] <= 1.0
    models = json.loads((run / "records" / "models.json").read_text())["models"]
    assert models["soft"]["model"] == "tiny_net" and models["soft"]["distiller_params"] == {"temperature": 4.0}
    assert set(models["soft"]["train"]["history"][0]["terms"]) == {"soft"}
    assert "Sparsity" in (run / "report.html").read_text()
    # a plugin that cannot be found: one line naming it and where it is looked for
    bad = [str(cli), "run", "--set", "plugins=[nosuchplug]", "--set", f"output_dir={tmp_path / 'other'}"]
    done = subprocess.run(bad, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "plugins[0]: no module named 'nosuchplug'; put nosuchplug.py in the current folder" in done.stderr


def test_import_plugins_names_each_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_plug.py").write_text("import no_such_dependency\n")
    (tmp_path / "raising_plug.py").write_text("raise RuntimeError('plugin failed on purpose')\n")
    with pytest.raises(ConfigError, match=r"plugins\[0\]: 'my/plug.py' is not a module name; give the module's"):
        import_plugins(["my/plug.py"])
    with pytest.raises(ConfigError, match=r"plugins\[1\]: importing 'broken_plug' failed: ModuleNotFoundError"):
        import_plugins(["json", "broken_plug"])
    with pytest.raises(ConfigError, match=r"importing 'raising_plug' failed: RuntimeError: plugin failed on purpose"):
        import_plugins(["raising_plug"])
    (tmp_path / "code.py").write_text("x = 1\n")  # the standard library's code comes first
    with pytest.raises(ConfigError, match=r"plugins\[0\]: 'code' is .*code.py, not .*: another module of that name"):
        import_plugins(["code"])
    with pytest.raises(ConfigError, match=r"plugins must be a list of module names, e.g. \['json'\]"):
        RunConfig(plugins="json")  # from Python: not read letter by letter


def test_a_headline_agreement_metric_without_a_direction_cannot_rank_a_comparison(tmp_path, make_tiny_args):
    from xkd.plan import load_config, validate_for_compare

    metric(
        "undirected_overlap", scope="agreement", inputs=("teacher_maps", "maps"), higher_is_better=None, category="x"
    )(lambda teacher_maps, maps: 0.0)
    try:
        extra = ("evaluation.metrics=[undirected_overlap]", "compare.agreement_metric=undirected_overlap")
        with pytest.raises(ConfigError, match="'undirected_overlap' declares no direction, so the comparison cannot"):
            validate_for_compare(load_config(None, make_tiny_args(tmp_path, *extra)))
    finally:
        METRICS._entries.pop("undirected_overlap")


def test_registry_names_a_taken_name_and_replaces_a_definition_run_again():
    reg: Registry = Registry("thing")

    def make():
        def builder():  # the same module and qualified name each time, as a notebook cell run again
            return 1

        return builder

    first, again = make(), make()
    reg.register("a")(first)
    reg.register("a")(again)  # no error: the later definition wins
    assert reg.get("a") is again

    def other():
        return 2

    with pytest.raises(
        RegistryError, match=r"thing 'a' is already registered \(.*make.<locals>.builder, .*test_plugins.py\)"
    ):
        reg.register("a")(other)
    reg.register("f")(lambda: 1)
    with pytest.raises(RegistryError, match="thing 'f' is already registered"):  # another lambda is another object
        reg.register("f")(lambda: 2)
    reg.expects(lambda obj: isinstance(obj, int), "give it an int")
    with pytest.raises(RegistryError, match="thing 'b': give it an int"):
        reg.register("b")(other)


def test_a_metric_registered_without_its_declaration_or_with_inputs_it_cannot_take_is_refused():
    with pytest.raises(RegistryError, match=r"metric 'bare': decorate the function with xkd.metrics.metric"):
        METRICS.register("bare")(lambda maps: 0.0)
    with pytest.raises(RegistryError, match=r"metric 'two_inputs': declares inputs \('maps', 'labels'\) but one\(\)"):

        @metric("two_inputs", scope="model", inputs=("maps", "labels"), higher_is_better=True, category="x")
        def one(maps):
            return 0.0

    assert "bare" not in METRICS and "two_inputs" not in METRICS


def test_a_distillers_output_is_checked_at_its_first_step():
    logits = torch.zeros(4, 3)
    check_forward((logits, {"ce": torch.tensor(1.0)}), 4, "d", 3)  # the contract: no error
    cases = [
        ((logits, {}), "d returned no loss terms"),
        (logits, "d returned Tensor"),
        ((logits, torch.tensor(1.0)), "d returned 'Tensor'"),
        ((logits, {"ce": torch.ones(4)}), "d: loss term 'ce' is not a scalar floating-point tensor"),
        ((torch.zeros(4, 5), {"ce": torch.tensor(1.0)}), r"d returned logits \(4, 5\) for 4 images of 3 classes"),
    ]
    for output, message in cases:
        with pytest.raises(ContractError, match=message):
            check_forward(output, 4, "d", 3)


def test_a_distiller_returning_no_terms_stops_training_at_once_naming_it(tiny_data, tiny_pair):
    from xkd.config import TrainConfig
    from xkd.distill import Distiller
    from xkd.engine import Trainer

    class Empty(Distiller):
        def forward(self, batch):
            return self.student(batch.images), {}

    student, teacher = tiny_pair
    data = tiny_data()
    trainer = Trainer(Empty(student, teacher), data, data, TrainConfig(epochs=1, batch_size=4), progress=False)
    with pytest.raises(ContractError, match=r"distiller 'Empty' \(model\) returned no loss terms"):
        trainer.fit()


def test_a_model_whose_head_ignores_the_classes_is_found_before_training():
    five = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
    with pytest.raises(ContractError, match=r"the teacher model returns \(2, 5\) for 2 images of a 10-class data set"):
        check_logits(five, torch.zeros(2, 1, 2, 2), 10, "teacher")
    check_logits(five, torch.zeros(2, 1, 2, 2), 5, "teacher")


def test_maps_off_the_contract_name_the_explainer():
    check_map_shape(torch.zeros(3, 8, 8), (8, 8), 3, method="mine")
    for maps, message in [
        (torch.zeros(3, 8, 8, dtype=torch.float64), "explainer 'mine' returned torch.float64 maps"),
        (torch.zeros(3, 1, 8, 8), r"explainer 'mine' returned maps of shape \(3, 1, 8, 8\)"),
        (torch.zeros(3, 4, 4), r"explainer 'mine' returned \(4, 4\) maps for \(8, 8\) images"),
        (torch.zeros(2, 8, 8), "explainer 'mine' returned 2 maps for 3 images"),
    ]:
        with pytest.raises(ContractError, match=message):
            check_map_shape(maps, (8, 8), 3, method="mine")


def test_preflight_checks_an_assistants_logits_and_a_users_explainer_on_test_images(tmp_path, make_tiny_args):
    """Before anything trains: an assistant whose head ignores the classes (it failed after the teacher
    trained), and a user's explainer checked on real test images (blank ones made a min-max map NaN)."""
    from xkd.data import build_dataset
    from xkd.explain import Attribution, Explainer
    from xkd.plan import load_config, resolve
    from xkd.prepare import preflight
    from xkd.registry import EXPLAINERS, MODELS

    @MODELS.register("five_outputs")
    def five_outputs(num_classes, in_channels=1, image_size=16):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(5))

    @EXPLAINERS.register("minmax_brightness")
    class MinMax(Explainer):
        def explain(self, images, targets):  # 0 / 0 on a constant image
            m = images.mean(1)
            lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
            return Attribution((m - lo) / (hi - lo), "minmax_brightness")

    try:
        ok = load_config(None, make_tiny_args(tmp_path, "evaluation.explainers=[{name: minmax_brightness}]"))
        preflight(resolve(ok), build_dataset(ok.data))  # a constant image would give 0/0 = NaN
        chain = "students=[{name: ta, distiller: teacher_assistant, params: {assistant: {name: five_outputs}}}]"
        bad = load_config(None, make_tiny_args(tmp_path, chain))
        with pytest.raises(
            ContractError, match=r"the ta's assistant model returns \(2, 5\) for 2 images of a 10-class"
        ):
            preflight(resolve(bad), build_dataset(bad.data))
    finally:
        MODELS._entries.pop("five_outputs")
        EXPLAINERS._entries.pop("minmax_brightness")


def test_a_users_mistakes_in_params_setup_and_registration_are_named(tiny_pair, caplog):
    from dataclasses import dataclass

    from xkd.config import TrainConfig
    from xkd.data.base import TensorImageDataset
    from xkd.distill import Distiller, build_distiller
    from xkd.distill.base import DistillContext
    from xkd.distill.feature import FeatureParams
    from xkd.engine import Trainer
    from xkd.registry import DISTILLERS, EXPLAINERS
    from xkd.schema import from_dict

    class Undecorated(FeatureParams):  # its own fields were silently the parent's defaults
        hidden: int = 4

    with pytest.raises(RegistryError, match="params: Undecorated is not a dataclass; decorate it"):
        from_dict(Undecorated, {}, "params")

    @dataclass
    class Checked:
        temperature: float = 1.0

        def validate(self):
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")  # not a ConfigError

    with pytest.raises(ConfigError, match=r"students\[0\].params: temperature must be > 0, got -1.0"):
        from_dict(Checked, {"temperature": -1.0}, "students[0].params")

    with pytest.raises(
        RegistryError, match="distiller 'not_a_distiller': register a subclass of xkd.distill.Distiller"
    ):
        DISTILLERS.register("not_a_distiller")(lambda student, teacher, params: None)
    with pytest.raises(
        RegistryError, match="explainer 'not_an_explainer': register a subclass of xkd.explain.Explainer"
    ):
        EXPLAINERS.register("not_an_explainer")(lambda model, params: None)

    class Adapted(Distiller):
        def setup(self, context):
            self.adapter = nn.Linear(3, 3)  # built, but not returned by trainable_modules()

        def forward(self, batch):
            logits = self.adapter(self.student(batch.images))
            return logits, {"ce": F.cross_entropy(logits, batch.labels)}

    class Broken(Distiller):
        def setup(self, context):
            raise IndexError("list index out of range")

        def forward(self, batch):  # never reached
            raise AssertionError

    student, teacher = tiny_pair
    data = TensorImageDataset(torch.rand(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    ctx = DistillContext(sample=torch.zeros(2, 1, 16, 16), train=data)
    DISTILLERS.register("adapted_plug")(Adapted)
    DISTILLERS.register("broken_plug")(Broken)
    try:
        d = build_distiller("adapted_plug", student, teacher, None, ctx)
        Trainer(d, data, data, TrainConfig(epochs=1, batch_size=4), progress=False)
        assert "2 parameter(s) of distiller 'adapted_plug' (adapter.weight, adapter.bias) are not in its" in caplog.text
        with pytest.raises(ContractError, match="distiller 'broken_plug': setup failed: IndexError: list index"):
            build_distiller("broken_plug", student, teacher, None, ctx)
    finally:
        DISTILLERS._entries.pop("adapted_plug")
        DISTILLERS._entries.pop("broken_plug")


def test_a_users_low_resolution_maps_are_named_in_the_superpixel_form_too(tiny_pair):
    from xkd.explain import Attribution, Explainer, build_explainer
    from xkd.registry import EXPLAINERS

    @EXPLAINERS.register("lowres_plug")
    class LowRes(Explainer):
        def explain(self, images, targets):  # the layer's 4x4, not upsampled to the images
            return Attribution(torch.rand(images.shape[0], 4, 4), "lowres_plug")

    try:
        with build_explainer("lowres_plug+superpixel", tiny_pair[0]) as ex:
            with pytest.raises(ContractError, match=r"explainer 'lowres_plug' returned \(4, 4\) maps for \(16, 16\)"):
                ex.explain(torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))
    finally:
        EXPLAINERS._entries.pop("lowres_plug")


def test_a_metric_result_whose_headline_would_be_lost_is_named():
    """A dict without the headline under the metric's name was recorded as null without a word."""
    metric("no_headline", scope="agreement", inputs=("teacher_maps", "maps"), higher_is_better=True, category="x")(
        lambda teacher_maps, maps: {"mean": 0.5, "n": 3}
    )
    try:
        info = METRICS.get("no_headline")
        with pytest.raises(
            ContractError, match="'no_headline' returned a dict without its headline under 'no_headline'"
        ):
            info.to_record({"mean": 0.5, "n": 3})
        assert info.to_record(torch.ones(2)) == {"no_headline": [1.0, 1.0]}  # per-image values (reduction: none)
        assert info.to_record({"no_headline": torch.tensor(0.5), "n": 3}) == {"no_headline": 0.5}
        assert info.to_record(None) == {"no_headline": None}  # undefined stays allowed
    finally:
        METRICS._entries.pop("no_headline")
