"""runtime.cpu: affinity, physical cores, thread counts and pinning (read back in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.cpu import (
    available_cores,
    format_cpus,
    intra_op_threads,
    parse_cpus,
    physical_cores,
    pin_cpus,
    split_cores,
)
from runtime.errors import GenerationError

REPO = Path(__file__).resolve().parents[2]


def test_parse_and_format_cpus_round_trip() -> None:
    assert parse_cpus("0-3,9, 5") == [0, 1, 2, 3, 5, 9]
    assert format_cpus([0, 1, 2, 3, 5, 9]) == "0-3,5,9"
    assert parse_cpus(format_cpus([7, 2, 3, 4])) == [2, 3, 4, 7]


@pytest.mark.parametrize("spec", ["", "a", "3-1", "1-", "-2", "0,,1", "1.5"])
def test_parse_cpus_refuses_malformed(spec: str) -> None:
    with pytest.raises(GenerationError, match="invalid CPU list"):
        parse_cpus(spec)


def test_intra_op_threads_default_is_physical_cores_of_the_affinity() -> None:
    assert intra_op_threads(None) == len(physical_cores(available_cores()))
    assert intra_op_threads(1) == 1
    assert intra_op_threads(len(available_cores())) == len(available_cores())


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_intra_op_threads_refuses_bad_counts(bad: object) -> None:
    with pytest.raises(GenerationError, match="invalid threads") as info:
        intra_op_threads(bad)  # type: ignore[arg-type]
    assert "threads=None" in str(info.value)


def test_intra_op_threads_refuses_more_than_allowed() -> None:
    with pytest.raises(GenerationError, match=r"from 1 to \d+"):
        intra_op_threads(len(available_cores()) + 1)


def test_physical_cores_groups_smt_siblings(tmp_path: Path) -> None:
    # 4 logical CPUs, 2 cores with 2 siblings each (0/2 and 1/3), one package.
    for cpu, core in ((0, 0), (1, 1), (2, 0), (3, 1)):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(f"{core}\n")
        (topo / "physical_package_id").write_text("0\n")
    assert physical_cores([0, 1, 2, 3], sys_root=tmp_path) == [0, 1]
    assert physical_cores([2, 3], sys_root=tmp_path) == [2, 3]
    assert physical_cores([0, 9], sys_root=tmp_path) == [0, 9]  # unreadable topology: every CPU counts


def test_split_cores_gives_equal_disjoint_slices() -> None:
    slices = split_cores(list(range(8)), 4)
    assert slices == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(GenerationError, match="invalid instance count"):
        split_cores([0, 1], 3)


def test_pin_refuses_cores_the_process_may_not_use() -> None:
    outside = max(available_cores()) + 1000
    with pytest.raises(GenerationError, match="may not use") as info:
        pin_cpus(str(outside))
    assert format_cpus(available_cores()) in str(info.value)


def _run(body: str, env_extra: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity API")
def test_pinning_restricts_the_process_and_its_new_threads() -> None:
    target = available_cores()[-1]
    out = _run(f"""
        import os, threading
        from runtime.cpu import pin_cpus
        pin_cpus("{target}")
        seen = []
        t = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
        t.start(); t.join()
        print(sorted(os.sched_getaffinity(0)), seen[0])
    """)
    assert out == f"[{target}] [{target}]"
    assert sorted(os.sched_getaffinity(0)) == available_cores()  # this process is untouched


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity API")
def test_lmforge_cpus_env_pins_and_threads_follow() -> None:
    target = available_cores()[0]
    out = _run("""
        import os
        from runtime.cpu import intra_op_threads, pin_from_env
        pin_from_env(None)
        print(sorted(os.sched_getaffinity(0)), intra_op_threads(None))
    """, {"LMFORGE_CPUS": str(target)})
    assert out == f"[{target}] 1"
