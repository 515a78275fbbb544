"""`trainpilot validate` and manifest loading: clear errors naming the field and the fix."""

import pytest

from trainpilot.cli.main import main
from trainpilot.cli.manifest import ManifestError, load_experiment

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
        (GOOD.replace("AgentExperiment", "Deployment"), "kind: AgentExperiment"),
        (GOOD.replace("v1alpha1", "v1"), "apiVersion must be trainpilot.dev/v1alpha1"),
        (GOOD + "  budgett: {maxTrials: 2}\n", "spec.budgett: Extra inputs are not permitted"),
        (GOOD.replace("max: 1.0", "max: 0.00001"), "min (0.0001) must be below max"),
        (GOOD.replace("name: demo", "name: " + "x" * 41), "metadata.name"),
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
