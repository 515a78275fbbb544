"""Argo CD's Lua health checks, run the way its controller runs them, in real Lua (lupa).

Argo CD (util/lua/lua.go) runs a script in gopher-lua, a Lua 5.1, with only the base, table,
package and a two-function os library open (a script from argocd-cm gets no string.* or math.*
unless useOpenLibs is set), the resource as the global `obj`, and reads the returned table as
{status, message}. This module does the same with lupa's Lua 5.1: numbers are doubles, arrays are
1-indexed, JSON nulls are nil (and dropped from arrays, as gopher-lua's Append drops nil), and the
other standard libraries are removed, string methods included, so a script that leans on them
fails here as it would in Argo CD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
import yaml

from tests.support.paths import REPO

CHECK_DIR = REPO / "resource_customizations" / "trainpilot.dev" / "AgentExperiment"
HEALTH_SCRIPT = CHECK_DIR / "health.lua"
HEALTH_TESTS = CHECK_DIR / "health_test.yaml"
# Argo CD's HealthStatusCode values a script may return; anything else becomes Unknown.
HEALTH_CODES = ("Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown")
INVALID_HEALTH_STATUS = "Lua returned an invalid health status"

# What Argo CD leaves a script: util/lua/lua.go opens package, base, table and a safe os (time, date).
_RESTRICT = """
debug.setmetatable("", nil)
string, math, io, debug, coroutine = nil, nil, nil, nil, nil
os = {time = os.time, date = os.date}
"""


class _KubernetesYamlLoader(yaml.SafeLoader):
    """YAML as sigs.k8s.io/yaml reads it: timestamps stay strings (it goes through JSON)."""


_KubernetesYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_KubernetesYamlLoader)  # a SafeLoader underneath


@dataclass(frozen=True)
class HealthStatus:
    status: str
    message: str = ""


def new_runtime() -> Any:
    runtime = lua51.LuaRuntime(register_eval=False, unpack_returned_tuples=True)
    runtime.execute(_RESTRICT)
    return runtime


def to_lua(runtime: Any, value: Any) -> Any:
    """A JSON-shaped Python value as Argo CD's decodeValue hands it to Lua."""
    if isinstance(value, dict):
        table = runtime.table()
        for key, item in value.items():
            converted = to_lua(runtime, item)
            if converted is not None:
                table[str(key)] = converted
        return table
    if isinstance(value, list):
        table = runtime.table()
        index = 1
        for item in value:
            converted = to_lua(runtime, item)
            if converted is not None:  # gopher-lua's LTable.Append ignores nil
                table[index] = converted
                index += 1
        return table
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)  # Lua 5.1: one number type, a double, as gopher-lua's LNumber
    if isinstance(value, str):
        return value
    return None  # null, and anything JSON has no word for


def from_lua(value: Any) -> Any:
    """A returned Lua value as Python; tables with keys 1..n are lists, as gopher-json encodes them."""
    if lua51.lua_type(value) != "table":
        return value
    items = {key: from_lua(item) for key, item in value.items()}
    if (
        items
        and all(isinstance(key, (int, float)) for key in items)
        and sorted(items) == list(range(1, len(items) + 1))
    ):
        return [items[index] for index in range(1, len(items) + 1)]
    return {str(key): item for key, item in items.items()} if items else []


def run(script: str, obj: dict[str, Any]) -> Any:
    """Run `script` with the global `obj`; its first return value, as Python."""
    runtime = new_runtime()
    runtime.globals().obj = to_lua(runtime, obj)
    return from_lua(runtime.execute(script))


def health(obj: dict[str, Any], script: str | None = None) -> HealthStatus:
    """What Argo CD's ExecuteHealthLua makes of the script's answer for `obj`."""
    result = run(script if script is not None else HEALTH_SCRIPT.read_text(), obj)
    if result is None or result == []:  # nil, or an empty table (encoded as []): no health
        return HealthStatus(status="")
    if not isinstance(result, dict):
        raise TypeError(f"the health script must return a table, not {type(result).__name__}")
    status, message = result.get("status", ""), result.get("message", "")
    if status not in HEALTH_CODES:
        return HealthStatus(status="Unknown", message=INVALID_HEALTH_STATUS)
    if not isinstance(message, str):
        raise TypeError(f"message must be a string, not {type(message).__name__}")
    return HealthStatus(status=status, message=message)


@dataclass(frozen=True)
class HealthCase:
    input_path: str
    expected: HealthStatus

    @property
    def obj(self) -> dict[str, Any]:
        return load_yaml(CHECK_DIR / self.input_path)


def health_cases() -> list[HealthCase]:
    """health_test.yaml's cases, read as Argo CD's util/lua/health_test.go reads them."""
    tests = load_yaml(HEALTH_TESTS)["tests"]
    return [
        HealthCase(
            input_path=test["inputPath"],
            expected=HealthStatus(
                status=test["healthStatus"]["status"], message=test["healthStatus"].get("message", "")
            ),
        )
        for test in tests
    ]
