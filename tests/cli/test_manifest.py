"""`trainpilot validate` and manifest loading: clear errors naming the field and the fix."""

import pytest

from trainpilot.api import contract
from trainpilot.cli.main import main
from trainpilot.cli.manifest import ManifestError, builtin_trainer_objectives, load_experiment

GOOD = """
apiVersion: trainpilot.dev/v1alpha1
kind: AgentExperiment
metadata: {name: demo}
spec:
  searchSpace: [{name: lr, min: 0.0001, max: 1.0, log: true}]
"""


def write(tmp_path, text):
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


def test_quickstart_example_is_valid():
    experiment = load_experiment("examples/quickstart.yaml")
    assert experiment.name == "quickstart"
    assert experiment.spec.initial_trials[0]["lr"] == 5.0


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a: [unclosed", "not valid YAML"),
        (GOOD.replace("AgentExperiment", "Deployment"), "kind: AgentExperiment, found 0 (kind: Deployment)"),
        (GOOD.replace("AgentExperiment", "AgentExperiments"), "found 0 (kind: AgentExperiments)"),
        (GOOD.replace("v1alpha1", "v1"), "apiVersion must be trainpilot.dev/v1alpha1"),
        (GOOD + "  budgett: {maxTrials: 2}\n", "spec.budgett: Extra inputs are not permitted"),
        (GOOD.replace("max: 1.0", "max: 0.00001"), "min (0.0001) must be below max"),
        (GOOD.replace("name: demo", "name: " + "x" * 41), "metadata.name must be 1-40 lowercase letters"),
        (GOOD.replace("name: demo", "name: 1st-try"), "metadata.name must be 1-40 lowercase letters"),
        (GOOD.replace("name: demo", "name: lr.search"), "metadata.name must be 1-40 lowercase letters"),
        (
            GOOD + "  trialTemplate: {resources: {limits: {nvidia.com/gpu: '1'}}}\n",
            "limits.nvidia.com/gpu: GPUs are asked for with trialTemplate.gpusPerNode",
        ),
        (GOOD + "  trialTemplate: {env: {CUDA_VISIBLE_DEVICES: '0,1'}}\n", "CUDA_VISIBLE_DEVICES: the operator"),
        (GOOD + "  budget: {maxTrials: 0}\n", "spec.budget.maxTrials"),
    ],
)
def test_bad_manifests_name_the_problem(tmp_path, text, expected):
    with pytest.raises(ManifestError, match=None) as caught:
        load_experiment(write(tmp_path, text))
    assert expected in str(caught.value)


def test_validate_command(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, GOOD))]) == 0
    assert "valid: demo" in capsys.readouterr().out
    assert main(["validate", str(write(tmp_path, GOOD + "  bogus: 1\n"))]) == 2
    assert "spec.bogus" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_validate_warns_when_the_built_in_trainer_never_exports_the_objective(tmp_path, capsys):
    text = GOOD + "  objective: {metric: accuracy, direction: maximize}\n"
    assert main(["validate", str(write(tmp_path, text))]) == 0
    out, err = capsys.readouterr()
    assert "valid: demo" in out
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "spec.objective.metric 'accuracy'" in warning and "trainpilot_accuracy" in warning
    exported = warning.split("it exports ", 1)[1].split(". ", 1)[0].split(", ")
    assert exported == builtin_trainer_objectives()
    assert {"val_loss", "train_loss"} <= set(exported)


@pytest.mark.parametrize(
    "extra",
    [
        "  objective: {metric: val_loss}\n",
        "  objective: {metric: train_loss}\n",
        # A trainer of one's own may export anything: no warning.
        "  objective: {metric: accuracy}\n  trialTemplate: {command: [python, my_trainer.py]}\n",
    ],
)
def test_validate_does_not_warn_for_an_objective_the_trainer_can_serve(tmp_path, capsys, extra):
    assert main(["validate", str(write(tmp_path, GOOD + extra))]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_objectives_validate_lists_are_what_the_trainer_exports():
    """contract.TRAINER_METRICS (which validate lists) is exactly what the trainer's registry serves, with every
    optional gauge on."""
    from trainpilot_trainer.metrics import Metrics

    metrics = Metrics(max_steps=10, loss_floor=1.0, cuda=True, validation=(7, 640), entropy_rate=1.1, mfu=True)
    served = set()
    for family in metrics.registry.collect():
        if family.type == "histogram":
            continue
        served.add(family.name + ("_total" if family.type == "counter" else ""))
    assert served == set(contract.TRAINER_METRICS)
    assert builtin_trainer_objectives() == sorted(name.removeprefix("trainpilot_") for name in served)
