"""Rules the suite keeps about itself: no test can hang on a child process."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SUBPROCESS_CALLS = {"run", "check_output", "check_call", "call"}


def _calls_without_timeout(source: str) -> list[int]:
    """Lines of subprocess.run/check_output/check_call/call and ``.communicate()`` / ``.wait()`` calls that pass no
    timeout (Popen itself takes none: its communicate or wait must)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, base = node.func.attr, ast.unparse(node.func.value)
        child = base == "subprocess" and name in SUBPROCESS_CALLS
        waits = name in ("communicate", "wait") and base not in ("event", "threading", "asyncio")
        if (child or waits) and not any(k.arg in ("timeout", None) for k in node.keywords):
            if not (waits and node.args and name == "wait"):  # wait(30): a positional timeout
                lines.append(node.lineno)
    return lines


def test_every_subprocess_call_in_the_tests_has_a_timeout():
    missing = {p.name: lines for p in sorted(TESTS.glob("*.py")) if (lines := _calls_without_timeout(p.read_text()))}
    assert missing == {}, f"pass timeout= to these calls (file: lines): {missing}"


def test_the_timeout_check_sees_a_call_without_one():
    bad = "import subprocess\nsubprocess.run(['true'])\np = subprocess.Popen(['true'])\np.communicate()\n"
    assert _calls_without_timeout(bad) == [2, 4]
    good = "import subprocess\nsubprocess.run(['true'], timeout=5)\np = subprocess.Popen(['true'])\np.wait(5)\n"
    assert _calls_without_timeout(good) == []
