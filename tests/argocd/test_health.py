"""The Argo CD health check (resource_customizations/trainpilot.dev/AgentExperiment/health.lua),
run in real Lua the way Argo CD runs it, against health_test.yaml's cases in Argo CD's own format."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from tests.argocd.argo_lua import (
    CHECK_DIR,
    HEALTH_SCRIPT,
    HealthCase,
    HealthStatus,
    health,
    health_cases,
    load_yaml,
    run,
)
from tests.support.paths import REPO
from trainpilot.api import contract
from trainpilot.api.experiment import AgentExperimentStatus, Phase, parse_spec

CASES = health_cases()
# What each phase means to Argo CD once the operator has seen the latest spec.
PHASE_HEALTH = {
    "Pending": "Progressing",
    "Running": "Progressing",
    "Suspended": "Suspended",
    "Succeeded": "Healthy",
    "Failed": "Degraded",
    "Invalid": "Degraded",
}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.input_path)
def test_health_test_yaml_case(case: HealthCase) -> None:
    assert health(case.obj) == case.expected


def test_every_testdata_file_is_a_case_and_every_case_has_its_file() -> None:
    files = sorted(path.relative_to(CHECK_DIR).as_posix() for path in (CHECK_DIR / "testdata").glob("*.yaml"))
    assert sorted(case.input_path for case in CASES) == files


def _current(case: HealthCase) -> bool:
    """Not being deleted, and the status is about the spec as it is now."""
    obj = case.obj
    status = obj.get("status") or {}
    return not obj["metadata"].get("deletionTimestamp") and status.get("observedGeneration") == obj["metadata"].get(
        "generation"
    )


def test_every_phase_the_api_allows_has_a_case() -> None:
    phases = set(typing.get_args(Phase))
    # A new phase in the API fails here until PHASE_HEALTH (and health.lua, and a case) know it.
    assert set(PHASE_HEALTH) == phases
    crd = yaml.safe_load((REPO / "crds" / "agentexperiments.trainpilot.dev.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert set(schema["properties"]["status"]["properties"]["phase"]["enum"]) == phases
    for phase, expected in PHASE_HEALTH.items():
        direct = [c for c in CASES if _current(c) and c.obj["status"]["phase"] == phase]
        assert direct, f"health_test.yaml has no case for phase {phase}"
        assert all(c.expected.status == expected for c in direct), (phase, [c.input_path for c in direct])


def test_testdata_is_what_the_operator_writes() -> None:
    """Each input is a valid AgentExperiment whose status the operator's own model accepts, so a
    misspelt field (trialSummary, observedGen...) cannot make a case pass for the wrong reason."""
    phases = set(typing.get_args(Phase))
    for case in CASES:
        obj = case.obj
        assert (obj["apiVersion"], obj["kind"]) == (contract.API_VERSION, contract.EXPERIMENT_KIND), case.input_path
        status = obj.get("status") or {}
        if status.get("phase") == "Invalid":
            # The spec the operator refused: if the API refuses it too, with the words in the status.
            try:
                parse_spec(obj["spec"])
            except ValueError as error:
                assert str(error) == status["message"], case.input_path
        else:
            parse_spec(obj["spec"])
        if "status" not in obj:
            continue
        if obj["status"]["phase"] not in phases:  # the one case of a phase from the future
            assert case.expected.status == "Unknown", case.input_path
            continue
        AgentExperimentStatus.model_validate(obj["status"])


def test_lua_sees_the_object_as_argo_cds_gopher_lua_does(tmp_path: Path) -> None:
    manifest = tmp_path / "obj.yaml"
    manifest.write_text(
        "metadata:\n"
        "  name: x\n"
        "  generation: 2\n"
        "  creationTimestamp: 2026-11-30T09:00:00Z\n"  # unquoted: still a string, as sigs.k8s.io/yaml reads it
        "spec:\n"
        "  list: [10, two, {k: true}]\n"
        "  flag: false\n"
        "  ratio: 0.5\n"
        "  nothing: null\n"
        "  nested: {deep: {deeper: [[1, 2], []]}}\n"
        "  withNull: [1, null, 3]\n"
    )
    probe = """
    local count = 0
    for _ in ipairs(obj.spec.list) do count = count + 1 end
    return {
      metadata = type(obj.metadata), name = obj.metadata.name,
      generation = type(obj.metadata.generation), next_generation = obj.metadata.generation + 1,
      timestamp = type(obj.metadata.creationTimestamp),
      length = #obj.spec.list, ipairs = count, first = obj.spec.list[1], second = obj.spec.list[2],
      third_k = obj.spec.list[3].k, zeroth_nil = obj.spec.list[0] == nil,
      flag = type(obj.spec.flag), flag_false = obj.spec.flag == false, ratio = obj.spec.ratio * 4,
      null_nil = obj.spec.nothing == nil, absent_nil = obj.spec.absent == nil and obj.status == nil,
      deeper = #obj.spec.nested.deep.deeper, inner = obj.spec.nested.deep.deeper[1][2],
      empty = #obj.spec.nested.deep.deeper[2],
      with_null = #obj.spec.withNull, with_null_second = obj.spec.withNull[2],
    }
    """
    seen = run(probe, load_yaml(manifest))
    assert seen == {
        "metadata": "table",
        "name": "x",
        "generation": "number",
        "next_generation": 3,
        "timestamp": "string",
        "length": 3,
        "ipairs": 3,
        "first": 10,
        "second": "two",
        "third_k": True,
        "zeroth_nil": True,  # arrays start at 1
        "flag": "boolean",
        "flag_false": True,
        "ratio": 2,
        "null_nil": True,
        "absent_nil": True,
        "deeper": 2,
        "inner": 2,
        "empty": 0,
        "with_null": 2,  # gopher-lua's Append drops the null, so the 3 moves up
        "with_null_second": 3,
    }


@pytest.mark.parametrize(
    "snippet",
    [
        'return string.format("%d", 1)',
        'return ("x"):upper()',
        "return math.floor(1.5)",
        "return io.open('/etc/passwd')",
    ],
)
def test_only_the_libraries_argo_cd_opens_are_there(snippet: str) -> None:
    """Argo CD gives an argocd-cm script no string, math or io library: neither does this harness."""
    with pytest.raises(Exception, match="a nil value|index a string value"):
        run(snippet, {})
    assert run("return table.concat({tostring(1), type(os.time())}, ' ')", {}) == "1 number"


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        (2.413712978363037, "2.414"),
        (0.000123456, "0.0001235"),
        (1.23e-07, "1.23e-07"),
        (12345.678, "12350"),
        (-0.5, "-0.5"),
        (3.0, "3"),
        (1234567, "1234567"),
        (0.1 + 0.2, "0.3"),
        (999.96, "1000"),
        (0.99996, "1"),
    ],
)
def test_best_objective_is_printed_to_four_significant_digits(value: float, printed: str) -> None:
    """4 digits, as the operator's own messages print objectives. Each expected string is what Go's
    fmt.Sprint (gopher-lua's tostring) prints for the rounded value too: integers as integers,
    and no value here needs more digits than C Lua's %.14g shows."""
    obj = load_yaml(CHECK_DIR / "testdata" / "running.yaml")
    obj["status"]["bestObjective"] = value
    assert health(obj).message == f"Running (trials 1/4, best val_loss {printed})"


# Each wrong script must fail at least one case of health_test.yaml: the cases can tell.
MUTANTS = {
    "healthy reported as progressing": ('return health("Healthy"', 'return health("Progressing"'),
    "invalid forgotten": ('phase == "Failed" or phase == "Invalid"', 'phase == "Failed"'),
    "suspended reported as progressing": ('return health("Suspended"', 'return health("Progressing"'),
    "a lagging generation ignored": ("observed < generation", "observed > generation"),
    "deletion ignored": ("metadata.deletionTimestamp ~= nil", "metadata.deletionTimestamp == false"),
    "the Valid condition's message ignored": ('condition_message(status.conditions, "Valid", "False")', "nil"),
    "objective truncated, not rounded": ("value * power + 0.5", "value * power"),
    "approval waits not mentioned": ('condition.type == "AwaitingApproval" then', 'condition.type == "Nothing" then'),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_a_wrong_script_fails_a_case(mutant: str) -> None:
    original, replacement = MUTANTS[mutant]
    script = HEALTH_SCRIPT.read_text()
    assert original in script, f"update the mutant {mutant!r}: health.lua no longer has {original!r}"
    wrong = script.replace(original, replacement)
    failed = [case.input_path for case in CASES if health(case.obj, wrong) != case.expected]
    assert failed, f"no case of health_test.yaml notices: {mutant}"


def test_argo_cd_reads_only_status_and_message() -> None:
    """What ExecuteHealthLua makes of odd answers: the harness is as strict as Argo CD."""
    assert health({}, 'return {status = "Sideways"}') == HealthStatus(
        "Unknown", "Lua returned an invalid health status"
    )
    assert health({}, "return {}") == HealthStatus("")
    assert health({}, 'return {status = "Healthy", extra = 1}') == HealthStatus("Healthy")
    with pytest.raises(TypeError):
        health({}, "return 1")
