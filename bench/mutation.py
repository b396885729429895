"""Mutation testing of the pure modules, by hand (not in CI): `mutmut run` as pyproject.toml's
[tool.mutmut] configures it, one child process at a time, then each module's share of mutants
caught and the names of those that survived. mutmut keeps its copy and results in mutants/: a
second run tests only what changed (delete mutants/ to start over). Arguments go to `mutmut run`
(mutant names or globs, to test those again)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict

CAUGHT = {"killed", "timeout", "caught by type check"}
NOT_RUN = {"not checked", "skipped"}


def main() -> int:
    subprocess.run(["mutmut", "run", "--max-children", "1", *sys.argv[1:]], check=False)
    results = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    by_module: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, status in re.findall(r"^\s*(\S+__mutmut_\d+): (.+)$", results, re.M):
        by_module[re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]].append((name, status.strip()))
    print(f"\n{'module':40} caught / tested")
    for module, found in sorted(by_module.items()):
        tested = [(n, s) for n, s in found if s not in NOT_RUN]
        caught = sum(s in CAUGHT for _, s in tested)
        print(f"{module:40} {caught:4} / {len(tested):4}  {100 * caught / max(len(tested), 1):5.1f} %")
    for found in by_module.values():
        for name, status in found:
            if status not in CAUGHT | NOT_RUN:
                print(f"  {status}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
